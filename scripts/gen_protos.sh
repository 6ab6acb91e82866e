#!/usr/bin/env bash
# Generate the Python gRPC stubs from proto/ into ./searchrec/v1 (git-ignored; never edit them).
# The generated modules import each other as `searchrec.v1.*`, so they live at that package path.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/searchrec/v1/searchrec.proto
echo "generated searchrec/v1/searchrec_pb2{,_grpc}.py"
