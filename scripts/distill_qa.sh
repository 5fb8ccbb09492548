#!/usr/bin/env bash
# Extractive QA, DistilBERT-style (docs/qa.md): a BERT-base QA teacher fine-tuned on SQuAD v1.1, a 6-layer student
# from its layers 1,3,5,8,10,12 (the layers DistilBERT's own extraction kept), then the student fine-tuned with the
# teacher's start/end distributions (0.5*kl at T=2 + 0.5*hard_ce, as DistilBERT's SQuAD distillation) and, for
# comparison, alone. Every run is graded on SQuAD dev and on any out-of-domain files given.
# usage: scripts/distill_qa.sh OUT [more glue-eval flags, e.g. --data_dir SQUAD_DIR --eval_files ood/duorc.json ood/race.json]
# Env: TEACHER=bert-base-uncased, STUDENT=a student folder (default: OUT/student from distill-init; a student
# distilled first with distill-train, or distilbert-base-uncased, does better), TASK=squad (or squad_v2).
# Cost: about 2 GPU-hours for the teacher and 1 for each student run on one A100 (estimate, not measured).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: scripts/distill_qa.sh OUT [glue-eval flags]" >&2
  exit 2
fi
OUT=$1
shift
TEACHER=${TEACHER:-bert-base-uncased}
TASK=${TASK:-squad}
QA=(--task "$TASK" --max_seq_length 384 --doc_stride 128 --per_device_train_batch_size 32 --num_train_epochs 2 --seed 42)
glue-eval --model "$TEACHER" "${QA[@]}" --learning_rate 3e-5 --save_model --output_dir "$OUT/teacher" "$@"
TEACHER_QA=$(find "$OUT/teacher/$TASK" -mindepth 2 -maxdepth 2 -name model -type d | sort | head -n 1)
STUDENT=${STUDENT:-$OUT/student}
if [ ! -e "$STUDENT/config.json" ]; then
  distill-init --teacher "$TEACHER" --layers 1,3,5,8,10,12 --student-type distilbert --output "$STUDENT"
fi
glue-eval --model "$STUDENT" "${QA[@]}" --learning_rate 5e-5 --num_train_epochs 3 --output_dir "$OUT/alone" "$@"
glue-eval --model "$STUDENT" "${QA[@]}" --learning_rate 5e-5 --num_train_epochs 3 --teacher "$TEACHER_QA" \
  --distill_weights '{"kl": 0.5, "hard_ce": 0.5}' --temperature 2 --output_dir "$OUT/distilled" "$@"
for run in teacher alone distilled; do echo "$run:"; cat "$OUT/$run/results.jsonl" | python -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    for split, m in r['dev'].items():
        print(f\"  {split}: EM {100 * m['exact_match']:.1f} F1 {100 * m['f1']:.1f}\")"; done
