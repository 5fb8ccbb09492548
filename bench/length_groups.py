"""glue-eval's ``--length_groups``: plain fine-tuning epochs of a real model on a real task, one padded forward per
batch against the batch run as up to N length groups, in interleaved rounds.

    python -m bench.length_groups --model offline:all-mpnet-base-v2 --task polarity
    python -m bench.length_groups --model offline:all-MiniLM-L6-v2 --task polarity --out docs/length_groups.json

The task comes from the study's prepared data (``python -m bench.prepare_study_data``): the first ``--rows``
training examples, shuffled once, tokenised at ``--max_seq_length`` and padded per batch as glue-eval's collator
does. Each variant steps its own copy of the model (``GlueTrainer.compute_loss``, backward, AdamW) under the
precision glue-eval's ``auto`` picks here. Prints the real tokens' share of the padded positions and
``length_groups_vs_one_forward: X`` (> 1: the groups are faster).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import random
import sys
import tempfile

import torch

from bench.common import Clock, command_line, interleaved, log, machine, paired_ratio, set_threads, summary, write_json


def task_batches(tokenizer, task_dir: str, rows: int, batch: int, max_len: int) -> list[dict]:
    """The task's first ``rows`` training examples, shuffled with seed 0, as padded batches with labels."""
    import json

    from transformers import DataCollatorWithPadding

    with open(os.path.join(task_dir, f"{os.path.basename(task_dir)}.json"), encoding="utf-8") as f:
        spec = json.load(f)
    with open(os.path.join(task_dir, spec["train"]), encoding="utf-8") as f:
        data = list(csv.DictReader(f))[:rows]
    random.Random(0).shuffle(data)
    labels = {name: i for i, name in enumerate(spec["labels"])}
    feats = [dict(tokenizer(*[r[c] for c in spec["text_columns"]], truncation=True, max_length=max_len),
                  labels=labels[r[spec["label_column"]]]) for r in data]
    collate = DataCollatorWithPadding(tokenizer)
    return [collate(feats[s:s + batch]) for s in range(0, len(feats), batch)]


def epoch_runner(path: str, groups: int, batches: list[dict], bf16: bool):
    """A zero-argument function running one fine-tuning epoch over ``batches`` with ``--length_groups groups``."""
    from transformers import AutoModelForSequenceClassification

    from glue_eval.arguments import GlueTrainingArguments
    from glue_eval.trainer import GlueTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).train()
    args = GlueTrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-groups-"), use_cpu=True, report_to=[],
                                 length_groups=groups, bf16=bf16)
    trainer, optimizer = GlueTrainer(model=model, args=args), torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run():
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = trainer.compute_loss(model, dict(b))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="offline:all-MiniLM-L6-v2", help="model folder, hub id or offline alias")
    p.add_argument("--task", default="polarity", help="a task of the study's prepared data (polarity, uncertainty)")
    p.add_argument("--cache_dir", help="the study's prepared data (default: prepare_study_data.py's)")
    p.add_argument("--rows", type=int, default=320)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="auto")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from bench.prepare_study_data import default_cache_dir
    from distill.common.assets import resolve_model_name
    from distill.common.hardware import CPU_BF16_FLAGS, read_cpu_flags

    threads = set_threads(args.threads)
    task_dir = os.path.join(args.cache_dir or default_cache_dir(), "data", args.task)
    if not os.path.isfile(os.path.join(task_dir, f"{args.task}.json")):
        print(f"error: no prepared task {args.task!r} in {task_dir}: run python -m bench.prepare_study_data",
              file=sys.stderr)
        return 2
    path = resolve_model_name(args.model)
    batches = task_batches(AutoTokenizer.from_pretrained(path), task_dir, args.rows, args.batch, args.max_seq_length)
    real = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    bf16 = bool(set(read_cpu_flags() or ()) & set(CPU_BF16_FLAGS))
    runs = {"one_forward": epoch_runner(path, 1, batches, bf16), "groups": epoch_runner(path, args.groups, batches, bf16)}
    log(f"{args.model} on {args.task}: real tokens {real:.0%} of the padded positions, {'bf16' if bf16 else 'fp32'}")
    times = interleaved(runs, args.rounds, 1, Clock(torch.device("cpu")))
    ratio = paired_ratio(times, "one_forward", "groups")
    report = {"command": command_line("bench.length_groups", argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "threads": threads, "model": args.model, "task": args.task, "rows": args.rows,
              "batch": args.batch, "max_seq_length": args.max_seq_length, "groups": args.groups,
              "precision": "bf16" if bf16 else "fp32", "real_token_share": real,
              "epochs": {k: summary(v) for k, v in times.items()}, "length_groups_vs_one_forward": ratio}
    if args.out:
        write_json(args.out, report)
    print(f"real_token_share: {real:.2f}")
    print(f"length_groups_vs_one_forward: {ratio['value']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
