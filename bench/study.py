"""The distillation study: what task-agnostic and task distillation buy a 3-layer student of a real teacher, which
objective pays (hidden states and attention, MiniLMv2's relations, calibrated weights), and how much the
initialisation matters. Real teacher, real corpus, real tasks, offline.

Run from the repository root (``bench/study.sh [ARGS]`` does the first two steps in one)::

    python -m bench.prepare_study_data          # once: fetch the packages, write the splits and corpus, build L3
    python -m bench.study --quick               # every piece on tiny subsets, 1 seed, 15 steps (under 15 min)
    python -m bench.study                       # the full study (under 3 hours on 2 CPU cores)
    python -m bench.study --study mpnet         # 12 layers into 4: all-mpnet-base-v2 into 4 and 6 layers
                                                # (docs/study-mpnet.md; bench/study_mpnet.py; about 11 hours)

    # the same with hub models and GLUE, where they can be had:
    python -m bench.study --teacher bert-base-uncased --tasks sst2,mrpc --data_dir GLUE_DIR \
        --inits 1,5,8,12 2,4,6,8,10,12 --reference none --work_dir runs/study-bert --out runs/study-bert/study

Rows (the model list is a parameter): the teacher fine-tuned; for each initialisation (teacher
layers, ``--inits``) a student fine-tuned without distillation; for the first initialisation also
students fine-tuned after task-agnostic distillation with each objective of ``--objectives``
(``OBJECTIVE@cal``: its terms with the weights ``distill-train --calibrate`` suggests, measured
first with the same recipe), and ``--task_kd`` rows: one of those students fine-tuned with task
distillation (``glue-eval --teacher``), optionally on the training set plus ``--augment``
variants of every example (TinyBERT's augmented task stage); a randomly initialised student of
the same shape (floor); and ``--reference`` (default: the real paraphrase-MiniLM-L3-v2,
converted by prepare_study_data.py) as an outside student. The distillation corpus is, by
default, prepare_study_data.py's agnostic corpus (dev examples kept out). Columns: dev score
per task (mean and standard deviation over ``--seeds``), their average, percent of the
teacher's average, parameters, inference speed-up over the teacher (examples/s, batch 32 and
batch 1, seq 128, the same threads, fp32, interleaved repeats), and each row's measured
compute (distillation minutes and tokens, fine-tuning minutes per seed).

Every finished piece is cached under ``--work_dir`` (distilled students, calibrations, fine-tuning
cells through glue-eval's grid, augmented sets, speed figures): a rerun skips what is done, a
killed run continues (a distillation from its last checkpoint). Fine-tuning runs seed by seed
(every row with seed 1, then every row with seed 2, ...), so a run stopped early still gives a
whole table with fewer seeds. ``--report_only`` writes the table from what is done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from bench import carry  # noqa: E402
from bench.prepare_study_data import CORPUS_FILE, L3_NAME, default_cache_dir  # noqa: E402
from distill.common.hardware import describe_machine, machine_description  # noqa: E402
from distill.objective import terms as term_registry  # noqa: E402

OBJECTIVES = {"none": None, "cos": {"cos": 1.0}, "att_mse": {"att_mse": 1.0},
              "hid_mse+att_mse": {"hid_mse": 1.0, "att_mse": 1.0},
              "cos+hid_mse+att_mse": {"cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0},
              "qq_rel+kk_rel+vv_rel": {"qq_rel": 1.0, "kk_rel": 1.0, "vv_rel": 1.0},
              "sent_mse": {"sent_mse": 1.0}, "sent_mse+hid_mse": {"sent_mse": 1.0, "hid_mse": 1.0},
              "hid_mse+att_mse+sent_mse": {"hid_mse": 1.0, "att_mse": 1.0, "sent_mse": 1.0}}
# OBJECTIVE@cal: the same terms with the weights distill-train --calibrate suggests for them (equal gradient shares),
# measured once per distillation setting on CALIBRATE_BATCHES batches of the distillation corpus
CALIBRATED = "@cal"
CALIBRATE_BATCHES = {"full": 8, "quick": 2}
LOCAL_TASKS = ("polarity", "uncertainty", "bbc")
# Task distillation (TinyBERT's second stage) in the study's KD rows: glue-eval --teacher, by default with its
# default terms kl + hard_ce at T=1, each weight 1 (regression tasks such as STS-B: the raw outputs' MSE, out_mse,
# instead of kl or ce; hard_ce is then the label MSE). hid_mse/att_mse use the row's layer map.
TASK_KD_TERMS = tuple(term_registry.TASK_WEIGHTS)
MAPPED_TERMS = term_registry.select(layers="map")  # the terms that read a row's layer map
TASK_KD_TEMPERATURE = 1.0

FULL = dict(seeds="1,2,3", distill_steps=1500, distill_batch=16, epochs=2.0, max_train=1000, max_dev=None, augment=4)
QUICK = dict(seeds="1", distill_steps=15, distill_batch=8, epochs=1.0, max_train=160, max_dev=160, augment=1)
# The studies (--study): each one's models and rows, under the flags left unset. "minilm" is the study of
# docs/study.md (a 6-layer, 384-wide teacher into 3 layers); "mpnet" a 12-layer teacher into 4 and 6 layers, docs/study-mpnet.md: the
# 12-layer, 768-wide all-mpnet-base-v2 into 4 layers (1,5,8,12, the seed report's; 3,6,9,12) and 6 layers, every
# intermediate term mapped to the layers each student was copied from (the seed report's map), and the real
# all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 as references ("l3": prepare_study_data.py's converted folder).
STUDIES = {
    "minilm": dict(teacher="offline:all-MiniLM-L6-v2", inits=["2,4,6", "1,2,3", "4,5,6"],
                   objectives="none,cos,hid_mse+att_mse,hid_mse+att_mse@cal,qq_rel+kk_rel+vv_rel",
                   other_objectives="none", layer_map="uniform", reference="auto", out="docs/study", length_groups=1,
                   extra_objectives=""),
    "mpnet": dict(teacher="offline:all-mpnet-base-v2", inits=["1,5,8,12", "3,6,9,12", "2,4,6,8,10,12"],
                  objectives="none,hid_mse+att_mse,sent_mse,qq_rel+kk_rel+vv_rel", other_objectives="same",
                  layer_map="init", reference="offline:all-MiniLM-L6-v2,l3", out="docs/study-mpnet", length_groups=3,
                  # beyond the study's own rows, run after them: the terms of the shipped recipe
                  # (student_configs/mpnet_4l_1-5-8-12.json), weighted as it was, by distill-train --calibrate
                  extra_objectives="hid_mse+att_mse+sent_mse@cal"),
}
# Per-study presets where they differ from FULL / QUICK. mpnet's distillation budget: 150 steps of 16 x 128 tokens
# (307k tokens a row), sized from a measured 12 -> 4 layer hid_mse+att_mse step in bf16 (docs/study-mpnet.md says
# how); 2 augmented variants per example, as the teacher labels every variant.
STUDY_PRESETS = {("mpnet", "full"): dict(distill_steps=150, augment=2), ("mpnet", "quick"): dict(distill_steps=10)}
# The augmented task-KD row of the mpnet study: the first init's hid_mse+att_mse student (the last study's best
# task-agnostic objective), with TinyBERT's whole second stage
MPNET_TASK_KD = "hid_mse+att_mse:kl+hard_ce+hid_mse+att_mse:aug"


def objective_base(obj: str) -> str:
    """The term list of an objective name (OBJECTIVE or OBJECTIVE@cal)."""
    return obj[:-len(CALIBRATED)] if obj.endswith(CALIBRATED) else obj


def objective_weights(obj: str) -> dict | None:
    """The configured weights of an objective (for OBJECTIVE@cal: those calibration starts from)."""
    return OBJECTIVES[objective_base(obj)]


# --- arguments --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets, 1 seed, short distillation (under 15 min)")
    p.add_argument("--study", choices=sorted(STUDIES), default="minilm",
                   help="which study's models and rows fill the flags left unset: minilm (docs/study.md: "
                        "all-MiniLM-L6-v2 into 3 layers) or mpnet (docs/study-mpnet.md: all-mpnet-base-v2 into 4 "
                        "and 6 layers)")
    p.add_argument("--teacher", default=None, help="hub id, folder, or an offline alias (minilm: "
                   "offline:all-MiniLM-L6-v2; mpnet: offline:all-mpnet-base-v2)")
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS),
                   help="comma list: polarity, uncertainty, bbc (prepared local tasks), GLUE names, or task spec .json")
    p.add_argument("--data_dir", default=None, help="local GLUE folder for GLUE task names (default: the hub)")
    p.add_argument("--inits", nargs="+", default=None,
                   help="teacher layers of each student init (minilm: 2,4,6 1,2,3 4,5,6; mpnet: 1,5,8,12 3,6,9,12 "
                        "2,4,6,8,10,12)")
    p.add_argument("--objectives", default=None,
                   help=f"rows of the first init: comma list of {', '.join(OBJECTIVES)} ('none': fine-tuned without "
                        f"distillation), each also as OBJECTIVE{CALIBRATED} (its terms with the weights "
                        "distill-train --calibrate suggests); minilm: none,cos,hid_mse+att_mse,hid_mse+att_mse@cal,"
                        "qq_rel+kk_rel+vv_rel; mpnet: none,hid_mse+att_mse,sent_mse,qq_rel+kk_rel+vv_rel")
    p.add_argument("--extra_objectives", default=None,
                   help="more rows of the first init, the same choices, run after every other row (a study's own "
                        "questions are answered first); '' for none; minilm: none; mpnet: hid_mse+att_mse+sent_mse@cal "
                        "(the terms of student_configs/mpnet_4l_1-5-8-12.json, calibrated as that recipe was)")
    p.add_argument("--other_objectives", default=None,
                   help="rows of every other init, the same choices ('same': those of --objectives); minilm: none "
                        "(the last study measured their distilled rows); mpnet: same")
    p.add_argument("--layer_map", default=None,
                   help="which teacher layer each student layer's hid_mse/att_mse term targets: 'uniform' (student "
                        "layer i <-> teacher layer i*Lt/Ls, e.g. 2,4,6 for 6 -> 3, whatever the initialisation) or "
                        "'init' (the layers the student was copied from: for 1,2,3 these terms then start at zero); "
                        "minilm: uniform; mpnet: init (the seed report's map)")
    p.add_argument("--task_kd", nargs="*", default=None, metavar="INIT:OBJECTIVE[:TERMS[:aug]]",
                   help="extra rows: the student of INIT distilled with OBJECTIVE, then fine-tuned with task "
                        "distillation from the teacher fine-tuned on the same task and seed; TERMS: glue-eval "
                        "--teacher terms joined by + (default kl+hard_ce, T=1; e.g. kl+hard_ce+hid_mse+att_mse for "
                        "TinyBERT's whole second stage); aug: on the training set plus --augment variants of each "
                        "example (TinyBERT's augmentation); default: the first init's hid_mse+att_mse and "
                        "qq_rel+kk_rel+vv_rel students with kl+hard_ce+hid_mse+att_mse, and the latter again with "
                        "aug (each when its objective is in --objectives); give no value for none")
    p.add_argument("--augment", type=int, default=None,
                   help="variants per training example in the task-KD rows marked aug (glue-eval --augment; full 4, "
                        "quick 1)")
    p.add_argument("--relation_heads", type=int, default=None,
                   help="relation heads of qq_rel/kk_rel/vv_rel (default: distill-train's, MiniLMv2's 48)")
    p.add_argument("--reference", default=None,
                   help="outside student folders (or hub ids, offline aliases), comma list; 'l3': the converted "
                        "paraphrase-MiniLM-L3-v2; 'auto': that one when the teacher is the offline MiniLM; 'none' to "
                        "skip (minilm: auto; mpnet: offline:all-MiniLM-L6-v2,l3)")
    p.add_argument("--no_random", action="store_true", help="skip the randomly initialised floor")
    p.add_argument("--seeds", default=None, help="fine-tuning seeds, comma list (full: 1,2,3; quick: 1)")
    p.add_argument("--corpus", default=None,
                   help="distillation corpus (distill-train's corpus; default: prepare_study_data.py's agnostic "
                        "corpus, CACHE/corpus/agnostic.txt, when prepared, else offline:wikipedia-extract)")
    p.add_argument("--distill_steps", type=int, default=None, help="optimiser steps per distillation (full 1500)")
    p.add_argument("--distill_batch", type=int, default=None, help="sequences of --block_size tokens per step (full 16)")
    p.add_argument("--block_size", type=int, default=128, help="distillation sequence length (tokens, packed)")
    p.add_argument("--data_cache", default=None, help="tokenised-corpus cache (default: distill-train's)")
    p.add_argument("--distill_lr", type=float, default=1e-4, help="distillation peak learning rate")
    p.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs (full 2)")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="fine-tuning learning rate (all rows)")
    p.add_argument("--batch_size", type=int, default=32, help="fine-tuning batch size")
    p.add_argument("--max_seq_length", type=int, default=64, help="fine-tuning and evaluation truncation (tokens)")
    p.add_argument("--length_groups", type=int, default=None, help="glue-eval --length_groups of every fine-tuning "
                   "(minilm 1, as docs/study.md ran; mpnet 3: short sentences, half padding in one batch)")
    p.add_argument("--max_train", type=int, default=None, help="use the first N training examples of each task (full 1000, quick 160; 0: all)")
    p.add_argument("--max_dev", type=int, default=None, help="use the first N dev examples of each task")
    p.add_argument("--precision", default="auto",
                   help="bf16, fp32 or auto (distill-train's auto: bf16 on a CPU with bf16 instructions or a bf16 GPU, "
                        "fp16 O2 on an older GPU, else fp32)")
    add_run_flags(p)
    return p


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the run's pieces and report go, and what it does (report only, carry, prepare, measure again)."""
    p.add_argument("--cache_dir", default=None, help="the prepared data and models (prepare_study_data.py)")
    p.add_argument("--work_dir", default=None, help="cache of finished pieces (default CACHE/runs or CACHE/runs-quick)")
    p.add_argument("--out", default=None, help="writes OUT.md, OUT.png and OUT.json (docs/study, docs/study-mpnet; "
                                               "--quick: docs/study-quick, docs/study-mpnet-quick)")
    p.add_argument("--teacher_fp32", action="store_true",
                   help="distil with distill-train --teacher_fp32 (the teacher's forward in fp32 under a bf16 run): "
                        "what the bf16 teacher moves in a cell (a work dir and a report of its own: CACHE/runs-t32, OUT-t32)")
    p.add_argument("--report_only", action="store_true", help="write the report from the finished pieces only")
    p.add_argument("--no_carry", action="store_true",
                   help="run every cell here: carry none from the committed report OUT.json (bench/carry.py)")
    p.add_argument("--prepare", action="store_true",
                   help="first prepare what the run uses from prepare_study_data.py (the local tasks, the L3 "
                        "reference), each step skipped once done (bench/study.sh passes this)")
    p.add_argument("--skip_speed", action="store_true", help="do not measure inference speed")
    p.add_argument("--remeasure_speed", action="store_true",
                   help="measure the inference speed again (e.g. on a quieter machine), then write the report")
    p.add_argument("--remeasure_distill", type=int, default=0, metavar="N",
                   help="run N distillation steps of each distilled row's recipe with this checkout's engine, "
                        "record its tokens/s and the full run's time at those rates, then write the report")


def fill_and_check(p, ns) -> None:
    """--remeasure_distill's minimum, the presets under unset flags, the seed and objective lists (each objective
    known, a calibrated one with two or more terms)."""
    if ns.remeasure_distill and ns.remeasure_distill < 4:
        p.error(f"--remeasure_distill {ns.remeasure_distill}: give 4 steps or more (the first logged quarter is "
                "warm-up and left out), e.g. 60")
    mode = "quick" if ns.quick else "full"
    preset = {**STUDIES[ns.study], **(QUICK if ns.quick else FULL), **STUDY_PRESETS.get((ns.study, mode), {})}
    for k, v in preset.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)
    ns.seed_list = [int(s) for s in str(ns.seeds).split(",") if s.strip()]
    ns.objective_list = [o.strip() for o in ns.objectives.split(",") if o.strip()]
    ns.other_objective_list = (ns.objective_list if ns.other_objectives == "same" else
                               [o.strip() for o in ns.other_objectives.split(",") if o.strip()])
    ns.extra_objective_list = [o.strip() for o in ns.extra_objectives.split(",")
                               if o.strip() and o.strip() not in ns.objective_list]
    for flag, objs in (("--objectives", ns.objective_list), ("--other_objectives", ns.other_objective_list),
                       ("--extra_objectives", ns.extra_objective_list)):
        for o in objs:
            if objective_base(o) not in OBJECTIVES or o == "none" + CALIBRATED:
                p.error(f"{flag}: unknown objective {o!r}: choose from {', '.join(OBJECTIVES)}, each distillation "
                        f"objective also as OBJECTIVE{CALIBRATED}")
            if o.endswith(CALIBRATED) and len(objective_weights(o)) < 2:
                p.error(f"{flag}: {o!r} has one term: calibration balances two or more; drop {CALIBRATED}")


def task_kd_rows(p, ns) -> None:
    """``ns.kd_rows`` from --task_kd (its default when not given): ``(init, objective, terms, augmented)`` each,
    every part checked against the rows it extends."""
    if ns.task_kd is None and ns.study == "mpnet":
        ns.task_kd = [f"{ns.inits[0]}:{MPNET_TASK_KD}"] if MPNET_TASK_KD.split(":")[0] in ns.objective_list else []
    if ns.task_kd is None:
        kd = "kl+hard_ce+hid_mse+att_mse"
        ns.task_kd = [f"{ns.inits[0]}:{o}:{kd}" for o in ("hid_mse+att_mse", "qq_rel+kk_rel+vv_rel")
                      if o in ns.objective_list]
        ns.task_kd += [f"{ns.inits[0]}:qq_rel+kk_rel+vv_rel:{kd}:aug"] if "qq_rel+kk_rel+vv_rel" in ns.objective_list else []
    from glue_eval.distillation import task_terms

    known = task_terms()

    ns.kd_rows = []
    for spec in ns.task_kd:
        init, obj, terms, aug = (spec.split(":") + ["", ""])[:4]
        terms = tuple(terms.split("+")) if terms else TASK_KD_TERMS
        if init not in ns.inits or obj not in objectives_of(init, ns) or obj == "none" or aug not in ("", "aug"):
            p.error(f"--task_kd {spec!r}: give INIT:OBJECTIVE[:TERMS[:aug]] with INIT one of --inits "
                    f"({' '.join(ns.inits)}) and OBJECTIVE a distillation objective of that init's rows "
                    f"({','.join(objectives_of(init, ns)) if init in ns.inits else ns.objectives})")
        bad = [t for t in terms if t not in known]
        if bad:
            p.error(f"--task_kd {spec!r}: {bad[0]!r} is not a task-distillation term; use {', '.join(known)}")
        ns.kd_rows.append((init, obj, terms, bool(aug)))
    if ns.augment < 1 and any(r[3] for r in ns.kd_rows):
        p.error(f"--augment {ns.augment}: the rows marked aug need 1 or more variants per example")


def parse_args(argv=None):
    p = build_parser()
    ns = p.parse_args(argv)
    fill_and_check(p, ns)
    task_kd_rows(p, ns)
    ns.cache_dir = ns.cache_dir or default_cache_dir()
    runs = ("runs" if ns.study == "minilm" else f"runs-{ns.study}") + ("-t32" if ns.teacher_fp32 else "")
    ns.work_dir = ns.work_dir or os.path.join(ns.cache_dir, runs + ("-quick" if ns.quick else ""))
    if ns.out == STUDIES[ns.study]["out"]:  # a smoke test or a variant never overwrites the study's report
        ns.out += ("-quick" if ns.quick else "") + ("-t32" if ns.teacher_fp32 else "")
    ns.corpus_default = ns.corpus is None
    ns.corpus = ns.corpus or default_corpus(ns.cache_dir)
    return ns


def objectives_of(layers: str, ns) -> list[str]:
    """The objectives of one initialisation's rows: --objectives and --extra_objectives for the first,
    --other_objectives for the rest."""
    extra = getattr(ns, "extra_objective_list", [])
    return ns.objective_list + extra if layers == ns.inits[0] else ns.other_objective_list


def report_settings(ns) -> dict:
    """The run's settings as its report records them (paths as :func:`shown_path` prints them; bench.carry compares
    them with a committed report's)."""
    return {k: shown_path(v, ns) for k, v in vars(ns).items()
            if k not in ("cache_dir", "work_dir", "embed_why", "carried")}


def shown_path(value, ns):
    """A path as the report prints it: under the study's cache as ``CACHE/...`` (prepare_study_data.py's
    cache directory), under the home directory as ``~/...``; anything else as given. A report names no
    directory of the machine that wrote it."""
    from bench.common import under_root

    if not isinstance(value, str) or not os.path.isabs(os.path.expanduser(value)):
        return value
    return under_root(Path(value).expanduser().resolve(), [(ns.cache_dir, "CACHE"), ("~", "~")]) or value


def default_corpus(cache_dir: str) -> str:
    """The prepared agnostic corpus when it is there (prepare_study_data.py, step 3), else the Wikipedia extract."""
    path = os.path.join(cache_dir, CORPUS_FILE)
    return path if os.path.isfile(path) else "offline:wikipedia-extract"


def auto_precision() -> tuple[str, str]:
    """What "auto" trains in here, and why: the engine's own decision (distill.common.hardware), so the study and
    distill-train never disagree."""
    from distill.common.hardware import auto_precision_here

    precision, _, why = auto_precision_here("cuda" if torch.cuda.is_available() else "cpu")
    return precision, why


# --- the pieces -------------------------------------------------------------------------------

def teacher_path(ns) -> str:
    from distill.train.setup import resolve_teacher

    return resolve_teacher(ns.teacher)


def resolve_task_specs(ns) -> list:
    """Task objects; prepared local names map to their spec files; quick/max_* cut subsets into work_dir."""
    from glue_eval.tasks import get_task

    tasks = []
    for name in [t.strip() for t in ns.tasks.split(",") if t.strip()]:
        if name in LOCAL_TASKS:
            spec = os.path.join(ns.cache_dir, "data", name, f"{name}.json")
            if not os.path.isfile(spec):
                sys.exit(f"task {name}: {spec} is missing: run python -m bench.prepare_study_data first")
            name = spec
        task = get_task(name)
        if ns.max_train or ns.max_dev:
            task = subset_task(task, ns)
        tasks.append(task)
    return tasks


def clip_words(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th whitespace-separated chunk.

    Lossless for a model that reads at most ``n`` tokens of it: WordPiece gives every chunk one token or more, so
    the first ``n`` chunks hold the first ``n`` tokens. It keeps augmentation (which looks up candidates for every
    word of the text) from spending its time on words truncation would drop: whole BBC articles, for instance.
    """
    import re

    m = re.match(r"\s*(?:\S+\s+){%d}" % n, text)
    return text if m is None else text[:m.end()].rstrip()


def subset_spec_path(name: str, ns) -> str:
    """Where :func:`subset_task` writes the task spec of ``name``'s subset (bench.study_multitask names it in its
    multi-task configs)."""
    folder = os.path.join(ns.work_dir, "data", f"{name}-{ns.max_train}-{ns.max_dev}-w{ns.max_seq_length}")
    return os.path.join(folder, f"{name}.json")


def subset_task(task, ns):
    """The first N train / dev rows of any task (GLUE or local) as a local spec in work_dir, each text clipped to
    max_seq_length words (:func:`clip_words`: the models see the same tokens)."""
    import csv

    from glue_eval.data import load_splits
    from glue_eval.tasks import load_task_spec

    spec_path = subset_spec_path(task.name, ns)
    folder = os.path.dirname(spec_path)
    if not os.path.isfile(spec_path):
        os.makedirs(folder, exist_ok=True)
        splits = load_splits(task, ["train", task.selection_split], ns.data_dir)
        for split, limit, fname in (("train", ns.max_train, "train.csv"), (task.selection_split, ns.max_dev, "dev.csv")):
            ds = splits[split]
            ds = ds.select(range(min(limit, len(ds)))) if limit else ds
            with open(os.path.join(folder, fname), "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow([*task.text_fields, "label"])
                for row in ds:
                    label = row["label"] if task.is_regression else task.labels[row["label"]]
                    w.writerow([*(clip_words(row[c], ns.max_seq_length) for c in task.text_fields), label])
        spec = {"name": task.name, "train": "train.csv", "dev": "dev.csv", "text_columns": list(task.text_fields),
                "label_column": "label", "metric": list(task.metrics)}
        spec.update({"regression": True} if task.is_regression else {"labels": list(task.labels)})
        with open(spec_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(spec, f, indent=2)
        os.replace(spec_path + ".tmp", spec_path)
    return load_task_spec(spec_path)


def loss_targets(layers: str, ns) -> list[int] | None:
    """Teacher layers the student's intermediate terms target (None: the engine's default, the init layers)."""
    n = len(layers.split(","))
    if ns.layer_map == "init":
        return None
    if ns.layer_map != "uniform":
        sys.exit(f"--layer_map {ns.layer_map!r}: choose uniform or init")
    from transformers import AutoConfig

    from distill.models.loading import num_layers

    total = num_layers(AutoConfig.from_pretrained(teacher_path(ns)))
    return [round((i + 1) * total / n) for i in range(n)]


def init_name(layers: str) -> str:
    return "L" + layers.replace(",", "-")


def make_rows(ns) -> list[dict]:
    """Every model of the study: name, label, kind, how to get its folder."""
    rows = [{"name": "teacher", "label": f"teacher ({shown_path(ns.teacher, ns).split(':')[-1]})", "kind": "teacher"}]
    for layers in ns.inits:
        for obj in objectives_of(layers, ns):
            label = f"3L {layers}: " + ("fine-tuned only" if obj == "none" else
                                        f"distilled, {objective_base(obj)}"
                                        + (", calibrated weights" if obj.endswith(CALIBRATED) else ""))
            if len(layers.split(",")) != 3:
                label = f"{len(layers.split(','))}L" + label[2:]
            row = {"name": f"{init_name(layers)}_{obj}", "label": label, "kind": "student",
                   "layers": layers, "objective": obj}
            targets = loss_targets(layers, ns)
            if obj != "none" and targets and any(k in objective_weights(obj) for k in MAPPED_TERMS):
                row["loss_layers"] = targets
                if targets != [int(x) for x in layers.split(",")]:  # the map is part of what the row is
                    row["name"] += "_map" + "-".join(map(str, targets))
                    row["label"] += f" -> teacher {','.join(map(str, targets))}"
            rows.append(row)
            for init, kd_obj, terms, aug in ns.kd_rows:
                if (init, kd_obj) != (layers, obj):
                    continue
                # the same distilled folder, fine-tuned with the task's fine-tuned teacher as a second teacher
                default = terms == TASK_KD_TERMS
                kd = {**row, "name": row["name"] + "_kd" + ("" if default else "_" + "+".join(terms)),
                      "model": row["name"], "task_kd": list(terms),
                      "label": row["label"] + (" + augmented task KD" if aug else " + task KD")
                      + ("" if default and not aug else
                         f" ({'+'.join(terms)}" + (f", {ns.augment} variant{'s' if ns.augment != 1 else ''} per example)" if aug else ")"))}
                if aug:  # the variant count is part of what the row is
                    kd.update(name=kd["name"] + f"_aug{ns.augment}", augment=ns.augment)
                rows.append(kd)
    extra = []
    n = len(ns.inits[0].split(","))
    if not ns.no_random:
        extra.append({"name": "random", "label": f"{n}L random init (floor)", "kind": "random", "layers": ns.inits[0]})
    extra += reference_rows(ns)
    rows[1:1] = extra  # cheap rows (no distillation) right after the teacher
    return rows


def reference_folders(ns) -> list[str]:
    """--reference as folders, hub ids or offline aliases ('l3', and 'auto' with the offline MiniLM teacher: the
    converted paraphrase-MiniLM-L3-v2)."""
    l3 = os.path.join(ns.cache_dir, "models", L3_NAME)
    refs = []
    for ref in [r.strip() for r in ns.reference.split(",") if r.strip()]:
        if ref == "auto":
            ref = l3 if ns.teacher == "offline:all-MiniLM-L6-v2" else "none"
        refs += [] if ref == "none" else [l3 if ref == "l3" else ref]
    return refs


def reference_rows(ns) -> list[dict]:
    """One row per outside reference: named "reference" when there is one (the minilm study's), else
    "reference-NAME"."""
    refs = reference_folders(ns)
    rows = []
    for ref in refs:
        short = os.path.basename(ref.rstrip("/")).split(":")[-1]
        rows.append({"name": "reference" if len(refs) == 1 else f"reference-{short}",
                     "label": f"{short} (outside reference)", "kind": "reference", "path": ref})
    return rows


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_folder(row: dict, ns) -> str:
    if row["kind"] == "teacher":
        return teacher_path(ns)
    if row["kind"] == "reference":
        from distill.train.setup import resolve_teacher

        return resolve_teacher(row["path"]) if row["path"].startswith("offline:") else row["path"]
    name = row.get("model", row["name"])
    if row["kind"] == "student" and row["objective"] != "none":  # the distillation settings are part of the key
        name += f"_s{ns.distill_steps}b{ns.distill_batch}lr{ns.distill_lr:g}"
        name += f"x{ns.block_size}" if ns.block_size != 128 else ""
        name += corpus_tag(ns)
        name += f"_rh{ns.relation_heads}" if ns.relation_heads and "qq_rel" in objective_weights(row["objective"]) else ""
        name += f"_cal{calibrate_batches(ns)}" if row["objective"].endswith(CALIBRATED) else ""
        name += "_t32" if getattr(ns, "teacher_fp32", False) else ""
    return os.path.join(ns.work_dir, "models", name)


def corpus_tag(ns) -> str:
    """The corpus in a model folder's name: nothing for the last study's Wikipedia extract, else its short name."""
    if ns.corpus == "offline:wikipedia-extract":
        return ""
    return "_" + (Path(ns.corpus).stem if os.path.isfile(ns.corpus) else ns.corpus.split(":")[-1].replace("/", "-"))


def calibrate_batches(ns) -> int:
    return CALIBRATE_BATCHES["quick" if ns.quick else "full"]


def prepare_model(row: dict, ns) -> tuple[str, float]:
    """Make the row's model folder if needed; return (folder, seconds spent now)."""
    folder = model_folder(row, ns)
    if row["kind"] in ("teacher", "reference") or os.path.isfile(os.path.join(folder, "config.json")):
        return folder, 0.0
    t0 = time.perf_counter()
    if row["kind"] == "random":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(teacher_path(ns))
        config.num_hidden_layers = len(row["layers"].split(","))
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
        tmp = folder + ".tmp"
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(teacher_path(ns)).save_pretrained(tmp)
        os.replace(tmp, folder)
    elif row["objective"] == "none":
        from distill.models.student import init_student

        init_student(teacher_path(ns), [int(x) for x in row["layers"].split(",")], folder, overwrite=True)
    else:
        distil(row, folder, ns)
    return folder, time.perf_counter() - t0


def distill_settings(row: dict, weights: dict, ns) -> dict:
    """distill-train's settings for the row's distillation (the calibration of an OBJECTIVE@cal row uses the same)."""
    settings = {
        "teacher": ns.teacher, "student_layers": [int(x) for x in row["layers"].split(",")],
        "weights": weights, "corpus": ns.corpus,
        "layer_map": [[i + 1, t] for i, t in enumerate(row["loss_layers"])] if row.get("loss_layers") else None,
        "block_size": ns.block_size, "data_mode": "pack", "cache_dir": ns.data_cache,
        "learning_rate": ns.distill_lr, "warmup_ratio": 0.05, "per_device_batch_size": ns.distill_batch,
        "max_steps": ns.distill_steps, "precision": ns.train_precision, "save_total_limit": 1,
        # a 12-layer teacher's step takes seconds: the mpnet study checkpoints more often, so a stop loses little
        "save_steps": 25 if ns.study == "mpnet" else 100,
        "logging_steps": 25, "seed": 56, "progress": False,
        "device": "cpu" if not torch.cuda.is_available() else "auto",
    }
    if ns.relation_heads:
        settings["relation_heads"] = ns.relation_heads
    if getattr(ns, "teacher_fp32", False):
        settings["teacher_fp32"] = True
    return settings


def calibration_path(row: dict, ns) -> str:
    return os.path.join(model_folder(row, ns) + ".calibration", "calibration.json")


def calibrated_weights(row: dict, ns) -> dict:
    """The weights distill-train --calibrate suggests for the row's terms, measured once (cached beside the model)."""
    from distill.settings.config import make_config
    from distill.train.loop import train

    path = calibration_path(row, ns)
    if not os.path.isfile(path):
        base = objective_weights(row["objective"])
        log(f"calibrating {objective_base(row['objective'])} on {calibrate_batches(ns)} batches")
        train(make_config({**distill_settings(row, base, ns), "calibrate": calibrate_batches(ns),
                           "output_dir": os.path.dirname(path), "overwrite_output_dir": True}))
    return json.loads(Path(path).read_text(encoding="utf-8"))["suggested_weights"]


def distil(row: dict, folder: str, ns) -> None:
    from distill.settings.config import make_config
    from distill.train.checkpoints import latest_checkpoint
    from distill.train.loop import train

    weights = calibrated_weights(row, ns) if row["objective"].endswith(CALIBRATED) else objective_weights(row["objective"])
    resume = latest_checkpoint(Path(folder)) is not None
    cfg = make_config({**distill_settings(row, weights, ns), "output_dir": folder, "overwrite_output_dir": not resume,
                       "resume": resume})
    log(f"distilling {row['name']}: {ns.distill_steps} steps of {ns.distill_batch} x {ns.block_size}, "
        f"{ns.train_precision}, weights {json.dumps(weights)}")
    train(cfg)


def distill_key(row: dict) -> str | None:
    """What a distillation's speed depends on, as --remeasure_distill keys it: the terms and the student's depth
    (None for a row that distils nothing of its own: fine-tuned only, or task KD on another row's model)."""
    weights = objective_weights(row["objective"]) if row["kind"] == "student" and "task_kd" not in row else None
    return f"{'+'.join(weights)}, {len(row['layers'].split(','))} layers" if weights else None


def distill_speed_settings(ns) -> dict:
    """The settings a --remeasure_distill figure holds for: one taken under others is not used."""
    return {"teacher": shown_path(ns.teacher, ns), "distill_batch": ns.distill_batch, "block_size": ns.block_size,
            "precision": ns.train_precision}


def logged_rates(folder: str) -> list[float]:
    """The tokens/s of each logged interval of a distill-train run in ``folder`` (none if it has no log): the
    run's own figures, without loading and saving."""
    path = os.path.join(folder, "logs", "train_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r["tokens_per_s"] for r in map(json.loads, filter(str.strip, f)) if "tokens_per_s" in r]


def row_timings(rows, timings: dict) -> dict:
    """The timings of ``rows`` only (``"prepare NAME"``, ``"finetune NAME seed S"``): the work cache may hold
    pieces of rows another command asked for."""
    names = {row["name"] for row in rows}
    bases = {row["model"] for row in rows if row.get("model")}  # a KD row's distilled model: its preparation only

    def own(key: str) -> bool:
        kind, _, rest = key.partition(" ")
        name = rest.split(" ")[0]
        return name in names or (kind == "prepare" and name in bases)

    return {k: v for k, v in timings.items() if own(k)}


def projected_run(rows, timings: dict, distill_speed: dict, ns) -> dict:
    """The whole run's wall time with every distillation at the rates --remeasure_distill measured under the
    current settings and the fine-tuning as this run measured it (``timings``: those of ``rows``, from
    :func:`row_timings`): ``{"distill_s", "finetune_s", "total_s",
    "rates", "unmeasured"}``; ``rates`` ``{key: [tokens/s now, tokens/s in this run's own logs or None]}``,
    ``unmeasured`` the distilled rows with no such figure (left out of the total)."""
    tokens = ns.distill_steps * ns.distill_batch * ns.block_size
    settings = distill_speed_settings(ns)
    distill, rates, unmeasured = 0.0, {}, []
    for row in rows:
        key = distill_key(row)
        if key is None:
            continue
        entry = distill_speed.get(key)
        if entry is None or entry.get("settings") != settings:
            unmeasured.append(row["name"])
            continue
        distill += tokens / entry["tokens_per_s"]
        if key not in rates:
            own = logged_rates(model_folder(row, ns))
            rates[key] = [entry["tokens_per_s"], statistics.median(own) if own else None]
    finetune = sum(v for k, v in timings.items() if k.startswith("finetune"))
    return {"distill_s": distill, "finetune_s": finetune, "total_s": distill + finetune, "rates": rates,
            "unmeasured": unmeasured}


def distill_speed_line(projection: dict) -> str:
    """The report's line on --remeasure_distill (see :func:`projected_run`)."""
    parts = [f"{key}: {now:.0f} tokens/s" + (f" (this run's own log: {then:.0f})" if then else "")
             for key, (now, then) in projection["rates"].items()]
    return (f"- Distillation speed of this checkout's engine (`python -m bench.study --remeasure_distill N`, measured "
            f"after the run): {'; '.join(parts) or 'none under these settings'}. The whole run at these rates: "
            f"about {projection['total_s'] / 3600:.1f} h (distillation {projection['distill_s'] / 60:.0f} min, "
            f"fine-tuning {projection['finetune_s'] / 60:.0f} min as measured; data preparation and calibration "
            "batches not counted" + (f"; not measured, so not counted: {', '.join(projection['unmeasured'])}"
                                     if projection["unmeasured"] else "") + ")")


def measure_distill_speed(rows, ns, state: dict) -> dict:
    """Tokens/s of ``ns.remeasure_distill`` steps of each distilled row's recipe, run now with this checkout's
    engine (once per :func:`distill_key`: a calibrated row runs at its objective's speed), in a scratch folder
    under the work dir; the first logged quarter (warm-up) is left out. Each figure goes into
    ``state["distill_speed"]`` and is saved as it is taken; returns the figures taken."""
    import shutil

    from distill.settings.config import make_config
    from distill.train.loop import train

    steps = ns.remeasure_distill
    interval = max(steps // 4, 1)
    done = {}
    for row in rows:
        key = distill_key(row)
        if key is None or key in done:
            continue
        weights = objective_weights(row["objective"])
        folder = os.path.join(ns.work_dir, "distill-speed", row["name"])
        shutil.rmtree(folder, ignore_errors=True)
        log(f"measuring the distillation speed of {key}: {steps} steps")
        train(make_config({**distill_settings(row, weights, ns), "output_dir": folder, "max_steps": steps,
                           "save_steps": steps + 1, "logging_steps": interval, "overwrite_output_dir": True}))
        rates = logged_rates(folder)[1:]
        done[key] = {"tokens_per_s": statistics.median(rates), "steps": steps, "intervals": len(rates),
                     "settings": distill_speed_settings(ns)}
        state.setdefault("distill_speed", {})[key] = done[key]
        save_state(ns, state)
        shutil.rmtree(folder, ignore_errors=True)
    return done


def finetune_dir(row: dict, ns) -> str:
    """The row's glue-eval output folder; the fine-tuning data and length are part of the key (a cell's own
    record holds the other settings)."""
    key = f"finetune-train{ns.max_train or 'all'}-dev{ns.max_dev or 'all'}-ep{ns.epochs:g}-len{ns.max_seq_length}"
    return os.path.join(ns.work_dir, key, row["name"])


def teacher_cell_model(task, seed: int, ns) -> str:
    from glue_eval.grid import cell_name

    return os.path.join(finetune_dir({"name": "teacher"}, ns), task.name,
                        cell_name(ns.learning_rate, ns.batch_size, seed), "model")


def finetune_cells(row: dict, folder: str, tasks, seed: int, ns) -> list[dict]:
    """Fine-tune one model on every task with one seed, through glue-eval's grid (cached per cell). The teacher's
    fine-tuned models are kept when a task-KD row needs them; a task-KD row fine-tunes with the teacher of the same
    task and seed."""
    import dataclasses
    import shutil

    from glue_eval.distillation import regression_terms, soft_terms
    from glue_eval.arguments import GlueArguments, GlueTrainingArguments
    from glue_eval.grid import cell_name, run_grid

    out = finetune_dir(row, ns)
    keep = row["kind"] == "teacher" and bool(ns.task_kd)
    glue = GlueArguments(model=folder, data_dir=ns.data_dir, max_seq_length=ns.max_seq_length, save_model=keep)
    args = GlueTrainingArguments(
        output_dir=out, num_train_epochs=ns.epochs, learning_rate=ns.learning_rate,
        per_device_train_batch_size=ns.batch_size, warmup_steps=0.1, weight_decay=0.01, seed=seed,
        bf16=ns.train_precision == "bf16", fp16=ns.train_precision == "fp16", use_cpu=not torch.cuda.is_available(), report_to=[],
        disable_tqdm=True, logging_strategy="no", eval_strategy="no", save_strategy="no",
        length_groups=getattr(ns, "length_groups", None) or 1)
    records = []
    for task in tasks:
        t0 = time.perf_counter()
        cell = os.path.join(out, task.name, cell_name(ns.learning_rate, ns.batch_size, seed))
        result = os.path.join(cell, "result.json")
        if keep and os.path.isfile(result) and not os.path.isdir(os.path.join(cell, "model")):
            # finished before a task-KD row needed its model: redo it, keeping the model this time (a cell of
            # another model is left for glue-eval to refuse)
            if json.loads(Path(result).read_text(encoding="utf-8")).get("settings", {}).get("model") == folder:
                log(f"  {row['name']} {task.name} seed {seed}: redone to keep its model for the task-KD rows")
                shutil.rmtree(cell)
        task_glue = glue
        if row.get("task_kd"):
            teacher = teacher_cell_model(task, seed, ns)
            if not os.path.isdir(teacher):
                raise RuntimeError(f"{row['name']}: the fine-tuned teacher {teacher} is missing")
            terms = [(regression_terms()[0] if task.is_regression and t in soft_terms() else t)
                     for t in row["task_kd"]]
            # the row's agnostic map, else the study's map for the init (a relations student has none of its own)
            layer_map = (row.get("loss_layers") or loss_targets(row["layers"], ns)
                         or [int(x) for x in row["layers"].split(",")])
            mapped = any(t in MAPPED_TERMS for t in terms)
            task_glue = dataclasses.replace(glue, teacher=teacher, distill_weights=json.dumps(dict.fromkeys(terms, 1.0)),
                                            temperature=TASK_KD_TEMPERATURE, augment=row.get("augment", 0),
                                            student_layers=",".join(map(str, layer_map)) if mapped else None)
        (rec,) = run_grid([task], [(ns.learning_rate, ns.batch_size, seed)], args, task_glue, out)
        spent = time.perf_counter() - t0
        if spent > 5:
            log(f"  {row['name']} {task.name} seed {seed}: {100 * rec['score']:.2f} ({spent:.0f} s)")
        records.append(rec)
    return records


# --- speed and size ---------------------------------------------------------------------------

def count_params(folder: str) -> dict:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embeddings."))
    return {"total": total, "non_embedding": total - emb}


def measure_speed(teacher: str, student: str, quick: bool) -> dict:
    """examples/s of the bare encoders (fp32, eval, no_grad, seq 128), batch 32 and 1, interleaved repeats."""
    from transformers import AutoModel

    models = {"teacher": AutoModel.from_pretrained(teacher).eval(), "student": AutoModel.from_pretrained(student).eval()}
    # seq 128 and ids 1000-29000 for any real model; less for a tiny test model
    seq = min([128] + [m.config.max_position_embeddings - 2 for m in models.values()])
    hi = min([29000] + [m.config.vocab_size for m in models.values()])
    lo = min(1000, hi // 4)
    result = {"threads": torch.get_num_threads(), "seq": seq, "dtype": "fp32"}
    for batch, iters, reps in ((32, 2 if quick else 3, 3 if quick else 7), (1, 10 if quick else 30, 3 if quick else 7)):
        ids = torch.randint(lo, hi, (batch, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        times = {k: [] for k in models}
        with torch.inference_mode():
            for m in models.values():
                m(input_ids=ids, attention_mask=mask)  # warm-up
            for _ in range(reps):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        m(input_ids=ids, attention_mask=mask)
                    times[k].append((time.perf_counter() - t0) / iters)
        med = {k: statistics.median(v) for k, v in times.items()}
        result[f"batch{batch}"] = {
            "teacher_examples_per_s": batch / med["teacher"], "student_examples_per_s": batch / med["student"],
            "speedup_median": med["teacher"] / med["student"],
            # the fastest repeat of each is the least disturbed by other processes on the machine
            "speedup_best": min(times["teacher"]) / min(times["student"]), "repeats": reps, "iters": iters}
    return result


# --- the report -------------------------------------------------------------------------------

def summarise(rows, tasks, results, seeds) -> list[dict]:
    """Per row: per-task mean/std over the seeds done, average, retained."""
    out = []
    for row in rows:
        per_task, complete_seeds = {}, []
        for seed in seeds:
            recs = results.get((row["name"], seed))
            if recs and all(t.name in recs for t in tasks):
                complete_seeds.append(seed)
        for t in tasks:
            vals = [100 * results[(row["name"], s)][t.name] for s in complete_seeds]
            per_task[t.name] = vals
        avgs = [statistics.mean(100 * results[(row["name"], s)][t.name] for t in tasks) for s in complete_seeds]
        out.append({**{k: v for k, v in row.items() if k != "path"}, "seeds": complete_seeds, "scores": per_task,
                    "avg_by_seed": avgs, "avg": statistics.mean(avgs) if avgs else None,
                    "avg_std": statistics.stdev(avgs) if len(avgs) > 1 else 0.0})
    teacher = next((r for r in out if r["kind"] == "teacher"), None)
    t_by_seed = dict(zip(teacher["seeds"], teacher["avg_by_seed"])) if teacher else {}
    for r in out:
        # against the teacher on the same seeds (a row with fewer seeds is not compared with a luckier teacher mean)
        ratios = [100 * a / t_by_seed[s] for s, a in zip(r["seeds"], r["avg_by_seed"]) if s in t_by_seed]
        r["retained"] = statistics.mean(ratios) if ratios else None
        r["retained_std"] = statistics.stdev(ratios) if len(ratios) > 1 else (0.0 if ratios else None)
    return out


def row_compute(row: dict, timings: dict, ns) -> dict:
    """What a row cost, as measured: its distillation (minutes, and tokens seen; a task-KD row shares its model's),
    the calibration inside it for an OBJECTIVE@cal row, and fine-tuning minutes per seed (mean over the seeds
    timed, all tasks together)."""
    out = {}
    if row["kind"] == "student" and row["objective"] != "none":
        spent = timings.get(f"prepare {row.get('model', row['name'])}")
        out["distill_min"] = None if spent is None else spent / 60
        out["distill_tokens"] = ns.distill_steps * ns.distill_batch * ns.block_size
    runs = [timings[k] for k in (f"finetune {row['name']} seed {s}" for s in ns.seed_list) if k in timings]
    out["finetune_min_per_seed"] = statistics.mean(runs) / 60 if runs else None
    return out


def fmt_compute(c: dict) -> tuple[str, str]:
    distil = "–"
    if "distill_tokens" in c:
        tokens = c["distill_tokens"]
        distil = (f"{c['distill_min']:.1f}" if c["distill_min"] is not None else "?") + \
            (f" ({tokens / 1e6:.1f}M tok)" if tokens >= 1e5 else f" ({tokens / 1e3:.0f}k tok)")
    ft = f"{c['finetune_min_per_seed']:.1f}" if c.get("finetune_min_per_seed") is not None else "–"
    return distil, ft


def calibrations(rows, ns) -> dict:
    """{row name: calibration.json} of the OBJECTIVE@cal rows measured so far."""
    found = {}
    for r in rows:
        if r["kind"] == "student" and r["objective"].endswith(CALIBRATED) and not r.get("task_kd"):
            path = calibration_path(r, ns)
            if os.path.isfile(path):
                found[r["name"]] = json.loads(Path(path).read_text(encoding="utf-8"))
    return found


def fmt(vals) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def paired_gain(a: dict, b: dict, teacher: dict) -> dict:
    """Seed -> points of the teacher's average that row ``a`` keeps above row ``b``, on the seeds both rows (and
    the teacher) have."""
    t = dict(zip(teacher["seeds"], teacher["avg_by_seed"]))
    av, bv = dict(zip(a["seeds"], a["avg_by_seed"])), dict(zip(b["seeds"], b["avg_by_seed"]))
    return {s: 100 * (av[s] - bv[s]) / t[s] for s in av if s in bv and s in t}


def gain_text(r: dict, base: dict, teacher: dict | None) -> str:
    """Row ``r``'s points of the teacher's average over ``base``: seed against seed (mean ± std of the per-seed
    gains) on the seeds both have, which it names when the rows' seeds differ; each row's own mean when they
    share no seed."""
    paired = paired_gain(r, base, teacher) if teacher else {}
    if not paired:
        n, m = len(r["seeds"]), len(base["seeds"])
        return (f"{r['retained'] - base['retained']:+.1f} (unpaired: {n} seed{'s' * (n != 1)} against {m}, none in "
                "common)")
    text = f"{statistics.mean(paired.values()):+.1f}" + (
        f" ± {statistics.stdev(paired.values()):.1f}" if len(paired) > 1 else "")
    if set(paired) != set(r["seeds"]) | set(base["seeds"]):  # a row ahead by a seed: the seeds both have
        text += f" ({seeds_text(paired)}, which both rows have)"
    return text


def seeds_text(seeds) -> str:
    """``seed 1`` or ``seeds 1,2,3``: the seeds (or the keys of a seed -> value dict) in order."""
    return f"seed{'s' * (len(seeds) > 1)} {','.join(map(str, sorted(seeds)))}"


def gain_lines(by: dict, ns, teacher: dict | None) -> list[str]:
    """Per initialisation: each distillation objective's points over fine-tuning alone, seed against seed."""
    lines = []
    for layers in ns.inits:
        base = by.get(f"{init_name(layers)}_none")
        if not base or base["retained"] is None:  # a share needs the teacher's seeds too
            continue
        parts = []
        for o in [o for o in objectives_of(layers, ns) if o != "none"]:
            r = by.get(f"{init_name(layers)}_{o}")
            if r and r["retained"] is not None:
                parts.append(f"{o} {gain_text(r, base, teacher)}")
        if parts:
            lines.append(f"Distillation vs fine-tuning only, layers {layers} (points of teacher average retained, "
                         f"seed against seed; fine-tuned only: {base['retained']:.1f}%): " + ", ".join(parts) + ".")
    return lines


def initialisation_lines(by: dict, ns) -> list[str]:
    """Which initialisation wins, and each objective's spread across initialisations."""
    best_by_init = {}
    for layers in ns.inits:
        cands = [by.get(f"{init_name(layers)}_{o}") for o in objectives_of(layers, ns)]
        cands = [c for c in cands if c and c["avg"] is not None]
        if cands:
            best_by_init[layers] = max(cands, key=lambda c: c["avg"])
    if not best_by_init:
        return []
    order = sorted(best_by_init.items(), key=lambda kv: -kv[1]["avg"])
    lines = ["Best task-agnostic row per initialisation: " + "; ".join(
        f"layers {k}: {v['retained']:.1f}% (" + v["label"].split(": ", 1)[1] + ")" for k, v in order) + "."]
    for o in dict.fromkeys(ns.objective_list + ns.other_objective_list):
        vals = {k: by.get(f"{init_name(k)}_{o}") for k in ns.inits}
        vals = {k: v for k, v in vals.items() if v and v["avg"] is not None}
        if len(vals) > 1:
            lo, hi = min(v["retained"] for v in vals.values()), max(v["retained"] for v in vals.values())
            lines.append(f"Spread across initialisations with {o if o != 'none' else 'fine-tuning only'}: "
                         f"{hi - lo:.1f} points (" + ", ".join(f"{k}: {v['retained']:.1f}%" for k, v in vals.items()) + ").")
    return lines


def task_kd_lines(summary, by: dict, teacher: dict | None) -> list[str]:
    """Each task-KD row's points over the distilled student it starts from, seed against seed."""
    lines = []
    for r in summary:
        base = by.get(f"{init_name(r['layers'])}_{r['objective']}") if r.get("task_kd") else None
        if base and r["retained"] is not None and base["retained"] is not None:
            lines.append(f"Task distillation ({'+'.join(r['task_kd'])}"
                         + (f", on {r['augment']} augmented variants of each example too" if r.get("augment") else "")
                         + f") on top of {base['label']} "
                         f"({base['retained']:.1f}%): "
                         f"{gain_text(r, base, teacher)} points ({r['retained']:.1f}%).")
    return lines


def verdict(ns, met: bool, short: str) -> str:
    return " (quick mode: not a result)." if ns.quick else ": met." if met else f": not met (short by {short})."


def target_lines(done, by: dict, speed, ns) -> list[str]:
    """The study's three targets: the best distilled student's share and speed, agnostic distillation's gain over
    fine-tuning alone, the best student against the outside reference."""
    lines = []
    distilled = [r for r in done if r.get("objective") not in (None, "none") and r["kind"] == "student"]
    if distilled:
        best = max(distilled, key=lambda r: r["avg"])
        sp = speed.get("batch32", {}).get("speedup_median") if speed else None
        sp1 = speed.get("batch1", {}).get("speedup_median") if speed else None
        target = best["retained"] >= 98.0 and (sp or 0) >= 1.9
        lines.append(f"Target (best distilled student >= 98% of the teacher at >= 1.9x): best is {best['label']} at "
                     f"{best['retained']:.1f}% ± {best['retained_std']:.1f}"
                     + (f", {sp:.2f}x at batch 32 and {sp1:.2f}x at batch 1" if sp else "")
                     + (" (quick mode: not a result)." if ns.quick else ": met." if target else
                        f": not met (short by {max(0.0, 98.0 - best['retained']):.1f} points"
                        + (f" and {1.9 - sp:.2f}x" if sp is not None and sp < 1.9 else "") + ")."))
    first = ns.inits[0]
    base = by.get(f"{init_name(first)}_none")
    agnostic = [by[k] for k in (f"{init_name(first)}_{o}" for o in objectives_of(first, ns) if o != "none")
                if k in by and by[k]["avg"] is not None]
    if base and base["avg"] is not None and agnostic:
        best_a = max(agnostic, key=lambda r: r["retained"])
        gain = best_a["retained"] - base["retained"]
        lines.append(f"Target (task-agnostic distillation alone beats fine-tuning alone, layers {first}, by >= 2 "
                     f"points): best is {best_a['label']} at {gain:+.2f} points ({best_a['retained']:.1f}% against "
                     f"{base['retained']:.1f}%)" + verdict(ns, gain >= 2, f"{2 - gain:.2f}"))
    ref = next((r for r in done if r["kind"] == "reference"), None)
    if ref and distilled:
        gap = best["retained"] - ref["retained"]
        lines.append(f"Target (best student beats {ref['label'].split(' (')[0]} by >= 1.5 points): {gap:+.1f} "
                     f"points ({best['retained']:.1f}% against {ref['retained']:.1f}%)"
                     + verdict(ns, gap >= 1.5, f"{1.5 - gap:.1f}"))
    return lines


def findings(summary, speed, ns) -> list[str]:
    """What the table says, computed from it: distillation's gains, the initialisations, task KD, the targets, and
    the floor and the reference."""
    by = {f"{init_name(r['layers'])}_{r['objective']}": r for r in summary
          if r["kind"] == "student" and not r.get("task_kd")}
    done = [r for r in summary if r["avg"] is not None]
    if not any(r["kind"] == "teacher" for r in done):
        return ["The teacher has no finished cells yet: no comparison possible."]
    teacher = next(r for r in done if r["kind"] == "teacher")
    lines = gain_lines(by, ns, teacher) + initialisation_lines(by, ns) + task_kd_lines(summary, by, teacher)
    lines += target_lines(done, by, speed, ns)
    for r in done:
        if r["kind"] in ("random", "reference"):
            lines.append(f"{r['label']}: {r['retained']:.1f}% of the teacher's average.")
    return lines


def report_title(ns, mode: str, command: str) -> list[str]:
    """The report's title, when and how it was made (the preparation, then the run's command)."""
    return [
        "# Distillation study: 3-layer students of all-MiniLM-L6-v2" if ns.teacher == "offline:all-MiniLM-L6-v2"
        else f"# Distillation study: students of {shown_path(ns.teacher, ns)}",
        "",
        f"**{mode}.** Generated by `python -m bench.study` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "```",
        "python -m bench.prepare_study_data",
        command,
        "```",
        "",
    ]


def setup_lines(ns, tasks, summary) -> list[str]:
    """Machine, versions, teacher, tasks and fine-tuning, and the distillation recipe, one bullet each."""
    import transformers

    seeds_done = sorted({s for r in summary for s in r["seeds"]})
    return [
        f"- Machine: {describe_machine()}; {torch.get_num_threads()} torch threads",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}",
        f"- Teacher: `{shown_path(ns.teacher, ns)}`; tasks: {', '.join(t.name for t in tasks)}"
        + (f" (first {ns.max_train} examples of each train split" if ns.max_train else " (whole train splits")
        + (f", first {ns.max_dev} of each dev split)" if ns.max_dev else ", whole dev splits)")
        + f"; fine-tuning: lr {ns.learning_rate:g}, batch {ns.batch_size}, {ns.epochs:g} epochs, warm-up 10%, "
          f"weight decay 0.01, max_seq_length {ns.max_seq_length}, {ns.train_precision}"
          + (f", each batch as up to {ns.length_groups} length groups" if (getattr(ns, "length_groups", None) or 1) > 1 else "")
          + "; seeds "
          f"{','.join(map(str, seeds_done)) or '-'} of {','.join(map(str, ns.seed_list))}",
        f"- Distillation: {ns.distill_steps} steps of {ns.distill_batch} x {ns.block_size} tokens of "
        f"`{shown_path(ns.corpus, ns)}`, "
        f"{ns.train_precision}" + (" with the teacher's forward in fp32 (--teacher_fp32)" if ns.teacher_fp32 else "")
        + f", AdamW lr {ns.distill_lr:g} (warm-up 5%, linear decay), loss weights 1 per term; "
        + ("hid_mse/att_mse: student layer i against teacher layer i*Lt/Ls (uniform map: "
           + ",".join(map(str, loss_targets(ns.inits[0], ns) or [])) + " for every initialisation; with the "
           "initialisation's own layers as the map, the terms of a 1,2,3 student compare identical layers and start "
           "near zero); cos: last layer against last layer" if ns.layer_map == "uniform" else
           "hid_mse/att_mse: student layer i against the teacher layer it was copied from; cos: last against last"),
    ]


def method_lines(ns, rows, speed, own_timings, projection) -> list[str]:
    """The task-KD and augmentation rows, the calibrated weights, how speed was taken, and the compute spent."""
    return [
        *([f"- Task KD rows: the distilled student fine-tuned with glue-eval `--teacher` (the teacher row's model "
           f"fine-tuned on the same task with the same seed), each term weight 1 ({'+'.join(TASK_KD_TERMS)} unless "
           f"the row names its terms), T={TASK_KD_TEMPERATURE:g}, hid_mse/att_mse over the row's layer map; "
           "regression tasks use out_mse for kl"]
          if any(r.get("task_kd") for r in rows) else []),
        *([f"- Augmented task KD rows: glue-eval `--teacher --augment {ns.augment}` (TinyBERT's augmentation: each "
           "word replaced with probability 0.4 by one of 15 candidates, from the teacher's input-embedding "
           "neighbours when it has no masked-LM head), the teacher labelling every variant, hard_ce on the original "
           "examples only"] if any(r.get("augment") for r in rows) else []),
        *[f"- Calibrated weights ({name}): `distill-train --calibrate {c.get('batches', calibrate_batches(ns))}` "
          f"with the row's recipe gave `{json.dumps(c['suggested_weights'])}` (gradient shares at weight 1: "
          + ", ".join(f"{k} {100 * v['grad_share']:.1f}%" for k, v in c.get("terms", {}).items()) + ")"
          for name, c in calibrations(rows, ns).items()],
        "- Speed: bare encoders, fp32, eval, seq 128, interleaved repeats, same threads"
        + (f"; teacher {speed['batch32']['teacher_examples_per_s']:.1f} ex/s at batch 32, "
           f"{speed['batch1']['teacher_examples_per_s']:.1f} ex/s at batch 1 (medians); speed-up on the median "
           f"repeats (the table's, and the targets'): {speed['batch32']['speedup_median']:.2f}x at batch 32, "
           f"{speed['batch1']['speedup_median']:.2f}x at batch 1; on the fastest repeat of each: "
           f"{speed['batch32']['speedup_best']:.2f}x and {speed['batch1']['speedup_best']:.2f}x"
           if speed else ": not measured"),
        f"- Compute spent (wall clock, as measured, this report's rows): "
        f"distillation {sum(v for k, v in own_timings.items() if k.startswith('prepare')) / 60:.0f} min, fine-tuning "
        f"{sum(v for k, v in own_timings.items() if k.startswith('finetune')) / 60:.0f} min",
        *([distill_speed_line(projection)] if projection else []),
        "",
    ]


def table_lines(summary, tasks, params, speed) -> list[str]:
    """The results table, one row per model, and the paragraph that says what its columns are."""
    sp32 = speed.get("batch32", {}).get("speedup_median") if speed else None
    sp1 = speed.get("batch1", {}).get("speedup_median") if speed else None
    sp = next((params[r["name"]] for r in summary if r["kind"] == "student" and r["name"] in params), None)
    arch = (f" ({sp['total'] / 1e6:.1f}M parameters, of which {(sp['total'] - sp['non_embedding']) / 1e6:.1f}M are "
            "embeddings)") if sp else ""
    head = ["model", "n", *[t.name for t in tasks], "average", "% of teacher", "params (M)", "speed-up b32", "speed-up b1",
            "distil min (tokens)", "fine-tune min/seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        p = params.get(r["name"])
        is_teacher = r["kind"] == "teacher"
        cells = [r["label"], str(len(r["seeds"])), *[fmt(r["scores"][t.name]) for t in tasks],
                 fmt(r["avg_by_seed"]),
                 "–" if r["retained"] is None else (f"{r['retained']:.1f}" + (f" ± {r['retained_std']:.1f}"
                                                                               if len(r["seeds"]) > 1 else "")),
                 f"{p['total'] / 1e6:.1f}" if p else "–",
                 "1.00" if is_teacher else (f"{sp32:.2f}" if sp32 else "–"),
                 "1.00" if is_teacher else (f"{sp1:.2f}" if sp1 else "–"),
                 *fmt_compute(r["compute"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Scores are each task's dev score in % (accuracy for the local tasks; GLUE's task score, e.g. "
                    "Matthews correlation for CoLA, for GLUE tasks), mean ± standard deviation over the seeds; the "
                    "average is per seed, then over seeds; % of teacher is against the teacher on the same seeds; n is the number of seeds "
                    "done. Every student row has one architecture" + arch + ", so one speed-up applies to all of them. "
                    "Compute is wall clock as measured on this machine: a distilled row's distillation (with its "
                    "calibration; a task-KD row starts from the same distilled model, so it shares that figure) and "
                    "tokens seen, and its fine-tuning per seed over all tasks (a task-KD row's includes the teacher "
                    "passes and any augmentation)."]


def findings_lines(summary, speed, ns) -> list[str]:
    """The findings section: the caveats of quick mode and of one seed, then :func:`findings`, one bullet each."""
    lines = ["", "## Findings (computed from the table)", ""]
    if ns.quick:
        lines += ["Quick mode fine-tunes on 160 examples for one epoch (5 steps): scores sit near chance and the "
                  "lines below only show that every piece of the pipeline ran. Do not read them as results.", ""]
    if max((len(r["seeds"]) for r in summary), default=0) == 1 and not ns.quick:
        lines += ["One seed per row so far: the spread between seeds is not measured yet, so read differences of a "
                  "point or two as noise.", ""]
    return lines + [f"- {x}" for x in findings(summary, speed, ns)]


def write_report(ns, rows, tasks, results, speed, params, timings, command, distill_speed=None) -> None:
    """OUT.md (the table, how it was made, the findings), OUT.json (the same, and every figure) and OUT.png."""
    import transformers

    from distill.common.io import atomic_write_text

    summary = summarise(rows, tasks, results, ns.seed_list)
    for r in summary:
        r["compute"] = row_compute(r, timings, ns)
    own_timings = row_timings(rows, timings)
    projection = projected_run(rows, own_timings, distill_speed, ns) if distill_speed else None
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = "QUICK MODE (tiny subsets, 1 seed, short distillation: a smoke test of the pipeline, not a result)" \
        if ns.quick else "full run"
    incomplete = [r["label"] for r in summary if len(r["seeds"]) < len(ns.seed_list)]
    lines = (report_title(ns, mode, command) + setup_lines(ns, tasks, summary)
             + method_lines(ns, rows, speed, own_timings, projection))
    if incomplete:
        lines += [f"**Incomplete:** {len(incomplete)} of {len(summary)} rows have fewer seeds than asked (column n): "
                  "the run was stopped before their cells.", ""]
    if carry.note(getattr(ns, "carried", carry.EMPTY)):
        lines += [carry.note(ns.carried), ""]
    lines += table_lines(summary, tasks, params, speed) + findings_lines(summary, speed, ns)
    lines += ["", "![study](study.png)" if out.name == "study" else f"![study]({out.name}.png)", ""]
    atomic_write_text(str(out) + ".md", "\n".join(lines))
    atomic_write_text(str(out) + ".json", json.dumps({
        "mode": "quick" if ns.quick else "full", "command": command,
        "settings": report_settings(ns), **carry.json_fields(results, ns),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "machine": {**machine_description(), "torch_threads": torch.get_num_threads()},
        "rows": summary, "speed": speed, "params": params, "timings_s": own_timings,
        "distill_speed": distill_speed, "projected_run": projection,
        "calibrations": calibrations(rows, ns),
    }, indent=2, default=str) + "\n")
    plot(summary, Path(str(out) + ".png"), ns, mode)
    log(f"wrote {out}.md, {out}.png, {out}.json")


def plot(summary, path: Path, ns, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in summary if r["retained"] is not None]
    colors = {"none": "#999999", "cos": "#4c72b0", "att_mse": "#dd8452", "hid_mse+att_mse": "#55a868",
              "cos+hid_mse+att_mse": "#8172b3", "hid_mse+att_mse@cal": "#a6d854", "qq_rel+kk_rel+vv_rel": "#da8bc3",
              "sent_mse": "#c9a227", "sent_mse+hid_mse": "#937860"}
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(done) + 1.6))
    y = list(range(len(done)))[::-1]
    for yi, r in zip(y, done):
        c = colors.get(r.get("objective"), "#222222" if r["kind"] == "teacher" else "#c44e52")
        ax.barh(yi, r["retained"], xerr=r["retained_std"] if len(r["seeds"]) > 1 else None, color=c,
                capsize=3, height=0.7, hatch=("xx" if r.get("augment") else "//") if r.get("task_kd") else None,
                edgecolor="white")
        spread = r["retained_std"] if len(r["seeds"]) > 1 else 0.0
        ax.text(r["retained"] + spread + 0.4, yi, f"{r['retained']:.1f}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in done], fontsize=8)
    lo = min([r["retained"] for r in done] + [90.0])
    hi = max([r["retained"] + (r["retained_std"] if len(r["seeds"]) > 1 else 0.0) for r in done] + [100.0])
    ax.set_xlim(lo - 5, hi + 6)  # room for the value printed after each bar
    ax.axvline(100, color="black", lw=0.8)
    ax.axvline(98, color="black", lw=0.8, ls="--")
    ax.set_xlabel("% of the teacher's average dev score (mean ± std over seeds; dashed line: 98%)")
    rows_key = ("distilled with hid_mse+att_mse (green), sent_mse (gold),\nrelations qq_rel+kk_rel+vv_rel (pink)"
                if ns.study == "mpnet" else "distilled with cos (blue), hid_mse+att_mse (green;\nlight green: "
                "calibrated weights), relations qq_rel+kk_rel+vv_rel (pink)")
    ax.set_title(("[quick mode] " if ns.quick else "") + f"Students of {ns.teacher.split(':')[-1]}: fine-tuned only "
                 f"(grey), {rows_key}; hatched: + task KD (crossed: augmented)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # the long row labels would push the title off the canvas
    os.replace(tmp, path)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------

def prepare_inputs(ns) -> None:
    """What prepare_study_data.py makes, for the parts of this run that use it (every step skips finished work)."""
    from bench.prepare_study_data import build_l3, prepare_corpus, prepare_tasks

    if any(t.strip() in LOCAL_TASKS for t in ns.tasks.split(",")) or ns.corpus_default:
        prepare_tasks(ns.cache_dir, 13)  # the corpus keeps the tasks' dev examples out, so it needs them first
    if ns.corpus_default:
        ns.corpus = prepare_corpus(ns.cache_dir)
    if os.path.join(ns.cache_dir, "models", L3_NAME) in reference_folders(ns):
        build_l3(ns.cache_dir)


def load_state(ns) -> dict:
    path = os.path.join(ns.work_dir, "state.json")
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}


def save_state(ns, state: dict) -> None:
    os.makedirs(ns.work_dir, exist_ok=True)
    path = os.path.join(ns.work_dir, "state.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".tmp", path)


def collect_results(rows, tasks, ns) -> dict:
    """(row name, seed) -> {task: score} from the finished glue-eval cells."""
    from glue_eval.grid import cell_name

    results = {}
    for row in rows:
        for seed in ns.seed_list:
            for t in tasks:
                path = os.path.join(finetune_dir(row, ns), t.name,
                                    cell_name(ns.learning_rate, ns.batch_size, seed), "result.json")
                if os.path.isfile(path):
                    results.setdefault((row["name"], seed), {})[t.name] = json.load(open(path))["score"]
    return results


def run_command(argv: list[str], ns) -> str:
    """The command that made the run's pieces, as the report prints it: the measuring and report-only flags
    left out, paths inside the repository relative to it, others as :func:`shown_path` prints them."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        if a in ("--report_only", "--remeasure_speed") or a.startswith("--remeasure_distill="):
            continue
        if a == "--remeasure_distill":
            skip = 1
            continue
        if os.path.isabs(a):
            from bench.common import under_root

            a = under_root(Path(a).resolve(), [(ROOT, "")]) or shown_path(a, ns)
        out.append(a)
    return " ".join(["python -m bench.study", *out])


def main(argv=None) -> int:
    ns = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("STUDY_THREADS", torch.get_num_threads())))
    ns.train_precision = auto_precision()[0] if ns.precision == "auto" else ns.precision
    command = run_command(argv if argv is not None else sys.argv[1:], ns)
    if ns.prepare:
        prepare_inputs(ns)
    tasks = resolve_task_specs(ns)
    rows = make_rows(ns)
    state = load_state(ns)
    ns.carried = carry.load(ns, report_settings(ns), log, vars(build_parser().parse_args([])))  # earlier machines
    carry.into_state(state, ns.carried)
    timings = state.setdefault("timings", {})
    if ns.remeasure_distill:
        measure_distill_speed(rows, ns, state)  # into state["distill_speed"], saved figure by figure
    if ns.remeasure_speed and ns.study == "mpnet":
        from bench.study_mpnet import measure_speeds

        measure_speeds(rows, ns, state, again=True)
    elif ns.remeasure_speed:
        first = next((r for r in rows if r["kind"] == "student" and r["objective"] == "none"), None)
        prepare_model(first, ns)
        log("measuring inference speed")
        state["speed"] = measure_speed(teacher_path(ns), model_folder(first, ns), ns.quick)
        save_state(ns, state)
    if not (ns.report_only or ns.remeasure_speed or ns.remeasure_distill):
        state["torch_threads"] = torch.get_num_threads()  # what the run's minutes were measured at
        # 1. (seed, row) cells in the order that answers the study's questions soonest (see execution_plan); a
        # model folder is made (distilled) when first needed, then fine-tuned on every task
        for seed, row in execution_plan(rows, ns):
            left = carry.tasks_left(row, seed, tasks, rows, ns.carried)
            # frozen-embedding scores once the model exists (mpnet), unless done or carried
            frozen = ns.study == "mpnet" and seed == ns.seed_list[0] and not frozen_done(row, ns)
            if not left and not frozen:
                continue
            folder, spent = prepare_model(row, ns)
            if spent:
                timings[f"prepare {row['name']}"] = round(spent, 1)
                save_state(ns, state)
            t0 = time.perf_counter()
            finetune_cells(row, folder, left, seed, ns)
            spent = time.perf_counter() - t0
            if frozen:
                from bench.study_mpnet import score_frozen

                t1 = time.perf_counter()
                score_frozen(row, ns)
                if frozen_done(row, ns):
                    timings[f"frozen {row['name']}"] = round(time.perf_counter() - t1, 1)
            if spent > 5:
                if len(left) == len(tasks):  # a seed's minutes: only when all its tasks ran here
                    timings[f"finetune {row['name']} seed {seed}"] = round(spent, 1)
                save_state(ns, state)
                report(ns, rows, tasks, state, command)
        # 2. speed and size, last: the machine is most likely quiet once the run's own work is done (a figure taken
        # beside other processes is not the model's speed; --remeasure_speed takes it again). One architecture for
        # all students, so the first student folder serves.
        first = next((r for r in rows if r["kind"] == "student" and r["objective"] == "none"), None)
        if ns.study == "mpnet":  # a speed per architecture, and the frozen-embedding scores
            from bench.study_mpnet import finish

            finish(rows, ns, state)
        elif not ns.skip_speed and "speed" not in state and first:
            prepare_model(first, ns)
            log("measuring inference speed")
            state["speed"] = measure_speed(teacher_path(ns), model_folder(first, ns), ns.quick)
            save_state(ns, state)
    report(ns, rows, tasks, state, command)
    if not ns.report_only:
        save_state(ns, state)
    return 0


def frozen_done(row: dict, ns) -> bool:
    from bench.study_mpnet import embed_scores, embeds_row

    return not embeds_row(row) or embed_scores(row, ns) is not None


def report(ns, rows, tasks, state: dict, command: str) -> None:
    """The study's report from what is done (the cells finished here and those carried from the committed report):
    docs/study.md's form, or the mpnet study's own (bench/study_mpnet)."""
    results = carry.merged(collect_results(rows, tasks, ns), getattr(ns, "carried", carry.EMPTY))
    if ns.study == "mpnet":
        from bench import study_mpnet

        study_mpnet.write_report(ns, rows, tasks, results, state, command)
        return
    write_report(ns, rows, tasks, results, state.get("speed"), params_of(rows, ns, state), state.get("timings", {}),
                 command, state.get("distill_speed"))


def priority(row: dict, ns) -> int:
    """0 teacher; 1 the first initialisation's rows (does distillation help, which objective); 2 every other
    initialisation fine-tuned only (how much the initialisation matters); 3 the floor and the outside reference;
    4 the rest (other initialisations distilled); 5 the rows of --extra_objectives."""
    if row["kind"] == "teacher":
        return 0
    if (row["kind"] == "student" and row["objective"] in getattr(ns, "extra_objective_list", [])
            and row["layers"] == ns.inits[0]):
        return 5
    if row.get("task_kd") and ns.study == "mpnet":  # the costliest rows: after every init fine-tuned only
        return 2
    if row["kind"] == "student" and row["layers"] == ns.inits[0]:
        return 1
    if row["kind"] == "student" and row["objective"] == "none":
        return 2
    return 3 if row["kind"] in ("random", "reference") else 4


def execution_plan(rows, ns) -> list[tuple[int, dict]]:
    """(seed, row) pairs: the first seed of priorities 0-3; each other seed of 0-1, followed by that seed's rows
    that read the teacher's fine-tuned models (task KD); then the other seeds of 2-3; then every seed of 4, one
    initialisation after another. A run
    stopped early (a shared machine, a deadline) has then answered the main questions with the most seeds, and a
    teacher seed fine-tuned on this machine (a report carries scores, not models) serves its task-KD rows before
    the machine goes; the table keeps the logical row order."""
    ranked = sorted(enumerate(rows), key=lambda item: (priority(item[1], ns), item[0]))
    first, rest = ns.seed_list[:1], ns.seed_list[1:]

    def reads_teacher(r: dict) -> bool:
        return bool(r.get("task_kd") or r.get("teachers")) and 2 <= priority(r, ns) <= 3

    plan = [(s, r) for s in first for _, r in ranked if priority(r, ns) <= 3]
    for s in rest:
        plan += [(s, r) for _, r in ranked if priority(r, ns) <= 1 or reads_teacher(r)]
    plan += [(s, r) for s in rest for _, r in ranked if 2 <= priority(r, ns) <= 3 and not reads_teacher(r)]
    # the rest init by init, every seed of one before the next: a stopped run has answered "which layers" with
    # the most seeds (the second init against the first) before the curve's other depths start
    plan += [(s, r) for layers in ns.inits for s in ns.seed_list for _, r in ranked
             if priority(r, ns) == 4 and r.get("layers") == layers]
    plan += [(s, r) for s in ns.seed_list for _, r in ranked if priority(r, ns) == 4 and r.get("layers") not in ns.inits]
    plan += [(s, r) for s in ns.seed_list for _, r in ranked if priority(r, ns) == 5]
    return plan


def params_of(rows, ns, state) -> dict:
    params = state.setdefault("params", {})
    for row in rows:
        folder = model_folder(row, ns)
        if row["name"] not in params and os.path.isfile(os.path.join(folder, "config.json")):
            params[row["name"]] = count_params(folder)
    return {row["name"]: params[row["name"]] for row in rows if row["name"] in params}  # this report's rows only


if __name__ == "__main__":
    sys.exit(main())
