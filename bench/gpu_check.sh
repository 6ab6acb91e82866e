#!/usr/bin/env bash
# Benchmarks 1-3 on a CUDA machine, in one short run (about 3 minutes), for the device tool:
#   bash bench/gpu_check.sh [BUNDLE]      -> $OUT/gpu_*.json (or out/) and the tables on stdout
# Needs the project's environment with a CUDA build of torch (docs/gpu.md). faiss-gpu is not assumed:
# the encoder runs fp16 on CUDA, FAISS stays on the CPU unless faiss-gpu is installed (GetInfo and
# the server log say which). Not run yet: no device machine has been lent to this project so far.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
OUT="${OUT:-out}"
mkdir -p "$OUT"
BUNDLE="${1:-bundles/sample}"
if [ ! -f "$BUNDLE/manifest.json" ]; then
  python -m training build --catalog training/sample/catalog.jsonl --interactions training/sample/interactions.csv \
    --out "$BUNDLE" --name sample --device cuda
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
timeout 120 python bench/encoder_throughput.py --bundle "$BUNDLE" --device cuda --quick --json "$OUT/gpu_encoder.json"
timeout 240 python bench/serving_load.py --bundle "$BUNDLE" --device cuda --quick --json "$OUT/gpu_serving.json"
