"""Serving the student: which backend is fastest within an accuracy budget, measured against the teacher.

    python -m bench.deploy --quick                  # the demo student, the polarity task; < 10 min on 2 cores
    python -m bench.deploy --out docs/deploy.json   # more rounds and epochs: the committed figures (idle machine)
    python -m bench.deploy --smoke                  # every path on tiny random models, seconds

The base is the teacher (all-MiniLM-L6-v2) in torch fp32. The student (the demo's 3-layer student,
``distill-train --max_steps 30``, or ``--student DIR``) runs in torch fp32, torch bf16 autocast
(where the CPU has native bf16), torch dynamic int8 (``torch.ao.quantization.quantize_dynamic``),
ONNX Runtime fp32 and ONNX Runtime int8 (the files ``distill-export`` writes). Timed: batch 1 of short
sentences (p50 and p95 latency of single calls) and batch 32 (sentences per second), forwards only
(inputs tokenised beforehand, the same for every side), in interleaved rounds (A B C, C B A, ...)
with every side on the same thread count and ONNX Runtime's thread spinning off (on, its idle
workers hold the cores that the torch side needs next). Accuracy: the student is fine-tuned on
the polarity task (Pang & Lee sentences, ``bench/prepare_study_data.py``) and its dev accuracy
read in every backend; embedding cosine to the student's fp32 on the dev sentences. The
recommendation is the fastest backend whose dev drop is within ``--budget`` points (default 0.5).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, log, machine, write_json

BACKENDS = ("torch_fp32", "torch_bf16", "torch_int8", "onnx_fp32", "onnx_int8")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="5 rounds, 1 fine-tuning epoch (< 10 min on 2 cores)")
    mode.add_argument("--smoke", action="store_true", help="tiny random models and task: every path, seconds")
    p.add_argument("--student", default=None, help="a sentence-transformers student folder (default: the demo's, "
                   "trained here with distill-train --max_steps 30)")
    p.add_argument("--teacher", default="offline:all-MiniLM-L6-v2", help="the base (default: the demo teacher)")
    p.add_argument("--task", default=None, help="glue-eval task spec of the dev task (default: the study's polarity)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 quick, 15 full)")
    p.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs on the task (default 1 quick, 3 full)")
    p.add_argument("--threads", type=int, default=None, help="threads of every side (default: the usable cores)")
    p.add_argument("--budget", type=float, default=0.5, help="accepted dev accuracy drop, points")
    p.add_argument("--cosine_floor", type=float, default=0.98, help="accepted embedding cosine (without a task)")
    p.add_argument("--work", default=None, help="folder for the student, classifier and exports (default: temporary)")
    p.add_argument("--out", default=None, help="JSON report (and its Markdown table beside it, as STEM-table.md)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------- the models


def demo_student(work: Path, steps: int = 30) -> str:
    """The README's demo student: distill-train's default recipe, cut to ``steps`` steps."""
    out = work / "demo-student"
    if not (out / "config.json").is_file():
        log(f"training the demo student ({steps} steps) -> {out.name}")
        subprocess.run([sys.executable, "-c", "from distill.cli import train_main; train_main()", "--max_steps",
                        str(steps), "--output_dir", str(out)], check=True)
    return str(out)


def fine_tune(student: str, spec: str, work: Path, epochs: float) -> str:
    """The student fine-tuned on the task with glue-eval (its saved classifier folder)."""
    from glue_eval.cli import main as glue_main

    out = work / "task"
    glue_main(["--model", student, "--task", spec, "--output_dir", str(out), "--num_train_epochs", str(epochs),
               "--learning_rate", "5e-5", "--seed", "1", "--per_device_train_batch_size", "32", "--save_model"])
    return str(next(out.glob("*/*/model")))


def smoke_models(work: Path) -> tuple[str, str, str]:
    """A 4-layer tiny teacher and a 2-layer student (sentence pipelines), and a tiny two-class task."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = "the a of and film good bad story long short not very it was is funny dull warm cold".split()
    (work / "vocab").mkdir(parents=True, exist_ok=True)
    (work / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tok = BertTokenizer.from_pretrained(str(work / "vocab"), model_max_length=64)
    folders = []
    for name, layers in (("teacher", 4), ("student", 2)):
        torch.manual_seed(layers)
        BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(work / name)
        tok.save_pretrained(work / name)
        write_pipeline(work / name)
        folders.append(str(work / name))
    rng = np.random.default_rng(0)
    rows = [(" ".join(rng.choice(words, size=rng.integers(3, 12))), str(i % 2)) for i in range(64)]
    for part in ("train", "dev"):
        (work / f"{part}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    spec = {"name": "toy", "train": "train.csv", "dev": "dev.csv", "text_columns": ["text"], "label_column": "label",
            "labels": ["0", "1"], "metric": "accuracy"}
    (work / "toy.json").write_text(json.dumps(spec))
    return folders[0], folders[1], str(work / "toy.json")


def write_pipeline(folder: Path) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    for sub in ("1_Pooling", "2_Normalize"):
        (folder / sub).mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_mean_tokens": True}))


def exported_copy(source: str, work: Path, name: str) -> str:
    """A copy of ``source`` with ``onnx/`` written by distill-export (the user's folder is not touched)."""
    from distill.export.onnx import export_folder

    target = work / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("onnx", "checkpoint-*"))
    export_folder(target, log=log)
    return str(target)


# --------------------------------------------------------------------------------------- the sides


def torch_side(model, folder: str, head: str, bf16: bool = False):
    """``fn(feed of numpy arrays) -> numpy output`` of a torch model through the exporter's own graph."""
    from distill.export.graphs import build_graph

    graph = build_graph(model.eval(), head, folder).eval()

    def run(feed):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = graph(**{k: torch.from_numpy(v) for k, v in feed.items() if k in graph.names})
        return (out[-1] if isinstance(out, tuple) else out).float().numpy()

    return run


def onnx_side(folder: str, which: str, threads: int):
    from distill.export.runtime import model_file, session

    sess = session(model_file(folder, which), threads=threads, spinning=False)
    names = [i.name for i in sess.get_inputs()]
    return lambda feed: sess.run(None, {k: feed[k] for k in names})[-1]


def sides(student: str, exported: str, head: str, threads: int, teacher: str | None = None,
          model_cls=None) -> dict:
    """Every backend of the student (and the teacher in torch fp32 when given) as ``fn(feed) -> output``."""
    from distill.common.hardware import CPU_BF16_FLAGS, read_cpu_flags

    def load(path):
        return model_cls.from_pretrained(path, dtype=torch.float32).eval()

    out = {}
    if teacher:
        out["teacher_fp32"] = torch_side(load(teacher), teacher, head)
    fp32 = load(student)
    out["torch_fp32"] = torch_side(fp32, student, head)
    if set(CPU_BF16_FLAGS) & (read_cpu_flags() or frozenset()):
        out["torch_bf16"] = torch_side(load(student), student, head, bf16=True)
    with warnings.catch_warnings():  # torch.ao's deprecation notice (torchao is its successor; still in torch 2.13)
        warnings.simplefilter("ignore", DeprecationWarning)
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    out["torch_int8"] = torch_side(int8, student, head)
    out["onnx_fp32"] = onnx_side(exported, "fp32", threads)
    out["onnx_int8"] = onnx_side(exported, "int8", threads)
    return out


def tokenised(tokenizer, texts) -> dict:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


# --------------------------------------------------------------------------------------- timing


def time_sides(fns: dict, singles: list, batches: list, rounds: int) -> dict:
    """Interleaved rounds (A B C, C B A, ...): each side runs every single-sentence feed (latency of each
    call) and every 32-sentence feed (sentences per second); one untimed pass of everything first."""
    for fn in fns.values():
        for feed in singles[:3] + batches[:1]:
            fn(feed)
    lat = {n: [] for n in fns}
    b32 = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for feed in singles:
                t0 = time.perf_counter()
                fns[name](feed)
                lat[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for feed in batches:
                fns[name](feed)
            b32[name].append(sum(len(f["input_ids"]) for f in batches) / (time.perf_counter() - t0))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * statistics.median(lat[n]):.1f} ms" for n in names))
    return {n: {"b1_p50_ms": 1e3 * float(np.percentile(lat[n], 50)), "b1_p95_ms": 1e3 * float(np.percentile(lat[n], 95)),
                "b32_sentences_per_s": float(statistics.median(b32[n])), "b1_calls": len(lat[n])} for n in names}


# --------------------------------------------------------------------------------------- accuracy


def cosines(fns: dict, feeds: list) -> dict:
    """Embedding cosine of every student backend to the student's torch fp32 (min and mean over sentences)."""
    ref = np.concatenate([fns["torch_fp32"](f) for f in feeds]).astype(np.float64)
    out = {}
    for name, fn in fns.items():
        got = np.concatenate([fn(f) for f in feeds]).astype(np.float64)
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        out[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    return out


def dev_accuracy(fns: dict, task, rows, tokenizer) -> dict:
    """Dev accuracy (percent) of the fine-tuned classifier in every backend, on the same tokenised batches, and
    how many dev predictions each backend changes against the student's torch fp32."""
    from glue_eval.backends import batches
    from glue_eval.metrics import compute_metrics, task_score

    data = [(tokenised_enc(enc), y) for enc, y in batches(task, rows, tokenizer, 128, 64)]
    labels = np.concatenate([y for _, y in data])
    out, flips, reference = {}, {}, None
    for name, fn in fns.items():
        logits = np.concatenate([fn(feed) for feed, _ in data])
        reference = logits if name == "torch_fp32" else reference  # the first side: the student's fp32
        out[name] = 100 * task_score(compute_metrics(task, logits, labels))
        flips[name] = int((logits.argmax(-1) != reference.argmax(-1)).sum())  # flips that cancel leave the score
    return out, flips


def tokenised_enc(enc) -> dict:
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


# --------------------------------------------------------------------------------------- the report


def recommend(speed: dict, accuracy: dict | None, cosine: dict, budget: float, floor: float) -> dict:
    """The fastest student backend within the budget: dev drop <= ``budget`` points (cosine >= ``floor`` without
    a task), at batch 1 (p50) and at batch 32 (throughput), with its speed-up over the teacher."""
    base = speed["teacher_fp32"]
    ok = {}
    for name in BACKENDS:
        if name not in speed:
            continue
        drop = None if accuracy is None else accuracy["torch_fp32"] - accuracy[name]
        ok[name] = (drop <= budget + 1e-9) if drop is not None else cosine[name]["cosine_min"] >= floor
    admissible = [n for n in ok if ok[n]]
    b1 = min(admissible, key=lambda n: speed[n]["b1_p50_ms"])
    b32 = max(admissible, key=lambda n: speed[n]["b32_sentences_per_s"])
    return {"admissible": ok, "best_backend_b1": b1, "best_backend_b32": b32,
            "best_vs_teacher_b1": base["b1_p50_ms"] / speed[b1]["b1_p50_ms"],
            "best_vs_teacher_b32": speed[b32]["b32_sentences_per_s"] / base["b32_sentences_per_s"],
            "rule": f"dev accuracy drop <= {budget:g} points" if accuracy is not None else f"cosine >= {floor:g}"}


def markdown(report: dict) -> str:
    speed, acc, cos = report["speed"], report.get("dev_accuracy") or {}, report["cosine"]
    base = speed["teacher_fp32"]
    lines = [f"Machine: {report['machine']['description']}; {report['threads']} threads per side.", "",
             "| backend | b1 p50 ms | b1 p95 ms | b32 sentences/s | vs teacher b1 | vs teacher b32 | "
             "embedding cosine (min) | dev accuracy | within budget |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in speed.items():
        ok = report["recommendation"]["admissible"].get(name)
        cells = [name, f"{s['b1_p50_ms']:.2f}", f"{s['b1_p95_ms']:.2f}", f"{s['b32_sentences_per_s']:.0f}",
                 f"{base['b1_p50_ms'] / s['b1_p50_ms']:.2f}x",
                 f"{s['b32_sentences_per_s'] / base['b32_sentences_per_s']:.2f}x",
                 f"{cos[name]['cosine_min']:.4f}" if name in cos else "-",
                 f"{acc[name]:.2f}" if name in acc else "-", "-" if ok is None else "yes" if ok else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figures(report: dict) -> dict:
    rec = report["recommendation"]
    acc = report.get("dev_accuracy")
    return {"best_backend_b1": rec["best_backend_b1"], "best_vs_teacher_b1": round(rec["best_vs_teacher_b1"], 2),
            "best_vs_teacher_b32": round(rec["best_vs_teacher_b32"], 2),
            "onnx_fp32_max_abs_diff": report["export"]["fp32_max_abs_diff"],
            "int8_dev_drop_points": None if acc is None else round(acc["torch_fp32"] - acc["onnx_int8"], 2)}


def prepare(args, work: Path) -> tuple[str, str, str]:
    """(teacher, student, task spec) folders and file for this mode."""
    from distill.common.assets import resolve_model_name

    if args.smoke:
        return smoke_models(work)
    student = args.student or demo_student(work)
    spec = args.task
    if spec is None:
        from bench.prepare_study_data import default_cache_dir, prepare_tasks

        spec = prepare_tasks(default_cache_dir(), seed=0)["polarity"]
    return resolve_model_name(args.teacher), student, spec


def measure(args, work: Path, threads: int) -> dict:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from glue_eval.data import load_splits
    from glue_eval.tasks import get_task

    teacher, student, spec = prepare(args, work)
    task = get_task(spec)
    dev = load_splits(task, ["validation"], None)["validation"]
    texts = list(dev[task.text_fields[0]])
    encoder = exported_copy(student, work, "student-onnx")
    tok = AutoTokenizer.from_pretrained(student)
    singles = [tokenised(tok, [t]) for t in sorted(texts, key=len)[: (8 if args.smoke else 32)]]  # short sentences
    batch32 = [tokenised(tok, texts[i:i + 32]) for i in range(0, 32 * (1 if args.smoke else 4), 32)]
    fns = sides(student, encoder, "sentence", threads, teacher=teacher, model_cls=AutoModel)
    cos = cosines({k: v for k, v in fns.items() if k != "teacher_fp32"},
                  [tokenised(tok, texts[i:i + 32]) for i in range(0, min(len(texts), 256), 32)])
    log(f"timing {len(fns)} sides, {args.rounds} rounds")
    speed = time_sides(fns, singles, batch32, args.rounds)
    del fns
    classifier = exported_copy(fine_tune(student, spec, work, args.epochs), work, "classifier-onnx")
    clf_fns = sides(classifier, classifier, "classifier", threads, model_cls=AutoModelForSequenceClassification)
    accuracy, flips = dev_accuracy(clf_fns, task, dev, AutoTokenizer.from_pretrained(classifier))
    export = json.loads((Path(encoder) / "onnx" / "export.json").read_text())
    clf_export = json.loads((Path(classifier) / "onnx" / "export.json").read_text())
    return {"speed": speed, "cosine": cos, "dev_accuracy": accuracy, "dev_prediction_flips": flips, "task": task.name,
            "dev_examples": len(texts),
            "export": {k: export[k] for k in ("fp32_max_abs_diff", "int8", "bf16", "versions")},
            "classifier_export": {k: clf_export[k] for k in ("fp32_max_abs_diff", "int8")}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.rounds = args.rounds or (2 if args.smoke else 5 if args.quick else 15)
    args.epochs = args.epochs or (1 if args.smoke or args.quick else 3)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="deploy-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = {"command": command_line("bench.deploy", argv), "machine": machine(), "threads": threads,
                  "timing": "forwards only, inputs tokenised beforehand; interleaved rounds; ONNX Runtime spinning off",
                  **measure(args, work, threads)}
    report["recommendation"] = recommend(report["speed"], report["dev_accuracy"], report["cosine"], args.budget,
                                         args.cosine_floor)
    report["figures"] = figures(report)
    report["seconds"] = round(time.time() - started, 1)
    table = markdown(report)
    print(table)
    if args.out:
        write_json(args.out, report)
        # beside the JSON, never over it: docs/deploy.json's table is docs/deploy-table.md, not the docs page
        Path(args.out).with_name(Path(args.out).stem + "-table.md").write_text(table, encoding="utf-8")
    for name, value in report["figures"].items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
