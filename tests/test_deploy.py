"""deploy/kubernetes/: valid against Kubernetes' own schemas (offline, strict), and consistent with the server."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings
from app.server import create_app
from tests.support.api import settings, tiny_loaded

MANIFESTS = sorted((Path(__file__).parent.parent / "deploy" / "kubernetes").glob("*.yaml"))
VERSIONS = ["1.29.0", "1.37.0"]  # the oldest release still common in managed clusters, and the newest bundled


def documents() -> dict[str, dict[str, Any]]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


def test_the_manifests_are_all_there() -> None:
    assert set(documents()) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_strictly(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a typo in a probe is an error, not ignored."""
    deployment = copy.deepcopy(documents()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def container() -> dict[str, Any]:
    return documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def env() -> dict[str, Any]:
    return {item["name"]: item for item in container()["env"]}


def test_every_environment_variable_is_a_setting_and_parses() -> None:
    fields = {f"LLAMASERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env()) <= fields, set(env()) - fields
    plain = {name[len("LLAMASERVE_") :].lower(): item["value"] for name, item in env().items() if "value" in item}
    parsed = Settings(**plain)  # type: ignore[arg-type]
    assert parsed.drain_timeout == float(plain["drain_timeout"])


def test_termination_grace_covers_pre_stop_and_drain() -> None:
    spec = documents()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = int(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env()["LLAMASERVE_DRAIN_TIMEOUT"]["value"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10


def test_probes_mean_startup_readiness_and_liveness() -> None:
    c = container()
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert all(c[probe]["httpGet"]["port"] in ports for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a cold start loads and warms the model


def test_selectors_and_targets_point_at_the_pods() -> None:
    docs = documents()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])
    claim = docs["Deployment"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]


@pytest.mark.anyio
async def test_the_probed_paths_and_the_scaling_metric_exist_on_the_server() -> None:
    import httpx

    annotations = documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    metric = documents()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    app = create_app(settings(api_key="secret"), tiny_loaded())  # probes and scrapes carry no key
    async with app.router.lifespan_context(app):
        await app.state.server.ready.wait()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/health/live")).status_code == 200
            scraped = await client.get(annotations["prometheus.io/path"])
            assert scraped.status_code == 200 and f"\n{metric} " in scraped.text
