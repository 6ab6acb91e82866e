#!/usr/bin/env bash
# Set up everything on a fresh machine: venv, CPU torch (first), pinned dependencies, gRPC stubs.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.searchrec-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # CPU torch before anything that depends on it, or pip fetches a multi-GB CUDA build.
  python -m pip install -q torch==2.13.0
  python -m pip install -q -r requirements.txt
  touch "$stamp"
fi
bash scripts/gen_protos.sh
