"""The multi-task study: one 3-layer student for the three local tasks against three single-task students of the
same encoder, with and without a teacher per task. Real encoder, real tasks, offline.

Run from the repository root::

    python -m bench.prepare_study_data          # once: the local tasks and the converted paraphrase-MiniLM-L3-v2
    python -m bench.study_multitask --quick     # every row on tiny subsets, 1 seed (about 10-15 min on 2 cores)
    python -m bench.study_multitask             # the full study: 3 seeds

Rows: the teacher (all-MiniLM-L6-v2 fine-tuned on each task: the per-task teachers); single-task students (the
encoder fine-tuned on each task alone, one encoder per task); one multi-task student per schedule (``glue-eval
--multitask``): ``sum`` (meta-batches), ``per_task`` (one task per batch, proportional sampling), ``hybrid`` (sum
until the loss plateaus, then per-task with a sum step every N), ``pcgrad`` (meta-batches, PCGrad); then each of
those again with every task's teacher (the teacher row's model fine-tuned on that task with the same seed; its
soft targets kl + hard_ce at T=1, as bench/study.py's task-KD rows). Fine-tuning settings are bench/study.py's
(lr 1e-4, batch 32, 2 epochs, warm-up 10%, weight decay 0.01, max_seq_length 64, the first 1000 training
examples of each task); a multi-task epoch sees every task's examples once, as the three single-task runs do.

The encoder is the real paraphrase-MiniLM-L3-v2 (3 layers, 384 wide: docs/study.md's student shape), which
prepare_study_data.py converts from a PyPI wheel: it needs no distillation run (docs/study.md's distilled 3-layer
students are not cached anywhere offline and cost 35-60 min each). ``--encoder FOLDER`` takes any other.

Every finished cell is cached under ``--work_dir`` (glue-eval's grid cells for the teacher and single-task rows,
one folder per multi-task run and seed): a rerun skips what is done, a killed run continues. Seed 1 of every row
runs before seeds 2 and 3, the single-task and the plain multi-task rows first, so a run stopped early still
reports. ``--report_only`` writes the report from what is done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import study  # first of the toolkit: it sets the offline environment (bench/study.py's module top)
from bench import carry
from bench.prepare_study_data import L3_NAME, default_cache_dir

MODES = ("sum", "per_task", "hybrid", "pcgrad")
MODE_LABELS = {"sum": "sum of the task losses (meta-batches)", "per_task": "one task per batch, proportional "
               "sampling", "hybrid": "hybrid (sum, then one task per batch)", "pcgrad": "PCGrad over meta-batches"}
# The hybrid schedule's plateau test, scaled to the run's length: the full run has about 190 steps, quick about 15
HYBRID = {"full": {"window": 8, "patience": 2, "sum_every": 10}, "quick": {"window": 2, "patience": 1, "sum_every": 3}}
PRESET_KEYS = ("seeds", "epochs", "max_train", "max_dev")  # bench/study.py's FULL / QUICK values of these
TARGET_POINTS = 0.5  # the multi-task student within this many points of the single-task students' average


# --- arguments --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets, 1 seed, 1 epoch (about 10-15 min on 2 cores)")
    p.add_argument("--teacher", default="offline:all-MiniLM-L6-v2", help="the per-task teachers' model, fine-tuned "
                   "on each task (hub id, folder, offline alias)")
    p.add_argument("--encoder", default="l3", help="the shared encoder of every student: a folder, or 'l3' (the "
                   "converted paraphrase-MiniLM-L3-v2 in CACHE/models)")
    p.add_argument("--tasks", default=",".join(study.LOCAL_TASKS),
                   help="comma list of classification tasks: polarity, uncertainty, bbc (prepared local tasks), GLUE "
                        "names (with --data_dir), or task spec .json")
    p.add_argument("--data_dir", default=None, help="local GLUE folder for GLUE task names")
    p.add_argument("--modes", default=",".join(MODES), help=f"multi-task rows, comma list of {', '.join(MODES)}")
    p.add_argument("--no_teachers", action="store_true", help="leave out the rows with a teacher per task")
    p.add_argument("--seeds", default=None, help="comma list (full: 1,2,3; quick: 1)")
    p.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (full 2, quick 1)")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="fine-tuning learning rate (all rows)")
    p.add_argument("--batch_size", type=int, default=32, help="fine-tuning batch size (per task batch)")
    p.add_argument("--max_seq_length", type=int, default=64, help="fine-tuning and evaluation truncation (tokens)")
    p.add_argument("--max_train", type=int, default=None, help="first N training examples of each task (full "
                   "1000, quick 160; 0: all)")
    p.add_argument("--max_dev", type=int, default=None, help="first N dev examples of each task (quick 160)")
    p.add_argument("--precision", default="auto", help="bf16, fp32 or auto (distill-train's choice for this machine)")
    p.add_argument("--cache_dir", default=None, help="the prepared data and models (prepare_study_data.py)")
    p.add_argument("--work_dir", default=None, help="cache of finished cells (default CACHE/runs-multitask or "
                   "CACHE/runs-multitask-quick)")
    p.add_argument("--out", default=None, help="writes OUT.md, OUT.json and OUT.png (default docs/study-multitask, "
                   "quick: docs/study-multitask-quick)")
    p.add_argument("--report_only", action="store_true", help="write the report from the finished cells only")
    p.add_argument("--no_carry", action="store_true",
                   help="run every cell here: carry none from the committed report OUT.json (bench/carry.py)")
    p.add_argument("--prepare", action="store_true", help="first prepare the local tasks and the L3 encoder "
                   "(prepare_study_data.py's steps, each skipped once done)")
    return p


def parse_args(argv=None):
    p = build_parser()
    ns = p.parse_args(argv)
    preset = study.QUICK if ns.quick else study.FULL
    for key in PRESET_KEYS:
        if getattr(ns, key) is None:
            setattr(ns, key, preset[key])
    ns.seed_list = [int(s) for s in str(ns.seeds).split(",") if s.strip()]
    ns.mode_list = [m.strip() for m in ns.modes.split(",") if m.strip()]
    bad = [m for m in ns.mode_list if m not in MODES]
    if bad or not ns.mode_list or not ns.seed_list:
        p.error(f"--modes {ns.modes!r} / --seeds {ns.seeds!r}: give modes from {', '.join(MODES)} and one seed or "
                "more, e.g. --modes sum,pcgrad --seeds 1,2")
    ns.cache_dir = ns.cache_dir or default_cache_dir()
    ns.work_dir = ns.work_dir or os.path.join(ns.cache_dir, "runs-multitask" + ("-quick" if ns.quick else ""))
    ns.out = ns.out or ("docs/study-multitask" + ("-quick" if ns.quick else ""))
    ns.encoder_path = os.path.join(ns.cache_dir, "models", L3_NAME) if ns.encoder == "l3" else ns.encoder
    # what bench.study's functions read: the teacher models are kept for the KD rows; no term reads a layer map
    ns.task_kd, ns.layer_map = not ns.no_teachers, "init"
    return ns


# --- rows ---------------------------------------------------------------------------------------

def make_rows(ns) -> list[dict]:
    """The table's rows, in its order: the teacher, the single-task students, the multi-task students; then the
    same students with a teacher per task. ``kind``: teacher, single (glue-eval cells, bench.study's) or multitask
    (one glue-eval --multitask run per seed)."""
    rows = [{"name": "teacher", "label": f"teacher ({ns.teacher.split(':')[-1]}), one per task", "kind": "teacher"},
            {"name": "single", "label": "single-task students (one encoder per task)", "kind": "single",
             "path": ns.encoder_path}]
    rows += [{"name": f"mt_{m}", "label": f"multi-task: {MODE_LABELS[m]}", "kind": "multitask", "mode": m}
             for m in ns.mode_list]
    if ns.no_teachers:
        return rows
    # bench.study's task-KD rows: kl + hard_ce from the teacher of the same task and seed; "layers" only because
    # its fine-tuning reads one (no term here reads a layer map)
    rows.append({"name": "single_kd", "label": "single-task students + their task's teacher", "kind": "single",
                 "path": ns.encoder_path, "task_kd": list(study.TASK_KD_TERMS), "layers": "1,2,3"})
    rows += [{"name": f"mt_{m}_kd", "label": f"multi-task: {MODE_LABELS[m]} + a teacher per task",
              "kind": "multitask", "mode": m, "teachers": True} for m in ns.mode_list]
    return rows


def priority(row: dict) -> int:
    """0: the first question (single-task students against one multi-task student, the plain sum); 1: the
    teachers, then the second question (the same multi-task student with its teachers); 2: the other schedules;
    3: the other rows with teachers."""
    if row["name"] in ("single", "mt_sum"):
        return 0
    if row["kind"] == "teacher" or row["name"] == "mt_sum_kd":
        return 1
    return 2 if not (row.get("teachers") or row.get("task_kd")) else 3


def execution_plan(rows, ns) -> list[tuple[int, dict]]:
    """(seed, row): seed 1 of every row before seed 2 of any, each seed in :func:`priority` order (the teacher
    before every row that reads it)."""
    ranked = [r for _, r in sorted(enumerate(rows), key=lambda item: (priority(item[1]), item[0]))]
    return [(seed, row) for seed in ns.seed_list for row in ranked]


def task_sources(names: list[str], tasks, ns) -> dict:
    """Task name -> what a multi-task config names for it: the subset's spec (bench.study's), a prepared local
    task's spec, a spec file, or a GLUE name (with --data_dir)."""
    out = {}
    for given, task in zip(names, tasks):
        if ns.max_train or ns.max_dev:
            out[task.name] = study.subset_spec_path(task.name, ns)
        elif given in study.LOCAL_TASKS:
            out[task.name] = os.path.join(ns.cache_dir, "data", given, f"{given}.json")
        else:
            out[task.name] = os.path.abspath(given) if given.endswith(".json") else given
    return out


def multitask_config(row: dict, seed: int, sources: dict, ns) -> dict:
    """The glue-eval --multitask config of a row and seed (each task's teacher: the teacher row's model of that
    task and seed)."""
    schedule = {"sum": "sum", "per_task": "per_task", "pcgrad": "sum",
                "hybrid": {"mode": "hybrid", **HYBRID["quick" if ns.quick else "full"]}}[row["mode"]]
    entries = []
    for name, source in sources.items():
        entry = {"task": source}
        if row.get("teachers"):
            entry["teacher"] = os.path.abspath(study.teacher_cell_model(SimpleNamespace(name=name), seed, ns))
        entries.append(entry)
    config = {"tasks": entries, "sampling": {"kind": "proportional"}, "schedule": schedule,
              "gradient": "pcgrad" if row["mode"] == "pcgrad" else "sum"}
    if row.get("teachers"):
        config["distill_weights"] = dict.fromkeys(study.TASK_KD_TERMS, 1.0)
    return config


# --- running ------------------------------------------------------------------------------------

def run_dir(row: dict, seed: int, ns) -> str:
    """A multi-task run's output folder: beside the single-task rows' cells, under the same fine-tuning key."""
    return os.path.join(study.finetune_dir(row, ns), f"seed{seed}")


def multitask_argv(config_path: str, out: str, row: dict, seed: int, ns) -> list[str]:
    """glue-eval --multitask's arguments: bench.study's fine-tuning settings (its finetune_cells)."""
    argv = ["--multitask", config_path, "--model", ns.encoder_path, "--output_dir", out, "--seed", str(seed),
            "--learning_rate", str(ns.learning_rate), "--per_device_train_batch_size", str(ns.batch_size),
            "--num_train_epochs", str(ns.epochs), "--warmup_steps", "0.1", "--weight_decay", "0.01",
            "--max_seq_length", str(ns.max_seq_length), "--precision", ns.train_precision, "--logging_steps", "10",
            "--disable_tqdm", "true", "--report_to", "none"]
    if ns.data_dir:
        argv += ["--data_dir", ns.data_dir]
    if row.get("teachers"):
        argv += ["--temperature", str(study.TASK_KD_TEMPERATURE)]
    return argv + ([] if torch.cuda.is_available() else ["--use_cpu"])


def run_multitask(row: dict, seed: int, sources: dict, ns) -> None:
    """One multi-task run (skipped when its result.json is there). Its parameter count goes to params.json and
    its model folder is removed (tens of MB a run; the scores are in result.json)."""
    from glue_eval.multitask.model import load_multitask
    from glue_eval.multitask.run import main as multitask_main

    out = run_dir(row, seed, ns)
    config_path = os.path.join(out, "config.json")
    wanted = {"config": multitask_config(row, seed, sources, ns), "argv": multitask_argv(config_path, out, row, seed, ns)}
    if os.path.isfile(os.path.join(out, "result.json")):
        check_same_run(out, wanted)
        return
    os.makedirs(out, exist_ok=True)
    Path(config_path).write_text(json.dumps(wanted["config"], indent=2) + "\n", encoding="utf-8")
    Path(out, SETTINGS_FILE).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    multitask_main(wanted["argv"])
    model = load_multitask(os.path.join(out, "model"))
    params = {"total": sum(p.numel() for p in model.parameters()),
              "heads": sum(p.numel() for p in model.heads.parameters())}
    Path(out, "params.json").write_text(json.dumps(params) + "\n", encoding="utf-8")
    shutil.rmtree(os.path.join(out, "model"))


SETTINGS_FILE = "study_settings.json"  # the config and the command a finished run was made with


def check_same_run(out: str, wanted: dict) -> None:
    """A finished run is reused only if it was made with this config and command (tasks, learning rate, batch,
    precision, schedule...); one line and exit otherwise. Runs finished before the file existed are taken as
    they are."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    made = json.loads(Path(path).read_text(encoding="utf-8"))
    for part in ("config", "argv"):
        if made.get(part) != wanted[part]:
            sys.exit(f"{out} holds a run made with another {part} ({made.get(part)!r} there, {wanted[part]!r} "
                     "now): give another --work_dir, or delete that folder to redo it")


def run_cell(row: dict, seed: int, tasks, sources: dict, ns) -> bool:
    """A row's cells of one seed: glue-eval's grid for the teacher and single-task rows (bench.study's
    finetune_cells), one glue-eval --multitask run for the others. Returns whether anything ran (False: all
    cached)."""
    if row["kind"] == "multitask":
        done = os.path.isfile(os.path.join(run_dir(row, seed, ns), "result.json"))
        run_multitask(row, seed, sources, ns)
        return not done
    done = len(study.collect_results([row], tasks, SimpleNamespace(**{**vars(ns), "seed_list": [seed]})).get(
        (row["name"], seed), {})) == len(tasks)
    folder = study.teacher_path(ns) if row["kind"] == "teacher" else row["path"]
    study.finetune_cells(row, folder, tasks, seed, ns)
    return not done


def multitask_results(rows, ns) -> dict:
    """(row name, seed) -> {task: score} from the finished multi-task runs, refusing runs of another encoder."""
    results = {}
    for row in (r for r in rows if r["kind"] == "multitask"):
        for seed in ns.seed_list:
            path = os.path.join(run_dir(row, seed, ns), "result.json")
            if not os.path.isfile(path):
                continue
            record = json.loads(Path(path).read_text(encoding="utf-8"))
            if os.path.realpath(record["settings"]["model"]) != os.path.realpath(ns.encoder_path):
                sys.exit(f"{path} is a run of encoder {record['settings']['model']}, not {ns.encoder_path}: give "
                         "another --work_dir")
            results[(row["name"], seed)] = {t: r["score"] for t, r in record["tasks"].items()}
    return results


def parameters(rows, tasks, ns) -> dict:
    """Row -> parameters of everything it deploys: a single-task row one fine-tuned encoder (with its pooler and
    classifier, as AutoModelForSequenceClassification builds them) per task; a multi-task row one encoder and a
    head per task (as saved)."""
    from transformers import AutoConfig

    out = {}
    for row in rows:
        if row["kind"] == "multitask":
            found = [Path(run_dir(row, s, ns), "params.json") for s in ns.seed_list]
            found = [json.loads(f.read_text(encoding="utf-8")) for f in found if f.is_file()]
            if found:
                out[row["name"]] = found[0]["total"]
            continue
        folder = study.teacher_path(ns) if row["kind"] == "teacher" else row["path"]
        if not os.path.isfile(os.path.join(folder, "config.json")):
            continue
        hidden = AutoConfig.from_pretrained(folder).hidden_size
        encoder = study.count_params(folder)["total"]
        out[row["name"]] = sum(encoder + (hidden + 1) * t.num_labels for t in tasks)
    return out


# --- the report ---------------------------------------------------------------------------------

def paired(a: dict, b: dict) -> tuple[float, float, int] | None:
    """Row ``a``'s average minus row ``b``'s on the seeds both finished (points): (mean, std, seeds) of the per-seed
    differences, or None when they share no seed."""
    b_by_seed = dict(zip(b["seeds"], b["avg_by_seed"]))
    diffs = [x - b_by_seed[s] for s, x in zip(a["seeds"], a["avg_by_seed"]) if s in b_by_seed]
    if not diffs:
        return None
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


def summarise(rows, tasks, results, params: dict, timings: dict, ns) -> list[dict]:
    """bench.study's summary (per task and average, mean and std over the seeds done, % of the teacher) plus each
    row's parameters, its share of the single-task students', its difference from them and from its own row
    without teachers (paired by seed), and its minutes per seed."""
    summary = study.summarise(rows, tasks, results, ns.seed_list)
    by = {r["name"]: r for r in summary}
    single = by.get("single")
    base = params.get("single")
    for r in summary:
        r["params"] = params.get(r["name"])
        r["params_share"] = r["params"] / base if r["params"] and base else None
        r["vs_single"] = paired(r, single) if single and r["avg"] is not None and single["avg"] is not None \
            and r["name"] != "single" else None
        plain = by.get(r["name"].removesuffix("_kd")) if r["name"].endswith("_kd") else None
        r["vs_plain"] = paired(r, plain) if plain and r["avg"] is not None and plain["avg"] is not None else None
        runs = [timings[k] for k in (f"finetune {r['name']} seed {s}" for s in ns.seed_list) if k in timings]
        # the median: one seed paused or sharing the machine with other work does not set the figure
        r["minutes_per_seed"] = statistics.median(runs) / 60 if runs else None
    return summary


def fmt_delta(d) -> str:
    if d is None:
        return "–"
    return f"{d[0]:+.1f}" + (f" ± {d[1]:.1f}" if d[2] > 1 else "")


def table_lines(summary, tasks) -> list[str]:
    head = ["model", "n", *[t.name for t in tasks], "average", "Δ single-task", "Δ teachers", "% of teacher",
            "params (M)", "share of single-task params", "min/seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["label"], str(len(r["seeds"])), *[study.fmt(r["scores"][t.name]) for t in tasks],
                 study.fmt(r["avg_by_seed"]), fmt_delta(r["vs_single"]), fmt_delta(r["vs_plain"]),
                 f"{r['retained']:.1f}" if r["retained"] is not None else "–",
                 f"{r['params'] / 1e6:.1f}" if r["params"] else "–",
                 f"{r['params_share']:.2f}" if r["params_share"] else "–",
                 f"{r['minutes_per_seed']:.1f}" if r["minutes_per_seed"] is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Scores are dev accuracy in % (each task's dev score), mean ± standard deviation over the "
                    "seeds; the average is per seed, then over seeds. Δ single-task: the row's average minus the "
                    "single-task students' on the same seeds (mean ± std of the per-seed differences); Δ teachers: "
                    "the row minus the same row without teachers, likewise. % of teacher: against the teachers on "
                    "the same seeds. Params: everything the row deploys for all tasks (single-task: one encoder "
                    "with its pooler and classifier per task; multi-task: one encoder and a head per task). "
                    "min/seed: wall clock of all tasks of one seed, the median over the seeds timed."]


def verdict(ns, met: bool, short: str) -> str:
    return " (quick mode: not a result)." if ns.quick else ": met." if met else f": not met ({short})."


def target_lines(summary, ns) -> list[str]:
    """The study's target: a multi-task student (no teachers) within 0.5 points of the single-task students'
    average, with a third of their parameters (one encoder instead of one per task)."""
    plain = [r for r in summary if r["kind"] == "multitask" and not r.get("teachers") and r["vs_single"]]
    if not plain:
        return []
    best = max(plain, key=lambda r: r["vs_single"][0])
    gap, share, k = best["vs_single"][0], best["params_share"], len(best["scores"])
    small = share is not None and share <= 1 / k + 0.01  # one encoder of k, plus its heads (well under 1%)
    short = ", ".join(x for x in (f"{-TARGET_POINTS - gap:.2f} points short" if gap < -TARGET_POINTS else "",
                                  "" if small else f"{share:.2f} of the parameters") if x)
    return [f"Target (a multi-task student within {TARGET_POINTS} points of the single-task students' average with "
            f"1/{k} of their parameters): the best is {best['label']} at {fmt_delta(best['vs_single'])} points over "
            f"{best['vs_single'][2]} seed(s), with {share:.2f} of their parameters"
            + verdict(ns, gap >= -TARGET_POINTS and small, short)]


def distillation_target(summary, ns) -> list[str]:
    """The study's second target: multi-task distillation (a teacher per task) above multi-task fine-tuning alone,
    schedule by schedule, each difference paired by seed; met when every schedule's mean difference is above 0."""
    pairs = [r for r in summary if r["kind"] == "multitask" and r.get("teachers") and r["vs_plain"]]
    if not pairs:
        return []
    above = [r for r in pairs if r["vs_plain"][0] > 0]
    clear = [r for r in pairs if r["vs_plain"][0] > r["vs_plain"][1]]
    low = min(pairs, key=lambda r: r["vs_plain"][0])
    return [f"Target (multi-task distillation above multi-task fine-tuning alone): a teacher per task raises the "
            f"average in {len(above)} of {len(pairs)} schedules ({len(clear)} by more than the seeds' spread; the "
            f"least {fmt_delta(low['vs_plain'])} points, {low['label']})"
            + verdict(ns, len(above) == len(pairs), f"{len(pairs) - len(above)} schedules not above")]


def findings(summary, ns) -> list[str]:
    """What the table says, each line computed from its numbers: every multi-task row against the single-task
    students, the target, and what the teachers add to each row."""
    by = {r["name"]: r for r in summary}
    single = by.get("single")
    if not single or single["avg"] is None:
        return ["The single-task students have no finished seed yet: no comparison possible."]
    lines = [f"Single-task students: {single['avg']:.1f} average over {len(single['seeds'])} seed(s) with "
             f"{single['params'] / 1e6:.1f}M parameters for {len(single['scores'])} tasks." if single["params"] else
             f"Single-task students: {single['avg']:.1f} average over {len(single['seeds'])} seed(s)."]
    for r in summary:
        if r["kind"] == "multitask" and r["vs_single"] and not r.get("teachers"):
            lines.append(f"{r['label']}: {r['avg']:.1f}, {fmt_delta(r['vs_single'])} points against the single-task "
                         f"students" + (f", {r['params_share']:.2f} of their parameters" if r["params_share"] else "")
                         + ".")
    lines += target_lines(summary, ns)
    for r in summary:
        if r["vs_plain"]:
            plain = by[r["name"].removesuffix("_kd")]
            lines.append(f"Teachers per task, {plain['label']}: {fmt_delta(r['vs_plain'])} points "
                         f"({r['avg']:.1f} against {plain['avg']:.1f}).")
    kd = [r for r in summary if r["kind"] == "multitask" and r.get("teachers") and r["vs_single"]]
    if kd:
        best = max(kd, key=lambda r: r["vs_single"][0])
        lines.append(f"Best multi-task student with teachers ({best['label']}) against the single-task students "
                     f"without: {fmt_delta(best['vs_single'])} points.")
    return lines + distillation_target(summary, ns)


def setup_lines(ns, tasks, summary) -> list[str]:
    import transformers

    from distill.common.hardware import describe_machine

    done = sorted({s for r in summary for s in r["seeds"]})
    hybrid = HYBRID["quick" if ns.quick else "full"]
    return [
        f"- Machine: {describe_machine()}; {torch.get_num_threads()} torch threads",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}",
        f"- Shared encoder: `{study.shown_path(ns.encoder_path, ns)}`; teachers: `{ns.teacher}` fine-tuned on each "
        f"task with the row's seed; tasks: {', '.join(t.name for t in tasks)}"
        + (f" (first {ns.max_train} examples of each train split" if ns.max_train else " (whole train splits")
        + (f", first {ns.max_dev} of each dev split)" if ns.max_dev else ", whole dev splits)"),
        f"- Fine-tuning (every row): lr {ns.learning_rate:g}, batch {ns.batch_size} per task batch, {ns.epochs:g} "
        f"epochs, warm-up 10%, weight decay 0.01, max_seq_length {ns.max_seq_length}, {ns.train_precision}; seeds "
        f"{','.join(map(str, done)) or '-'} of {','.join(map(str, ns.seed_list))}",
        "- Multi-task runs: `glue-eval --multitask` (docs/multitask.md), one linear head per task on the first "
        "token (dropout 0.1; the single-task students use transformers' pooler and classifier); an epoch is one "
        "pass over every task's batches; hybrid: sum steps until the mean summed loss of "
        f"{hybrid['window']} steps stops improving for {hybrid['patience']} window(s), then one task per batch with "
        f"a sum step every {hybrid['sum_every']} (its sum steps take a batch of every task, so it sees more "
        "batches than the per-task row)",
        f"- Teachers: kl + hard_ce at T={study.TASK_KD_TEMPERATURE:g}, weight 1 each (bench.study's task-KD rows), "
        "the teacher's logits cached once per training row",
    ]


def write_report(ns, rows, tasks, results, params: dict, timings: dict, command: str) -> None:
    """OUT.md (how it was made, the table, the findings), OUT.json (the same and every figure) and OUT.png."""
    from distill.common.hardware import machine_description
    from distill.common.io import atomic_write_text

    summary = summarise(rows, tasks, results, params, timings, ns)
    mode = "QUICK MODE (tiny subsets, 1 epoch: a smoke test of the pipeline, not a result)" if ns.quick else "full run"
    out = Path(ns.out)
    lines = [f"# Multi-task study: one student for {len(tasks)} tasks against one per task", "",
             f"**{mode}.** Generated by `python -m bench.study_multitask` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             "```", "python -m bench.prepare_study_data", command, "```", "", *setup_lines(ns, tasks, summary), ""]
    missing = [r["label"] for r in summary if len(r["seeds"]) < len(ns.seed_list)]
    if missing:
        lines += [f"**Incomplete:** {len(missing)} of {len(summary)} rows have fewer seeds than asked (column n): "
                  "the run was stopped before their cells, or is still going.", ""]
    if carry.note(getattr(ns, "carried", carry.EMPTY)):
        lines += [carry.note(ns.carried), ""]
    lines += table_lines(summary, tasks) + ["", "## Findings (computed from the table)", ""]
    if ns.quick:
        lines += ["Quick mode trains on 160 examples of each task for one epoch: scores sit near chance and the "
                  "lines below only show that every piece ran. Do not read them as results.", ""]
    lines += [f"- {x}" for x in findings(summary, ns)] + ["", f"![multi-task study]({out.name}.png)", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(out) + ".md", "\n".join(lines))
    atomic_write_text(str(out) + ".json", json.dumps({
        "mode": "quick" if ns.quick else "full", "command": command, "settings": study.report_settings(ns),
        **carry.json_fields(results, ns),
        "machine": {**machine_description(), "torch_threads": torch.get_num_threads()},
        "rows": summary, "findings": findings(summary, ns),
        "timings_s": {k: v for k, v in timings.items() if k.split(" ")[1] in {r["name"] for r in rows}},
    }, indent=2, default=str) + "\n")
    plot(summary, Path(str(out) + ".png"), ns)
    study.log(f"wrote {out}.md, {out}.png, {out}.json")


def plot(summary, path: Path, ns) -> None:
    """Each row's average (mean ± std over seeds), the single-task students' average and the target's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in summary if r["avg"] is not None]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(done) + 1.6))
    y = list(range(len(done)))[::-1]
    for yi, r in zip(y, done):
        color = {"teacher": "#222222", "single": "#999999"}.get(r["kind"], "#4c72b0")
        ax.barh(yi, r["avg"], xerr=r["avg_std"] if len(r["seeds"]) > 1 else None, color=color, capsize=3,
                height=0.7, hatch="//" if r.get("teachers") or r.get("task_kd") else None, edgecolor="white")
        ax.text(r["avg"] + (r["avg_std"] if len(r["seeds"]) > 1 else 0) + 0.3, yi, f"{r['avg']:.1f}", va="center",
                fontsize=8)
    single = next((r for r in done if r["name"] == "single"), None)
    if single:
        ax.axvline(single["avg"], color="black", lw=0.8)
        ax.axvline(single["avg"] - TARGET_POINTS, color="black", lw=0.8, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in done], fontsize=8)
    lo, hi = min(r["avg"] for r in done), max(r["avg"] + r["avg_std"] for r in done)
    ax.set_xlim(max(0.0, lo - 5), hi + 4)
    ax.set_xlabel("average dev accuracy over the tasks, % (mean ± std over seeds); solid line: single-task "
                  f"students, dashed: {TARGET_POINTS} below")
    ax.set_title(("[quick mode] " if ns.quick else "") + "One shared encoder for all tasks (blue) against one per "
                 "task (grey); hatched: with a teacher per task", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------

def report(ns, rows, tasks, state: dict, command: str) -> None:
    results = carry.merged({**study.collect_results([r for r in rows if r["kind"] != "multitask"], tasks, ns),
                            **multitask_results(rows, ns)}, getattr(ns, "carried", carry.EMPTY))
    known = state.setdefault("params", {})
    known.update(parameters([r for r in rows if r["name"] not in known], tasks, ns))
    write_report(ns, rows, tasks, results, known, state.get("timings", {}), command)


def main(argv=None) -> int:
    ns = parse_args(argv)
    ns.train_precision = study.auto_precision()[0] if ns.precision == "auto" else ns.precision
    # bench.study's form of the command (report-only flags out, paths shown without this machine's folders)
    command = "python -m bench.study_multitask" + study.run_command(argv if argv is not None else sys.argv[1:],
                                                                   ns).removeprefix("python -m bench.study")
    if ns.prepare:
        from bench.prepare_study_data import build_l3, prepare_tasks

        prepare_tasks(ns.cache_dir, 13)
        if ns.encoder == "l3":
            build_l3(ns.cache_dir)
    if not os.path.isfile(os.path.join(ns.encoder_path, "config.json")):
        sys.exit(f"--encoder {ns.encoder}: {ns.encoder_path} holds no model: run python -m bench.prepare_study_data "
                 "first (or give a model folder)")
    names = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    tasks = study.resolve_task_specs(ns)
    sources, rows = task_sources(names, tasks, ns), make_rows(ns)
    state = study.load_state(ns)
    ns.carried = carry.load(ns, study.report_settings(ns), study.log,
                            vars(build_parser().parse_args([])))  # cells finished on an earlier machine
    carry.into_state(state, ns.carried)
    timings = state.setdefault("timings", {})
    for seed, row in ([] if ns.report_only else execution_plan(rows, ns)):
        left = carry.tasks_left(row, seed, tasks, rows, ns.carried)
        if not left:
            continue
        t0 = time.perf_counter()
        if run_cell(row, seed, left, sources, ns):  # done now, not read from the cache
            spent = time.perf_counter() - t0
            if len(left) == len(tasks):  # a seed's minutes: only when all its tasks ran here
                timings[f"finetune {row['name']} seed {seed}"] = round(spent, 1)
            study.save_state(ns, state)
            report(ns, rows, tasks, state, command)
    report(ns, rows, tasks, state, command)
    if not ns.report_only:
        study.save_state(ns, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
