# Sourced by the scripts: activate the venv and set the few environment defaults the project needs.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. .venv/bin/activate
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"  # numba cache=True needs a writable dir
export SEARCHREC_ENCODER_CACHE="${SEARCHREC_ENCODER_CACHE:-$PWD/.cache/searchrec}"  # encoder graphs: ONNX exports and traced TorchScript (server)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1                   # weights come from local folders only
export TOKENIZERS_PARALLELISM=false
export SEARCHREC_DATA_DIR="${SEARCHREC_DATA_DIR:-$PWD/../shared/data}"
