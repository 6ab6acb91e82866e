#!/usr/bin/env bash
# Set up everything on a fresh machine: venv, CPU torch (first), pinned dependencies, gRPC stubs.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Real servers for the fleet (shared state, gRPC proxy): Debian's redis-server and nginx. Tests and the
# fleet harness start their own instances on free loopback ports; nothing is started here.
if ! command -v redis-server >/dev/null 2>&1 || ! { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q redis-server nginx >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server nginx >/dev/null; }
fi
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
