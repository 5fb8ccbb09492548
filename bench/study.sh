#!/usr/bin/env bash
# The offline distillation study in one command: prepare its data (each step is skipped once done), then run it.
#
#   bench/study.sh                 # the full study: about 85 min on 2 CPU cores; writes docs/study.{md,png,json}
#   bench/study.sh --quick         # every piece on tiny subsets: about 3 min
#   bench/study.sh --report_only   # rewrite the report from the finished pieces
#
# Arguments go to bench/study.py (--help lists them). With --tasks (e.g. GLUE tasks from the hub) the local
# tasks are not prepared. Preparing converts paraphrase-MiniLM-L3-v2 from ONNX, which needs
# `pip install onnx onnxruntime` (not toolkit dependencies). DISTILL_STUDY_CACHE moves the cache
# (default ~/.cache/distill/study) for both steps.
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" --tasks"*|*" --help "*|*" -h "*) ;;
  *) python bench/prepare_study_data.py > /dev/null ;;
esac
exec python bench/study.py "$@"
