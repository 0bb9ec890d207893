#!/usr/bin/env bash
# Generates Python code (gen/optmon/v1) and the Envoy descriptor set (gateway/optmon.pb) from protos/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GAPI=$($PY -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')
GPROTO=$($PY -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
rm -rf gen/optmon && mkdir -p gen
$PY -m grpc_tools.protoc -I protos -I "$GAPI" -I "$GPROTO" \
  --python_out=gen --pyi_out=gen --grpc_python_out=gen protos/optmon/v1/*.proto
touch gen/optmon/__init__.py gen/optmon/v1/__init__.py
$PY -m grpc_tools.protoc -I protos -I "$GAPI" -I "$GPROTO" --include_imports --include_source_info \
  --descriptor_set_out=gateway/optmon.pb protos/optmon/v1/*.proto \
  google/rpc/status.proto google/rpc/error_details.proto
# (google.rpc.Status and its details are in the set so Envoy's convert_grpc_status can print error bodies.)
echo "protos: generated gen/optmon/v1 and gateway/optmon.pb"
