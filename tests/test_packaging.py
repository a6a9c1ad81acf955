"""Packaging facts that break installs silently: the console script target, and that the runtime
dependencies in pyproject.toml are exactly what model/ and app/ import (nothing missing, nothing unused)."""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
import urllib.error

import pytest

from tests.support import REPO

PACKAGES = ("model", "app")


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def normalise(name: str) -> str:
    """PEP 503 name normalisation, so `prometheus_client` and `prometheus-client` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))


def optional_imports(tree: ast.AST) -> set[int]:
    """ids of import nodes guarded by `except ImportError` (optional accelerators need no declaration)."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = {ast.unparse(handler.type) for handler in node.handlers if handler.type is not None}
        if caught & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"}:
            guarded |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return guarded


def third_party_imports(folders: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Top-level third-party module -> files under `folders` that import it (lazy imports included)."""
    found: dict[str, set[str]] = {}
    local = {"model", "app", "tests", "bench", "__future__"}
    for package in folders:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            guarded = optional_imports(tree)
            for node in ast.walk(tree):
                if id(node) in guarded:
                    continue
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in local and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


@functools.cache
def module_distributions() -> dict[str, list[str]]:
    """Import name -> distributions providing it; scanning every installed package takes a second."""
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    return {normalise(dist) for dist in module_distributions().get(module, [])}


def test_console_script_target_is_a_callable() -> None:
    target = pyproject()["project"]["scripts"]["llamaserve"]
    module_name, _, attribute = target.partition(":")
    assert importlib.util.find_spec(module_name) is not None, f"{target}: module {module_name} does not exist"
    assert callable(getattr(importlib.import_module(module_name), attribute)), f"{target} is not callable"


def test_every_runtime_import_is_declared() -> None:
    declared = {requirement_name(req) for req in pyproject()["project"]["dependencies"]}
    missing = {
        module: sorted(files) for module, files in third_party_imports().items() if not distributions_of(module) & declared
    }
    assert not missing, f"imported by model/ or app/ but not in [project] dependencies: {missing}"


def test_every_declared_dependency_is_imported() -> None:
    imported = set().union(*(distributions_of(module) for module in third_party_imports()))
    unused = sorted(
        name for name in (requirement_name(req) for req in pyproject()["project"]["dependencies"]) if name not in imported
    )
    assert not unused, f"declared in [project] dependencies but never imported by model/ or app/: {unused}"


def with_their_requirements(names: set[str]) -> set[str]:
    """The distributions plus what each one requires (one level), as installed here."""
    out = set(names)
    for name in names:
        try:
            out |= {requirement_name(req) for req in importlib.metadata.requires(name) or [] if "extra ==" not in req}
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def test_package_data_ships_every_file_the_code_reads_from_its_folders() -> None:
    """A wheel (the Docker image installs one) carries the playground's files and the C kernels that
    model/native.py builds at load: without them the server would serve no page, or lose the int8 head."""
    patterns = pyproject()["tool"]["setuptools"]["package-data"]
    for package, folder in (("app", "static"), ("model", "kernels")):
        files = sorted(p.relative_to(REPO / package).as_posix() for p in (REPO / package / folder).iterdir() if p.is_file())
        assert files, f"{package}/{folder} is empty"
        unshipped = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns.get(package, []))]
        assert not unshipped, f"not in [tool.setuptools.package-data] {package}: {unshipped}"


@pytest.mark.parametrize(("folder", "extra"), [("tests", "test"), ("bench", "bench")])
def test_extra_covers_its_folder(folder: str, extra: str) -> None:
    """A clean `pip install -e .[test]` (or `.[bench]`) has everything tests/ (bench/) imports; a module that
    a declared package guarantees (starlette via fastapi) counts as present."""
    project = pyproject()["project"]
    declared = with_their_requirements(
        {requirement_name(req) for req in project["dependencies"] + project["optional-dependencies"][extra]}
    )
    missing = {
        module: sorted(files)
        for module, files in third_party_imports((folder,)).items()
        if not distributions_of(module) & declared
    }
    assert not missing, f"imported by {folder}/ but not in dependencies or the [{extra}] extra: {missing}"


def test_readme_configuration_table_lists_every_setting() -> None:
    """The README's table is written by hand from app/config.py: catch a setting added without docs."""
    from app.config import Settings

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- CONFIG-TABLE", 1)[1].split("<!-- /CONFIG-TABLE -->", 1)[0]
    missing = [name for name in Settings.model_fields if f"`LLAMASERVE_{name.upper()}`" not in table]
    assert not missing, f"settings missing from the README configuration table: {missing}"


def load_stream_check():  # type: ignore[no-untyped-def]
    """.ci/stream_check.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("stream_check", REPO / ".ci" / "stream_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sse(*events: str) -> str:
    return "".join(f"data: {event}\n\n" for event in events)


def chunk(text: str, finish: str | None = None) -> str:
    import json

    return json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def test_ci_stream_check_accepts_a_good_stream() -> None:
    check = load_stream_check().check_sse
    assert check("text/event-stream; charset=utf-8", sse(chunk(" Paris"), chunk(".", "length"), "[DONE]")) == " Paris."


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", sse(chunk(" Paris", "stop"), "[DONE]")),  # not SSE
        ("text/event-stream", sse(chunk(" Paris", "stop"))),  # no [DONE]
        ("text/event-stream", sse(chunk("  ", "stop"), "[DONE]")),  # no text
        ("text/event-stream", sse(chunk(" Paris"), "[DONE]")),  # no finish_reason
        ("text/event-stream", sse('{"error": {"message": "boom"}}', "[DONE]")),  # error event
        ("text/event-stream", "event: error\n" + sse(chunk(" Paris", "stop"), "[DONE]")),  # non-data line
    ],
)
def test_ci_stream_check_rejects_a_broken_stream(content_type: str, body: str) -> None:
    with pytest.raises(AssertionError):
        load_stream_check().check_sse(content_type, body)


def test_ci_stream_check_finds_the_playground_and_its_assets() -> None:
    """What the container check asks of the image's package: the page and the files it names."""
    from tests.support.api import settings, tiny_loaded, uvicorn_thread

    check = load_stream_check().check_playground
    with uvicorn_thread(settings(), tiny_loaded()) as (url, _):
        check(url)
    with uvicorn_thread(settings(playground=False), tiny_loaded()) as (url, _), pytest.raises(urllib.error.HTTPError) as error:
        check(url)
    assert error.value.code == 404
