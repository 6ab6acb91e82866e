#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the sample bundle from training/sample (search index,
# recommender, a product classifier trained on the catalog's categories and query suggestions), serve it.
#   bash scripts/quickstart.sh [extra server flags, e.g. --port 50052]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/env.sh
if [ ! -f bundles/sample/manifest.json ]; then
  python -m training build --catalog training/sample/catalog.jsonl --interactions training/sample/interactions.csv \
    --query-log training/sample/judgments.csv --out bundles/sample --name sample --classifier --classifier-epochs 4
fi
# Feedback and live catalog changes are logged (and replayed on restart) under state/sample.
exec python -m server --bundle bundles/sample --port 50051 --state-dir state/sample "$@"
