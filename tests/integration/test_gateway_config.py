"""The gateway config has one source (gateway/envoy.yaml.tmpl): the committed renderings do not drift from it,
every variant passes ``envoy --mode validate``, and bad settings fail with a clear error."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.devstack.envoy import (
    GATEWAY_DIR,
    K8S_DESCRIPTOR,
    K8S_STATIC_DIR,
    GatewayConfig,
    render,
    render_committed,
    validate,
)


def test_committed_renderings_match_the_template() -> None:
    for name, text in render_committed().items():
        assert (GATEWAY_DIR / name).read_text() == text, (
            f"gateway/{name} drifted from gateway/envoy.yaml.tmpl: run `.venv/bin/python -m services.devstack.envoy "
            "render-committed`"
        )


def test_committed_renderings_are_valid_envoy_configs() -> None:
    texts = render_committed()
    res = validate(texts["envoy.yaml"])
    assert res.returncode == 0, res.stdout + res.stderr
    k8s = texts["envoy.k8s.yaml"]
    assert "query" in k8s and 'address: "query", port_value: 50052' in k8s
    assert 'address: "stream", port_value: 50053' in k8s and K8S_DESCRIPTOR in k8s
    assert f"{K8S_STATIC_DIR}/vendor/uPlot.iife.min.js" in k8s
    res = validate(k8s, k8s=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_api_key_variant_is_valid() -> None:
    cfg = GatewayConfig(gateway_dir="gateway", auth="api_key", api_keys={"desk": "secret-key"})
    res = validate(render(cfg))
    assert res.returncode == 0, res.stdout + res.stderr


def test_from_env() -> None:
    cfg = GatewayConfig.from_env({"OPTMON_GATEWAY_PORT": "18080", "OPTMON_QUERY_PORT": "15052",
                                  "OPTMON_STREAM_PORT": "15053", "OPTMON_GATEWAY_CORS_ORIGINS": "https://a.example, *"})
    assert cfg.listen_port == 18080 and cfg.query_addr == "127.0.0.1:15052" and cfg.stream_addr == "127.0.0.1:15053"
    assert cfg.cors_origins == ("https://a.example", "*")
    text = render(cfg)
    assert "port_value: 18080" in text and '{exact: "https://a.example"}' in text and 'regex: ".*"' in text
    default = GatewayConfig.from_env({})
    assert default.listen_port == 8080 and default.admin_port == 9901
    assert "http://localhost:8080" in default.cors_origins


@pytest.mark.parametrize("bad", [
    {"auth": "basic"},
    {"auth": "api_key"},  # no keys
    {"cors_origins": ()},
    {"query_addr": "query"},
])
def test_bad_settings_fail_clearly(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        render(replace(GatewayConfig(), **bad))  # type: ignore[arg-type]
