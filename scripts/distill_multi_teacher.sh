#!/usr/bin/env bash
# Two teachers, task-agnostic: a 4-layer student built from bert-base-uncased layers 1,5,8,12, distilled from
# bert-base-uncased and bert-large-uncased mixed 0.4/0.6 (5*ce on the mixture of their soft targets + 2*mlm + cos per
# teacher), fp16 O2, wikitext-103 (student_configs/bert_4l_multi_teacher.json; docs/objective.md, "Several teachers").
# usage: scripts/distill_multi_teacher.sh [NUM_GPUS=1] [OUTPUT_DIR=runs/bert_4l_multi_teacher] [more overrides, e.g.
#   --teacher_weights entropy, or --teacher bert-base-uncased --teacher OTHER to name another list]
exec "$(dirname "$0")/run_recipe.sh" bert_4l_multi_teacher.json "$@"
