#!/usr/bin/env bash
# The checks only a CUDA GPU can run, as one command (about 10 minutes on one H100-class card is the aim; not
# run yet): the precision tests on CUDA (fp16 O1/O2/O3 and bf16 against fp32, loss scaling, masters), then
# bench.speed's CUDA page (fp32, bf16, fp16 O1 and O2: step times, tokens/s, model FLOPs utilisation).
#
#   bench/gpu_check.sh [OUT_DIR]      # from the repository root; OUT_DIR defaults to docs/
#
# Needs torch with CUDA, transformers 5.x and this package importable (pip install -e . on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs}"
python - <<'PY'
import sys
import torch
import transformers
if not torch.cuda.is_available():
    sys.exit("error: no CUDA device here; bench/gpu_check.sh is for a machine with a GPU")
if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit(f"error: transformers {transformers.__version__}; this toolkit needs 5.x (pip install 'transformers>=5')")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
PY
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$out"
python -m pytest -q -p no:cacheprovider tests/test_precision.py 2>&1 | tee "$out/gpu-check-tests.txt"
python -m bench.speed --only distill,demo,inference,teacher12 --out "$out/speed-cuda.json" --markdown "$out/speed-cuda.md"
