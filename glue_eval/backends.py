"""Evaluate an already fine-tuned classifier folder on a task's dev set in several backends, side by side.

    glue-eval --backend torch,onnx,onnx-int8 --model RUN/model --task sst2 --output_dir OUT

``torch`` is the folder in PyTorch fp32, as glue-eval's own evaluation runs it; ``onnx`` and
``onnx-int8`` are the files ``distill-export RUN/model`` wrote (``onnx/model.onnx`` and its int8
beside it), run by :class:`distill.export.runtime.OnnxClassifier`. Every backend reads the same
tokenised dev rows and is scored by the same metrics, so the table shows what the export costs.
Results go to ``OUT/backends/<task>.json`` and ``OUT/backends.md`` (outside the grid's
``OUT/<task>/<cell>/result.json`` layout, so ``glue-eval report`` is not confused by them).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from distill.common.errors import ArgumentParser, UsageError
from distill.common.io import atomic_write_text

from .metrics import compute_metrics, task_score
from .tasks import Task, resolve_tasks

BACKENDS = {"torch": "torch fp32", "onnx": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8"}
ONNX_FILES = {"onnx": "fp32", "onnx-int8": "int8"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="glue-eval --backend", description="Evaluate a fine-tuned classifier folder on dev "
                       "in torch and its ONNX exports (distill-export), side by side; no training.")
    p.add_argument("--backend", required=True, help="comma list of torch, onnx, onnx-int8")
    p.add_argument("--model", required=True, help="a fine-tuned classifier folder (glue-eval --save_model's <cell>/model)")
    p.add_argument("--task", required=True, help="a GLUE task, a comma list, or a local task spec .json")
    p.add_argument("--output_dir", "--output-dir", required=True, help="results go to OUT/backends/<task>.json")
    p.add_argument("--data_dir", default=None, help="local GLUE folder (default: the hub)")
    p.add_argument("--max_seq_length", type=int, default=128, help="longer inputs are truncated (tokens)")
    p.add_argument("--batch_size", type=int, default=64, help="rows per forward")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every backend (default: all usable)")
    p.add_argument("--skip_bad_rows", action="store_true", help="drop malformed TSV rows instead of stopping")
    return p


def parse_backends(spec: str) -> list[str]:
    names = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise UsageError(f"--backend {spec!r}: choose among {', '.join(BACKENDS)} (a comma list)")
    return names


def check_model(model: str, tasks: list[Task], backends: list[str]) -> None:
    """A fine-tuned classifier with each task's label count, exported where an ONNX backend is asked for."""
    from distill.models.loading import load_config

    from .encode import check_model_dir

    check_model_dir(model, None)
    config = load_config(model, "model")
    arch = (getattr(config, "architectures", None) or [""])[0]
    if not arch.endswith("ForSequenceClassification"):
        raise UsageError(f"--model {model!r} is a {arch or 'bare model'}, not a fine-tuned classifier: fine-tune it "
                         "first (glue-eval --save_model) and give <cell>/model")
    for task in tasks:
        if config.num_labels != task.num_labels:
            raise UsageError(f"--model {model!r} has {config.num_labels} labels but {task.name} has {task.num_labels}: "
                             "give the classifier fine-tuned on this task")
    if any(b in ONNX_FILES for b in backends):
        from distill.export.runtime import model_file

        for b in backends:
            if b in ONNX_FILES:
                model_file(model, ONNX_FILES[b])  # one line naming distill-export when the file is missing


def batches(task: Task, rows, tokenizer, max_seq_length: int, batch_size: int):
    """(tokenised padded batch as numpy, labels) over a dev split, in order."""
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        enc = tokenizer(*[part[f] for f in task.text_fields], padding=True, truncation=True,
                        max_length=max_seq_length, return_tensors="np")
        yield enc, np.asarray(part["label"])


def predictor(backend: str, model: str, threads: int | None, tokenizer):
    """``fn(tokenised batch) -> logits`` of one backend."""
    if backend == "torch":
        import torch
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        net = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()

        def run(enc):
            with torch.no_grad():
                return net(**{k: torch.from_numpy(np.asarray(v)) for k, v in enc.items()}).logits.numpy()

        return run
    from distill.export.runtime import OnnxClassifier

    clf = OnnxClassifier(model, ONNX_FILES[backend], threads=threads, tokenizer=tokenizer)
    return lambda enc: clf.logits(clf.feed(enc))


def evaluate(task: Task, dev: dict, backend: str, model: str, tokenizer, args) -> dict:
    """One backend on every dev split of ``task``: metrics (fractions), score, seconds."""
    run = predictor(backend, model, args.threads, tokenizer)
    metrics, seconds, examples = {}, 0.0, 0
    for split, rows in dev.items():
        logits, labels = [], []
        for enc, y in batches(task, rows, tokenizer, args.max_seq_length, args.batch_size):
            start = time.perf_counter()
            logits.append(run(enc))
            seconds += time.perf_counter() - start
            labels.append(y)
        metrics[split] = compute_metrics(task, np.concatenate(logits), np.concatenate(labels))
        examples += len(rows)
    scores = {split: task_score(m) for split, m in metrics.items()}
    return {"task": task.name, "backend": backend, "dev": metrics, "score": float(np.mean(list(scores.values()))),
            "examples": examples, "forward_seconds": round(seconds, 3)}


def table(records: list[dict]) -> str:
    """Markdown: one row per task, one column per backend (score, percent), the drop of each against torch."""
    backends = list(dict.fromkeys(r["backend"] for r in records))
    lines = ["| task | " + " | ".join(BACKENDS[b] for b in backends) + " | drop against torch (points) |",
             "|---|" + "---|" * len(backends) + "---|"]
    for task in dict.fromkeys(r["task"] for r in records):
        row = {r["backend"]: r for r in records if r["task"] == task}
        base = row.get("torch")
        drops = [f"{b}: {100 * (base['score'] - row[b]['score']):+.2f}" for b in backends if base and b != "torch"]
        lines.append(f"| {task} | " + " | ".join(f"{100 * row[b]['score']:.2f}" for b in backends)
                     + f" | {'; '.join(drops) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    backends = parse_backends(args.backend)
    tasks = resolve_tasks(args.task)
    check_model(args.model, tasks, backends)
    from .data import check_sources, load_splits
    from .encode import load_tokenizer

    for task in tasks:
        check_sources(task, task.dev_splits, args.data_dir)
    tokenizer = load_tokenizer(args.model, None)
    records = []
    for task in tasks:
        dev = load_splits(task, list(task.dev_splits), args.data_dir, args.skip_bad_rows)
        for backend in backends:
            record = evaluate(task, dev, backend, args.model, tokenizer, args)
            print(f"{task.name} {BACKENDS[backend]}: " + ", ".join(
                f"{split} " + " ".join(f"{k} {100 * v:.2f}" for k, v in m.items()) for split, m in record["dev"].items())
                + f" ({record['forward_seconds']:.1f} s of forwards)", file=sys.stderr)
            records.append(record)
        task_records = [r for r in records if r["task"] == task.name]
        atomic_write_text(os.path.join(args.output_dir, "backends", f"{task.name}.json"),
                          json.dumps({"model": args.model, "results": task_records}, indent=2) + "\n")
    md = table(records)
    atomic_write_text(os.path.join(args.output_dir, "backends.md"), f"# {args.model}: dev scores by backend\n\n" + md)
    print(md, end="")
    return 0
