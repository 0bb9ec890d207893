"""deploy/k8s: every overlay builds offline and validates against several Kubernetes versions' schemas, and stays
consistent with what the services really read (settings), listen on (ports, probes) and with gateway/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import CommonSettings
from services.ingest.settings import IngestSettings
from services.query.settings import QuerySettings
from services.stream.settings import StreamSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = ["dev", "prod"]
#: Kubernetes minor versions the manifests are validated against (schemas ship with kubernetes-validate).
K8S_VERSIONS = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]
#: Container name -> the settings class of the process it runs.
SETTINGS: dict[str, type[CommonSettings]] = {
    "ingest": IngestSettings,
    "query": QuerySettings,
    "stream": StreamSettings,
    "migrate": CommonSettings,
}
#: The gRPC port field of each service's settings.
PORT_FIELD = {"ingest": "ingest_port", "query": "query_port", "stream": "stream_port"}


def _kustomize(overlay: str | Path) -> list[dict[str, Any]]:
    """The documents of an overlay of deploy/k8s (by name) or of a kustomization folder."""
    path = overlay if isinstance(overlay, Path) else ROOT / "deploy" / "k8s" / "overlays" / overlay
    out = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _validate(path: Path, version: str) -> None:
    r = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, list[dict[str, Any]]]:
    name = request.param
    docs = _kustomize(name)
    path = tmp_path_factory.mktemp("k8s") / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return name, path, docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_validates_strict(overlay: tuple[str, Path, list[dict[str, Any]]], version: str) -> None:
    _, path, _ = overlay
    _validate(path, version)


COMPONENTS = sorted(p.name for p in (ROOT / "deploy" / "k8s" / "components").iterdir() if p.is_dir())


def _hpa_metrics(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == name)
    return list(hpa["spec"]["metrics"])


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_on_prod_validates_strict(component: str, tmp_path: Path) -> None:
    """Each optional component of deploy/k8s/components, added to the prod overlay as its docs say, builds and
    validates; the subscriber-scaling one adds exactly its pods metric, named as the gauge the stream service
    exports, to the stream HPA only."""
    k8s = ROOT / "deploy" / "k8s"
    rel = Path(os.path.relpath(k8s, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays" / "prod")], "components": [str(rel / "components" / component)]}))
    docs = _kustomize(tmp_path)
    out = tmp_path / "built.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    _validate(out, K8S_VERSIONS[-1])
    if component != "stream-subscriber-scaling":
        return
    from services.stream.metrics import SUBSCRIBERS

    prod = _kustomize("prod")
    added = [m for m in _hpa_metrics(docs, "stream") if m not in _hpa_metrics(prod, "stream")]
    assert added == [{"type": "Pods", "pods": {"metric": {"name": SUBSCRIBERS.describe()[0].name},
                                               "target": {"type": "AverageValue", "averageValue": "1000"}}}]
    assert _hpa_metrics(docs, "query") == _hpa_metrics(prod, "query")


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def _configmap_env(docs: list[dict[str, Any]], name_prefix: str) -> dict[str, str]:
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(name_prefix):
            return dict(d.get("data", {}))
    raise AssertionError(f"no ConfigMap {name_prefix}*")


def _secret_keys(docs: list[dict[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"].startswith("optmon-connections"):
            keys |= set(d.get("data", {}))
    return keys


def _env_field(var: str) -> str:
    assert var.startswith("OPTMON_"), var
    return var[len("OPTMON_"):].lower()


def test_every_env_var_is_a_setting(overlay: tuple[str, Path, list[dict[str, Any]]]) -> None:
    _, _, docs = overlay
    shared = set(_configmap_env(docs, "optmon-config")) | _secret_keys(docs)
    shared |= {"OPTMON_PG_DSN", "OPTMON_REDIS_URL"}  # prod: from the operator's Secret (documented)
    for dep in _deployments(docs).values():
        spec = dep["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if c["name"] not in SETTINGS:
                continue
            fields = set(SETTINGS[c["name"]].model_fields)
            names = {e["name"] for e in c.get("env", [])} | shared
            unknown = sorted(n for n in names if n.startswith("OPTMON_") and _env_field(n) not in fields)
            # The shared ConfigMap may carry a setting only some services read; each var must be read by someone.
            own = {e["name"] for e in c.get("env", [])}
            assert not [n for n in unknown if n in own], f"{dep['metadata']['name']}/{c['name']}: {unknown}"
    every = set().union(*(set(s.model_fields) for s in SETTINGS.values()))
    for var in shared:
        assert _env_field(var) in every, f"{var} is read by no service"


def test_ports_and_probes_match_settings(overlay: tuple[str, Path, list[dict[str, Any]]]) -> None:
    _, _, docs = overlay
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, field in PORT_FIELD.items():
        dep = _deployments(docs)[name]
        c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        default_port = SETTINGS[name].model_fields[field].default
        assert ports["grpc"] == int(env[f"OPTMON_{name.upper()}_PORT"]) == default_port
        assert ports["metrics"] == int(env["OPTMON_METRICS_PORT"])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], (name, probe)
        svc_ports = {p["name"]: p for p in services[name]["spec"]["ports"]}
        assert svc_ports["grpc"]["port"] == ports["grpc"]
        assert svc_ports["grpc"]["targetPort"] == "grpc"
        # Graceful SIGTERM: the pod's grace covers the service's shutdown grace plus the preStop sleep.
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        cfg = _configmap_env(docs, "optmon-config")
        assert grace >= float(cfg["OPTMON_SHUTDOWN_GRACE_S"]) + c["lifecycle"]["preStop"]["sleep"]["seconds"] + 5


def test_security_context_everywhere(overlay: tuple[str, Path, list[dict[str, Any]]]) -> None:
    _, _, docs = overlay
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "limits" in c["resources"] and "requests" in c["resources"]


def test_gateway_config_is_the_one_in_gateway_dir(
    overlay: tuple[str, Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, _, docs = overlay
    cm = _configmap_env(docs, "gateway-envoy")
    source = (ROOT / "gateway" / "envoy.k8s.yaml").read_text()
    assert cm["envoy.k8s.yaml"] == source
    # Upstreams are the Kubernetes Services of query and stream on their gRPC ports.
    assert "query" in source and "50052" in source and "stream" in source and "50053" in source
    # envoy --mode validate on it, with the mounted paths pointed at the repo's files.
    local = source.replace("/etc/optmon/descriptor/optmon.pb", str(ROOT / "gateway" / "optmon.pb")).replace(
        "/etc/optmon/static", str(ROOT / "gateway" / "static"))
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(local)
    envoy = shutil.which("envoy", path=str(BIN)) or "envoy"
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(cfg), "-l", "error"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_dashboard_configmap_carries_every_static_file(overlay: tuple[str, Path, list[dict[str, Any]]]) -> None:
    _, _, docs = overlay
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("gateway-static"))
    static = ROOT / "gateway" / "static"
    on_disk = {p.name: p.read_text() for p in static.rglob("*") if p.is_file() and p.name != "README.md"}
    assert {**cm.get("data", {})} == on_disk
    dep = _deployments(docs)["gateway"]
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "static")
    mounted = {i["path"] for i in vol["configMap"]["items"]}
    assert mounted == {str(p.relative_to(static)) for p in static.rglob("*") if p.is_file() and p.name != "README.md"}
