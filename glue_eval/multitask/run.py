"""``glue-eval --multitask CONFIG.json``: one student, many tasks, from the config to the saved folder and one row
per task plus the average.

    glue-eval --multitask tasks.json --model STUDENT --output_dir OUT [--compare SINGLE_TASK_OUT] [Trainer flags]

OUT/result.json holds every task's dev metrics, the average, the settings and the training record;
OUT/multitask.md the table (next to single-task runs' scores with ``--compare``); OUT/model the saved model
(:func:`glue_eval.multitask.model.load_multitask`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

from distill.common.errors import UsageError

from ..arguments import GlueArguments

# GlueArguments that a multi-task run has another place for (the config) or does not do.
NOT_HERE = {"task": "the tasks are the config's", "grid": "one multi-task run is one cell",
            "teacher": "teachers are per task: \"teacher\" in the config's task entries",
            "stages": "not for multi-task runs yet", "augment": "not for multi-task runs yet",
            "unlabelled_file": "not for multi-task runs yet", "predict_test": "not for multi-task runs yet"}


@dataclass
class MultitaskArguments(GlueArguments):
    multitask: str | None = field(default=None, metadata={
        "help": "Multi-task config (JSON, docs/multitask.md): tasks, heads, weights, teachers, sampling, schedule."})
    compare: str | None = field(default=None, metadata={
        "help": "A glue-eval output folder of single-task runs: their scores beside the multi-task ones."})


def parse(argv: list[str]):
    from distill.settings.arguments import DataclassParser

    from ..arguments import GlueTrainingArguments, apply_precision, precision_check

    parser = DataclassParser((MultitaskArguments, GlueTrainingArguments), prog="glue-eval --multitask",
                             description="Train one shared encoder with a head per task (docs/multitask.md).")
    try:
        glue, args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if not any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv):
        raise UsageError("--output_dir is required: the model, result.json and the table go there")
    if not glue.model:
        raise UsageError("--model is required: the shared encoder (a model folder, e.g. a distilled student)")
    for name, why in NOT_HERE.items():
        if getattr(glue, name):
            raise UsageError(f"--{name} does not go with --multitask: {why}")
    if args.length_groups > 1:
        raise UsageError(f"--length_groups {args.length_groups} does not go with --multitask (its loop runs each batch "
                         "as one forward): leave it at 1")
    unsupported = unsupported_training_flags(args)
    if unsupported:
        name, value = unsupported[0]
        raise UsageError(f"--{name} {value} does not go with --multitask (its own loop does not read it): leave it "
                         "at its default")
    fp16_asked = args.fp16
    args, line = apply_precision(glue, args)
    if args.fp16 and not fp16_asked and glue.precision == "auto":  # a GPU without bf16: auto would pick fp16
        import dataclasses

        args = dataclasses.replace(args, fp16=False)
        line = "precision: auto -> fp32 (--multitask trains in fp32 or bf16; this device has no bf16)"
    precision_check(args)
    if args.fp16:
        raise UsageError("--multitask trains in fp32 or bf16: drop --fp16 (or give --precision bf16)")
    return glue, args, line


# Trainer flags the multi-task loop does not read (it has its own): refused when set, not silently ignored
UNREAD_TRAINING_FLAGS = ("gradient_accumulation_steps", "label_smoothing_factor", "optim", "optim_args",
                         "lr_scheduler_kwargs", "neftune_noise_alpha", "load_best_model_at_end", "eval_strategy",
                         "save_strategy", "train_sampling_strategy", "gradient_checkpointing", "torch_compile")


def unsupported_training_flags(args) -> list[tuple[str, object]]:
    """(flag, value) of :data:`UNREAD_TRAINING_FLAGS` set away from their defaults."""
    from ..record import fields_set

    return list(fields_set(args, UNREAD_TRAINING_FLAGS).items())


def check_distill_weights(weights: dict | None) -> None:
    """Multi-task distillation compares each task head's logits with its teacher's: terms on other features
    would need the shared encoder's layers matched to every teacher's."""
    from distill.objective import terms

    other = [n for n, w in (weights or {}).items() if w and terms.TERMS[n].feature != "logits"]
    if other:
        allowed = [n for n in terms.level_terms(sequence_level=True) if terms.TERMS[n].feature == "logits"]
        raise UsageError(f"distill_weights: {other[0]!r} compares intermediate features; a multi-task run takes the "
                         f"terms on the task logits: {', '.join(allowed)}")


def task_runs(config, glue, args, tokenizer):
    """Each task's tokenized train (with ``row``) and dev splits, as :class:`glue_eval.multitask.train.TaskRun`
    (an extractive-QA task's: windows of ``--doc_stride`` overlap, :func:`glue_eval.multitask.qa.qa_run_fields`)."""
    from ..data import check_sources, load_splits
    from ..encode import sequence_length, tokenize
    from .qa import qa_run_fields
    from .train import TaskRun

    for entry in config.tasks:
        check_sources(entry.task, ["train", *entry.task.dev_splits], glue.data_dir)
    length, note = sequence_length(glue, tokenizer)
    if note:
        print(f"note: {note}")
    runs = []
    for entry in config.tasks:
        task = entry.task
        splits = load_splits(task, ["train", *task.dev_splits], glue.data_dir, glue.skip_bad_rows)
        data = tokenize(task, splits, tokenizer, length, glue.doc_stride)
        if task.is_qa:
            runs.append(TaskRun(task=task, weight=entry.weight, **qa_run_fields(task, data, glue)))
            continue
        train = data["train"].remove_columns([*task.text_fields, "idx"])
        train = train.add_column("row", list(range(len(train))))
        dev = {s: data[s].remove_columns(["idx"]) for s in task.dev_splits}
        runs.append(TaskRun(task=task, weight=entry.weight, train=train, dev=dev))
    return runs


def regression_weights(weights: dict) -> dict:
    """The weights for a regression task's teacher: a soft-target term (kl, ce: class distributions, 0 on one
    output) becomes the outputs' MSE, as the study's single-task rows do; the rest as given."""
    from ..distillation import regression_terms, soft_terms

    out: dict = {}
    for name, weight in weights.items():
        key = regression_terms()[0] if name in soft_terms() else name
        out[key] = out.get(key, 0.0) + weight
    return out


def attach_teachers(runs, config, glue, args, model, collate) -> dict:
    """Each task with a teacher gets its objectives (the task stage's, on the logits; a QA task's on its start and
    end logits, :func:`glue_eval.multitask.qa.attach_qa_teacher`) and its teacher's logits over its training rows
    (the task stage's cache); returns a record per task."""
    from distill.objective import terms

    from ..distillation import load_teacher, stage_objectives
    from ..teacher_cache import CachePlan, TeacherCache
    from ..trainer import teacher_autocast
    from .qa import attach_qa_teacher

    weights = config.distill_weights or dict(terms.TASK_WEIGHTS)
    check_distill_weights(weights)
    record = {}
    for run in runs:
        path = config.entry(run.name).teacher
        if path is None:
            continue
        task_weights = regression_weights(weights) if run.task.is_regression else weights
        record[run.name] = {"teacher": path, "weights": task_weights}
        if run.task.is_qa:
            attach_qa_teacher(run, path, weights, glue, args, model, collate)
            record[run.name]["cached_rows"] = len(run.train) if run.soft is not None else 0
            continue
        teacher = load_teacher(path, run.task, eager=False)
        rows = model.encoder.get_input_embeddings().num_embeddings
        if teacher.get_input_embeddings().num_embeddings != rows:
            raise UsageError(f"task {run.name!r}: teacher {path!r} has another vocabulary than the student "
                             f"({teacher.get_input_embeddings().num_embeddings} vs {rows} tokens): both read the "
                             "same token ids")
        student = copy.deepcopy(model.encoder.config)
        student.num_labels = run.task.num_labels
        run.soft, run.hard = stage_objectives(task_weights, glue, student, teacher)
        if run.soft is not None:
            run.cache = TeacherCache.build(teacher.to(args.device), run.train, collate, CachePlan(),
                                           batch_size=args.per_device_eval_batch_size, device=args.device,
                                           autocast=lambda: teacher_autocast(args))
            run.soft.to(args.device)
        record[run.name]["cached_rows"] = len(run.train) if run.soft is not None else 0  # hard_ce alone: no cache
        del teacher
    return record


def comparison(folder: str | None) -> dict:
    """Task -> single-task score (percent): the median over seeds of the best learning rate and batch size."""
    if not folder:
        return {}
    from ..record import read_results
    from ..report import summarise

    records = read_results(folder)
    if not records:
        raise UsageError(f"--compare {folder!r} holds no glue-eval results (OUT/<task>/<cell>/result.json)")
    return {name: s["median_score"] for name, s in summarise(records).items()}


def table(scores: dict, single: dict) -> str:
    """One row per task plus the average (percent); single-task scores beside them where given."""
    head = "| task | dev metrics | multi-task | single-task | Δ |\n|---|---|---|---|---|"
    rows, pairs = [head], []
    for name, result in scores.items():
        metrics = "; ".join(" ".join(f"{m} {100 * v:.1f}" for m, v in split.items()) for split in result["dev"].values())
        mine, theirs = 100 * result["score"], single.get(name)
        if theirs is not None:
            pairs.append((mine, theirs))
        other = f"{theirs:.1f}" if theirs is not None else "—"
        delta = f"{mine - theirs:+.1f}" if theirs is not None else "—"
        rows.append(f"| {name} | {metrics} | {mine:.1f} | {other} | {delta} |")
    average = sum(100 * r["score"] for r in scores.values()) / len(scores)
    if pairs and len(pairs) == len(scores):
        theirs = sum(t for _, t in pairs) / len(pairs)
        rows.append(f"| **average** | | **{average:.1f}** | {theirs:.1f} | {average - theirs:+.1f} |")
    else:
        rows.append(f"| **average** | | **{average:.1f}** | | |")
    return "\n".join(rows) + "\n"


def settings_of(config, glue, args) -> dict:
    return {
        "config": config.path, "model": glue.model, "tasks": {e.task.name: {"weight": e.weight, "teacher": e.teacher,
                                                                           "head": e.head.to_json()}
                                                            for e in config.tasks},
        "sampling": vars(config.sampling), "schedule": vars(config.schedule), "gradient": config.gradient,
        "distill_weights": config.distill_weights, "temperature": glue.temperature,
        "max_seq_length": glue.max_seq_length, **qa_settings(config, glue), "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size, "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
        "seed": args.seed, "bf16": args.bf16,
    }


def qa_settings(config, glue) -> dict:
    """The windowing and decoding settings, when a task is extractive QA."""
    if not any(e.task.is_qa for e in config.tasks):
        return {}
    return {k: getattr(glue, k) for k in ("doc_stride", "max_answer_length", "n_best_size", "null_score_diff_threshold")}


def write_outputs(out: str, model, tokenizer, scores: dict, record: dict, settings: dict, single: dict,
                  predictions: dict | None = None) -> None:
    """OUT/model, OUT/result.json, OUT/multitask.md, and each QA task's answers per dev split (``predictions``:
    task -> split -> question id -> text) in OUT/predictions/<task>_<split>.json, as a single-task QA cell writes
    them."""
    from distill.common.io import atomic_write_text

    from .card import model_card
    from .model import save_multitask

    for name, by_split in (predictions or {}).items():
        for split, answers in by_split.items():
            atomic_write_text(os.path.join(out, "predictions", f"{name}_{split}.json"),
                              json.dumps(answers, indent=1, ensure_ascii=False) + "\n")

    card = model_card(model.tasks, scores, settings["model"], settings)
    save_multitask(model, os.path.join(out, "model"), tokenizer, card=card, extra={"dev": scores})
    average = sum(r["score"] for r in scores.values()) / len(scores)
    result = {"tasks": scores, "average": average, "single_task": single or None, "settings": settings,
              "train": record, "model_dir": "model"}
    atomic_write_text(os.path.join(out, "result.json"), json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(os.path.join(out, "multitask.md"), table(scores, single))


def main(argv: list[str]) -> int:
    from dataclasses import asdict

    from transformers import set_seed

    from ..encode import check_model_dir, load_tokenizer
    from ..model import check_vocabulary
    from ..qa import window_collator
    from .config import load_config
    from .model import build_multitask
    from .qa import check_qa_tasks
    from .train import evaluate_tasks, train_multitask

    glue, args, precision_line = parse(argv)
    config = load_config(glue.multitask or "")
    if config.distill_weights:
        check_distill_weights(config.distill_weights)
    check_qa_tasks(config, glue)
    if os.path.exists(os.path.join(args.output_dir, "result.json")) and not args.overwrite_output_dir:
        raise UsageError(f"{args.output_dir} already holds a multi-task result: use another --output_dir or pass "
                         "--overwrite_output_dir")
    single = comparison(glue.compare)
    check_model_dir(glue.model, glue.tokenizer)
    tokenizer = load_tokenizer(glue.model, glue.tokenizer)
    runs = task_runs(config, glue, args, tokenizer)
    set_seed(args.seed)  # before the model: the heads are drawn from this seed
    model = build_multitask(glue.model, config.tasks)
    check_vocabulary(tokenizer, model.encoder, glue.model)
    collate = window_collator(tokenizer)  # right padding: QA labels and offsets are token positions
    teachers = attach_teachers(runs, config, glue, args, model, collate)
    rank, world = _process()
    if precision_line and rank == 0:
        print(precision_line)
    trained = train_multitask(model, runs, config, args, collate, rank, world)
    scores = evaluate_tasks(model, runs, collate, args.per_device_eval_batch_size, args.device)
    predictions = {name: s.pop("predictions") for name, s in scores.items() if "predictions" in s}
    if rank == 0:
        record = {**asdict(trained), "examples": {r.name: len(r.train) for r in runs}, "teachers": teachers}
        write_outputs(args.output_dir, model, tokenizer, scores, record, settings_of(config, glue, args), single,
                      predictions)
        print(table(scores, single), end="")
        print(f"model: {args.output_dir}/model (load_multitask); results: {args.output_dir}/result.json")
    return 0


def _process() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
