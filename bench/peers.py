"""Side by side with the peers: the same distillation step in TextBrewer, torchdistill and this toolkit.

Run from the repository root, in an environment that holds the peers (see
``bench/requirements-peers.txt``; neither peer is a dependency of the toolkit)::

    python -m bench.peers --quick                 # < 15 min on a 2-core CPU
    python -m bench.peers                         # batch 8 for part 1, more rounds
    python -m bench.peers --only textbrewer       # part 1 only (torchdistill not installed)

Two comparisons, each on one torch build, both sides in the same process, same threads,
same precision (fp32), same weights:

1. **Task-agnostic step, against TextBrewer's ``GeneralDistiller``.** A BERT-base-shaped
   ``BertForMaskedLM`` teacher (random weights), a 4-layer student from its layers 1,5,8,12
   (``distill.models.student.build_student``), batch ``B x 128`` of packed blocks masked the
   DistilBERT way, the DistilBERT objective ``5*ce + 2*mlm + 1*cos`` at T=2, with ``ce`` on
   every real token (``full``) or on the MLM targets only (``masked``).
   TextBrewer runs the same objective through its own adaptor and configuration, converted to
   its conventions: its ``kd_loss_type="ce"`` is the same soft cross-entropy as our ``ce`` (not a
   KL) but without the T^2 factor, so ``kd_loss_weight = 5 * T^2``; MLM enters as its hard-label
   loss (the model's own ``loss`` from ``labels``, ``hard_label_weight = 2``); ``cos`` is an
   intermediate match of the last hidden states (weight 1, the attention mask as inputs mask);
   ``logits_mask`` is the attention mask (full) or the MLM targets (masked).
2. **Task step, against torchdistill.** A 6-layer BERT sequence classifier (width 768) as the
   teacher and a 3-layer student from its layers 2,4,6, ``kl`` at T=1 + ``hard_ce``, batch
   ``32 x 128`` (padded to the longest row). Ours is ``glue-eval --teacher``'s step, its pieces built
   as ``glue_eval.distillation.train_with_teacher`` builds them (``load_checked_teacher``,
   ``stage_objectives``, ``TeacherCache.build`` over ``plan_for``): ``DistillationTrainer.training_step``
   (the Trainer's forward, loss and backward), then the clip and optimiser step the Trainer's loop
   does. Timed twice: with the teacher cache, glue-eval's default (``vs_torchdistill_task``; the cache
   is built once over the rows the timed steps use, its build time reported apart and, per row, as
   its cost over an epoch of SST-2's training set), and with ``--no_teacher_cache``
   (``vs_torchdistill_task_uncached``: the teacher runs every step, as torchdistill's does); a third
   figure adds the build, amortised over a one-epoch run, to every cached step. A memory probe then
   splits our uncached step's peak into forward + backward and the optimiser step, with the Trainer's
   optimiser and with torch's default AdamW. torchdistill's is its
   ``DistillationBox`` (``forward_process`` + ``post_forward_process``: backward, clip, step)
   with ``WeightedSumLoss`` over ``KDLoss(temperature=1, alpha=1, beta=1)``, the classifier's
   output taken by its forward hook: ``1 * CE + 1 * T^2 * KL(batchmean)``.

**Same math first.** On one batch, with the same weights and dropout off, both sides compute the
total loss (ours in part 2 cached and uncached: the cached logits equal a fresh forward);
``loss_match_*`` is the largest relative difference (must be <= 1e-5). Then one
optimiser step per side (forward, loss, backward, grad clip, AdamW step) is timed in interleaved
rounds (A B C D, D C B A, ...): ``vs_*`` is the median over rounds of peer time / our time
(> 1: we are faster). Peak memory per side is the largest rise of the process's resident set
(CPU; VmHWM, reset before every step) or of allocated CUDA memory during one of its steps.

Writes ``docs/peers.json`` and ``docs/peers.md`` (``--out``), then prints one ``name: value`` line
per figure.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import os
import sys
import tempfile
import time

import torch

# Timing, batches, /proc readings and the machine record, shared with the other benches.
from bench.common import (
    ROOT,
    Clock,
    command_line,
    interleaved,
    machine,
    make_batch,
    paired_ratio,
    set_threads,
    summary,
    teacher_config,
    vm_kb,
)

# "Ours": the toolkit's public pieces, imported here only, so they can be re-pointed in one place.
from distill.common.errors import UsageError, quiet_library_progress
from distill.common.io import atomic_write_json, atomic_write_text
from distill.models.loading import extract
from distill.models.student import build_student
from distill.objective.plan import Objective
from distill.train.precision import Precision
from glue_eval.distillation import (
    load_checked_teacher,
    needs_attention,
    stage_objectives,
)
from glue_eval.teacher_cache import TeacherCache, plan_for
from glue_eval.trainer import DistillationTrainer, teacher_autocast

SEQ = 128
AGNOSTIC_WEIGHTS = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
AGNOSTIC_T = 2.0
AGNOSTIC_LAYERS = [1, 5, 8, 12]
AGNOSTIC_OPTIM = dict(lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)  # DistilBERT's
AGNOSTIC_CLIP = 5.0
TASK_WEIGHTS = {"kl": 1.0, "hard_ce": 1.0}
TASK_T = 1.0
TASK_TEACHER_LAYERS = 6
TASK_LAYERS = [2, 4, 6]
TASK_LABELS = 2
TASK_OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # torchdistill's GLUE KD sample
TASK_CLIP = 1.0  # the Trainer's default max_grad_norm, and torchdistill's GLUE KD sample
SST2_TRAIN_ROWS = 67349  # GLUE SST-2's training split: what one epoch of the cache's build cost is projected over

PEERS = {
    "textbrewer": "textbrewer==0.2.1.post1",
    "torchdistill": "torchdistill==1.1.5",
}
INSTALL_HINT = ("pip install -r bench/requirements-peers.txt in a bench-only environment "
                "(see the file for why), or leave the part out with --only")

QUICK = dict(agnostic_batch=4, task_batch=32, repeats=5)
FULL = dict(agnostic_batch=8, task_batch=32, repeats=9)
# --smoke: every code path and the report on narrow models (same layer counts), in seconds; no figures to quote.
SMOKE = dict(agnostic_batch=1, task_batch=2, repeats=1)
SMOKE_SHAPE = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
FIGURES = ("loss_match_textbrewer", "vs_textbrewer_full", "vs_textbrewer_masked", "vs_textbrewer_full_default_adamw",
           "loss_match_torchdistill", "vs_torchdistill_task", "vs_torchdistill_task_uncached",
           "vs_torchdistill_task_cached_with_build_1_epoch", "vs_torchdistill_task_default_adamw",
           "vs_torchdistill_task_uncached_length_groups")
# vs_torchdistill_task is glue-eval's default step (teacher cache); the other two are its honest brackets.
TARGETS = {"loss_match_textbrewer": ("<=", 1e-5), "vs_textbrewer_full": (">=", 1.3),
           "vs_textbrewer_masked": (">=", 1.5), "loss_match_torchdistill": ("<=", 1e-5),
           "vs_torchdistill_task": (">=", 1.1), "vs_torchdistill_task_uncached": None,
           "vs_torchdistill_task_cached_with_build_1_epoch": None, "vs_textbrewer_full_default_adamw": None,
           "vs_torchdistill_task_default_adamw": None, "vs_torchdistill_task_uncached_length_groups": None}
TASK_GROUPS = 3  # --length_groups of the uncached step's grouped variant (the batch as up to 3 length groups)
# Every side steps with torch's AdamW fused (one kernel over all parameters): what distill-train and the Trainer
# build, and what each peer builds when asked. The *_default_adamw brackets give the peer torch's default AdamW
# (a Python loop over the parameters), which is what its own examples and configs build unless told otherwise.
FUSED = {"fused": True}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_peer(name: str):
    """The peer's module, or one UsageError line saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise UsageError(f"{name} is not importable here ({err}): the peer comparison needs {PEERS[name]}; "
                         f"{INSTALL_HINT}") from None


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every ``nn.Dropout`` in ``model`` to ``p`` (0: the training-mode forward equals eval mode's)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


# --------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory a step adds above what was held before it: CUDA allocations, or resident set on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_resettable = device.type == "cpu" and self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")  # VmHWM := current RSS
            return True
        except OSError:
            return False

    def start(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not self.cpu_resettable:
            return float("nan")
        self._reset_hwm()
        return vm_kb("VmRSS") * 1024.0

    def stop(self, base: float) -> float:
        """Bytes above ``base`` at the peak since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        if not self.cpu_resettable:
            return float("nan")
        return vm_kb("VmHWM") * 1024.0 - base


# --------------------------------------------------------------------------------------- 1. TextBrewer


def agnostic_models(device: torch.device, **shape):
    """BERT-base-shaped BertForMaskedLM teacher (random weights, eval, frozen) and its 1,5,8,12 student."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(teacher_config(**shape)).to(device).eval()
    teacher.requires_grad_(False)
    student, _ = build_student(teacher, AGNOSTIC_LAYERS)
    return teacher, student.to(device)


class OursAgnostic:
    """The engine's step for ``5*ce + 2*mlm + 1*cos``: teacher ``extract`` under no_grad, student
    ``extract``, ``Objective`` (heads only where a term reads them)."""

    def __init__(self, teacher, student, layers, restrict_ce_to_mask: bool, logit_chunk_rows: int = 0):
        self.teacher, self.student = teacher, student
        device = next(student.parameters()).device
        self.objective = Objective.from_config(
            AGNOSTIC_WEIGHTS, AGNOSTIC_T, student_config=student, teacher_config=teacher, student_layers=layers,
            restrict_ce_to_mask=restrict_ce_to_mask, logit_chunk_rows=logit_chunk_rows).to(device)

    def loss(self, batch: dict) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            t = extract(self.teacher, ids, mask, **self.objective.extract_kwargs(batch, "teacher"))
        s = extract(self.student, ids, mask, **self.objective.extract_kwargs(batch, "student"))
        return self.objective(s, t, batch)[0]


def textbrewer_config(teacher, student, restrict_ce_to_mask: bool) -> dict:
    """TextBrewer's DistillationConfig arguments for our objective, converted to its conventions."""
    return {
        "temperature": AGNOSTIC_T,
        "kd_loss_type": "ce",  # -sum p_t log p_s, mean over rows: our ce without T^2
        "kd_loss_weight": AGNOSTIC_WEIGHTS["ce"] * AGNOSTIC_T ** 2,
        "hard_label_weight": AGNOSTIC_WEIGHTS["mlm"],  # the student's own MLM loss, from "labels"
        "intermediate_matches": [{
            "layer_T": teacher.config.num_hidden_layers, "layer_S": student.config.num_hidden_layers,
            "feature": "hidden", "loss": "cos", "weight": AGNOSTIC_WEIGHTS["cos"]}],
        "logits_mask": "mlm targets" if restrict_ce_to_mask else "attention mask",
    }


class TextBrewerAgnostic:
    """TextBrewer's GeneralDistiller on the same models: its adaptors, its loss, its batch layout."""

    def __init__(self, teacher, student, restrict_ce_to_mask: bool, output_dir: str):
        import_peer("textbrewer")
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        self.config = textbrewer_config(teacher, student, restrict_ce_to_mask)
        d_config = DistillationConfig(**{k: v for k, v in self.config.items() if k != "logits_mask"})
        device = next(student.parameters()).device
        t_config = TrainingConfig(device=device, output_dir=output_dir, log_dir=None)
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self._logits_mask = None  # set per batch in loss(): the rows the soft loss reads

        def adaptor_t(batch, out):
            return {"logits": out.logits, "hidden": out.hidden_states, "inputs_mask": batch["attention_mask"],
                    "logits_mask": self._logits_mask}

        def adaptor_s(batch, out):
            return {**adaptor_t(batch, out), "losses": out.loss}

        self.distiller = GeneralDistiller(t_config, d_config, teacher, student, adaptor_t, adaptor_s)

    @staticmethod
    def batch(batch: dict) -> dict:
        """Our batch in TextBrewer's layout: the student's inputs carry the MLM labels, the teacher's do not."""
        common = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return {"teacher": common, "student": {**common, "labels": batch["mlm_labels"]}}

    def loss(self, tb_batch: dict) -> torch.Tensor:
        student = tb_batch["student"]
        self._logits_mask = (student["labels"] != -100) if self.restrict_ce_to_mask else student["attention_mask"]
        total, _ = self.distiller.train_on_batch(tb_batch, {"output_hidden_states": True})
        return total


def engine_step(ours: OursAgnostic, optimizer, prec, batch: dict):
    """Our step as distill-train runs it: forward and loss under the precision's autocast, backward, clip, step."""
    def step():
        with prec.autocast():
            loss = ours.loss(batch)
        prec.backward(loss)
        prec.step(optimizer, AGNOSTIC_CLIP)
    return step


def textbrewer_step(distiller: TextBrewerAgnostic, optimizer, tb_batch: dict, max_grad_norm: float):
    """One step as TextBrewer's own training loop does it (fp32: backward, clip, step, zero_grad)."""
    total = distiller.loss(tb_batch)
    total.backward()
    torch.nn.utils.clip_grad_norm_(distiller.distiller.model_S.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return total.detach()


def loss_match_textbrewer(teacher, student, layers, batch: dict, output_dir: str) -> dict:
    """Both sides' total loss on one batch, same weights, dropout off (eval mode), per variant."""
    student = copy.deepcopy(student).eval()
    out = {}
    with torch.no_grad():
        for variant, masked in (("full", False), ("masked", True)):
            ours = OursAgnostic(teacher, student, layers, masked).loss(batch)
            peer = TextBrewerAgnostic(teacher, student, masked, output_dir).loss(TextBrewerAgnostic.batch(batch))
            out[variant] = {"ours": float(ours), "textbrewer": float(peer), "relative_difference":
                            relative_difference(ours, peer)}
    return out


def bench_textbrewer(cfg: dict, device: torch.device, clock: Clock, work: str, shape: dict | None = None) -> dict:
    teacher, student0 = agnostic_models(device, **(shape or {}))
    batch = {k: v.to(device) for k, v in make_batch(cfg["agnostic_batch"], teacher.config.vocab_size).items()}
    match = loss_match_textbrewer(teacher, student0, AGNOSTIC_LAYERS, batch, work)
    log("TextBrewer loss match: " + ", ".join(f"{v} {m['relative_difference']:.2e}" for v, m in match.items()))

    tb_batch = TextBrewerAgnostic.batch(batch)
    memory = PeakMemory(device)
    peaks: dict[str, list[float]] = {}
    variants = {}
    for variant, masked in (("masked", True), ("full", False)):
        # each side trains its own copy with its own AdamW, from the same start
        prec = Precision.from_config("fp32", device=device)
        ours_student = copy.deepcopy(student0).train()
        ours = OursAgnostic(teacher, ours_student, AGNOSTIC_LAYERS, masked)
        ours_opt = prec.make_optimizer(list(ours_student.parameters()), torch.optim.AdamW, **AGNOSTIC_OPTIM)
        tb_student = copy.deepcopy(student0).train()
        tb = TextBrewerAgnostic(teacher, tb_student, masked, work)
        tb_opt = torch.optim.AdamW(tb_student.parameters(), **AGNOSTIC_OPTIM, **FUSED)
        assert ours_opt.defaults["fused"] and tb_opt.defaults["fused"], "both sides step with fused AdamW"

        ours_step = engine_step(ours, ours_opt, prec, batch)

        def tb_step(tb=tb, tb_opt=tb_opt):
            textbrewer_step(tb, tb_opt, tb_batch, AGNOSTIC_CLIP)

        for name, step in ((f"ours_{variant}", ours_step), (f"textbrewer_{variant}", tb_step)):
            variants[name] = _measured(step, memory, peaks.setdefault(name, []))
        if variant == "full":  # our step with the whole vocabulary head at once (logit_chunk_rows -1): before/after
            whole_student = copy.deepcopy(student0).train()
            whole = OursAgnostic(teacher, whole_student, AGNOSTIC_LAYERS, masked, logit_chunk_rows=-1)
            whole_prec = Precision.from_config("fp32", device=device)
            whole_opt = whole_prec.make_optimizer(list(whole_student.parameters()), torch.optim.AdamW, **AGNOSTIC_OPTIM)
            name = "ours_full_whole_head"
            variants[name] = _measured(engine_step(whole, whole_opt, whole_prec, batch), memory,
                                       peaks.setdefault(name, []))
        if variant == "full":  # the bracket: TextBrewer with torch's default AdamW
            tb_default_student = copy.deepcopy(student0).train()
            tb_default = TextBrewerAgnostic(teacher, tb_default_student, masked, work)
            tb_default_opt = torch.optim.AdamW(tb_default_student.parameters(), **AGNOSTIC_OPTIM)
            name = "textbrewer_full_default_adamw"
            variants[name] = _measured(lambda: textbrewer_step(tb_default, tb_default_opt, tb_batch, AGNOSTIC_CLIP),
                                       memory, peaks.setdefault(name, []))
    log(f"TextBrewer step, batch {cfg['agnostic_batch']} x {SEQ}, {cfg['repeats']} rounds")
    times = interleaved(variants, cfg["repeats"], 1, clock)
    ratios = {v: paired_ratio(times, f"textbrewer_{v}", f"ours_{v}") for v in ("full", "masked")}
    ratios["full_default_adamw"] = paired_ratio(times, "textbrewer_full_default_adamw", "ours_full")
    ratios["chunked_head"] = paired_ratio(times, "ours_full_whole_head", "ours_full")
    # peaks of the timed rounds only: the warm-up steps also allocate AdamW's state
    steps = {n: {**summary(t), "peak_memory_mb": _mb(max(peaks[n][-cfg["repeats"]:]))} for n, t in times.items()}
    profiles = profile_steps(variants, device) if cfg.get("profile") else None  # after: it holds memory of its own
    return {
        "setup": {"teacher": f"BertForMaskedLM {teacher.config.num_hidden_layers} x {teacher.config.hidden_size} "
                             "(random weights)", "student_layers": AGNOSTIC_LAYERS,
                  "batch": cfg["agnostic_batch"], "seq": SEQ, "tokens_per_step": int(batch["attention_mask"].sum()),
                  "masked_positions": int((batch["mlm_labels"] != -100).sum()),
                  "objective": "5*ce + 2*mlm + 1*cos, T=2", "optimizer": {"AdamW": _jsonable({**AGNOSTIC_OPTIM, **FUSED})},
                  "max_grad_norm": AGNOSTIC_CLIP, "precision": "fp32"},
        "peer_config": {v: textbrewer_config(teacher, student0, v == "masked") for v in ("full", "masked")},
        "loss_match": match,
        "loss_match_textbrewer": max(m["relative_difference"] for m in match.values()),
        "steps": steps,
        "ratio_details": ratios,
        "vs_textbrewer_full": ratios["full"]["value"],
        "vs_textbrewer_masked": ratios["masked"]["value"],
        "vs_textbrewer_full_default_adamw": ratios["full_default_adamw"]["value"],
        "chunked_head_speedup": ratios["chunked_head"]["value"],
        "profiles": profiles,
    }


# --------------------------------------------------------------------------------------- 2. torchdistill


def task_models(device: torch.device, folder: str, **shape):
    """A 6-layer BERT classifier teacher and the glue-eval student (a 2,4,6 copy with a fresh head), both
    saved and reloaded with ``from_pretrained``; returns (teacher folder, teacher, student)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(**{**teacher_config(**shape).to_dict(), "num_hidden_layers": TASK_TEACHER_LAYERS,
                           "num_labels": TASK_LABELS, "architectures": ["BertForSequenceClassification"]})
    teacher = BertForSequenceClassification(config)
    # A fine-tuned teacher is confident. At init (std 0.02) its logits are ~0 and both models near uniform, so
    # the KL would vanish and the loss match would check hard_ce alone.
    torch.nn.init.normal_(teacher.classifier.weight, std=1.0)
    teacher_dir = os.path.join(folder, "teacher")
    teacher.save_pretrained(teacher_dir)
    base = BertModel.from_pretrained(teacher_dir)
    student_base, _ = build_student(base, TASK_LAYERS)
    student_dir = os.path.join(folder, "student")
    student_base.save_pretrained(student_dir)
    torch.manual_seed(1)
    student = BertForSequenceClassification.from_pretrained(student_dir, num_labels=TASK_LABELS)
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).to(device).eval()
    return teacher_dir, teacher, student.to(device)


def task_batch(batch: int, vocab: int, device: torch.device, seed: int = 0) -> dict:
    """``[CLS] ... [SEP]`` rows of 32..128 tokens padded to the longest (as DataCollatorWithPadding does),
    with random labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, SEQ + 1, (batch,), generator=g)
    lengths[0] = SEQ
    ids = torch.randint(999, vocab, (batch, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(batch), lengths - 1] = 102
    ids = ids * mask
    return {"input_ids": ids.to(device), "token_type_ids": torch.zeros_like(ids).to(device),
            "attention_mask": mask.to(device), "labels": torch.randint(0, TASK_LABELS, (batch,), generator=g).to(device)}


def rows_of(batch: dict):
    """The padded batch as the tokenized training rows glue-eval caches over (real tokens only, a ``row``
    column 0..B-1), and the batch with that ``row`` column added (what the Trainer's collator hands over)."""
    from datasets import Dataset

    lengths = batch["attention_mask"].sum(1).tolist()
    columns = ("input_ids", "token_type_ids", "attention_mask")
    data = {c: [batch[c][i, :n].tolist() for i, n in enumerate(lengths)] for c in columns}
    data["row"] = list(range(len(lengths)))
    return Dataset.from_dict(data), {**batch, "row": torch.arange(len(lengths), device=batch["labels"].device)}


def pad_rows(rows: list[dict]) -> dict:
    """List of tokenized rows -> ``[B, longest]`` tensors, zeros after each row (DataCollatorWithPadding's
    layout for BERT, whose [PAD] id is 0; the bench's random ids have no tokenizer)."""
    longest = max(len(r["input_ids"]) for r in rows)
    return {k: torch.tensor([r[k] + [0] * (longest - len(r[k])) for r in rows]) for k in rows[0] if k != "row"}


def ours_task_trainer(teacher_dir: str, student, device: torch.device, work: str, cache_over: dict | None = None,
                      length_groups: int = 1):
    """``glue-eval --teacher``'s trainer for this student, built as ``train_with_teacher`` builds it: the checked
    teacher, the stage's (soft, hard) objectives (kl at T=1 + hard_ce), and, with ``cache_over`` (a batch), the
    teacher cache glue-eval uses by default, built over that batch's rows. Returns (trainer, cache build s or
    None) and the zero-argument function that builds that cache again (None without ``cache_over``), for timing;
    the cached trainer's steps take ``rows_of(batch)[1]`` (the batch with its ``row`` column)."""
    from glue_eval.arguments import GlueArguments, GlueTrainingArguments
    from glue_eval.tasks import get_task

    glue = GlueArguments(model="(in memory)", task="SST-2", teacher=teacher_dir,
                         distill_weights=json.dumps(TASK_WEIGHTS), temperature=TASK_T,
                         teacher_cache=cache_over is not None)
    args = GlueTrainingArguments(output_dir=os.path.join(work, "glue"), report_to="none", use_cpu=device.type == "cpu",
                                 learning_rate=TASK_OPTIM["lr"], adam_beta1=TASK_OPTIM["betas"][0],
                                 adam_beta2=TASK_OPTIM["betas"][1], adam_epsilon=TASK_OPTIM["eps"],
                                 weight_decay=TASK_OPTIM["weight_decay"], max_grad_norm=TASK_CLIP,
                                 per_device_train_batch_size=32, disable_tqdm=True, length_groups=length_groups)
    task = get_task("SST-2")
    teacher = load_checked_teacher(glue, task, student, needs_attention(TASK_WEIGHTS))
    soft, hard = stage_objectives(TASK_WEIGHTS, glue, student, teacher)
    build = None
    if glue.teacher_cache:
        teacher.to(args.device)
        dataset, _ = rows_of(cache_over)

        def build():
            return TeacherCache.build(teacher, dataset, pad_rows, plan_for([soft]), limit_mb=glue.teacher_cache_mb,
                                      batch_size=args.per_device_eval_batch_size, device=args.device,
                                      autocast=lambda: teacher_autocast(args))
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, soft=soft, hard=hard,
                                  teacher_cache=build() if build else None)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop, which we do not run
    return trainer, build


def ours_task_step(trainer, batch: dict):
    """What the Trainer's loop does per step: training_step (forward, loss, backward), clip, step, zero_grad."""
    loss = trainer.training_step(trainer.model, dict(batch))
    trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return loss


def torchdistill_train_config(fused: bool = True) -> dict:
    """torchdistill's train config for kl(T=1) + hard_ce: KDLoss on the classifier's output (forward hook);
    its AdamW fused unless ``fused=False`` (torch's default, a loop over the parameters)."""
    model = {"forward_proc": "forward_batch_only_as_kwargs", "adaptations": None, "sequential": [],
             "wrapper": None, "frozen_modules": [], "forward_hook": {"input": [], "output": ["classifier"]}}
    return {
        "num_epochs": 1,
        "teacher": {**model, "requires_grad": False},
        "student": {**model, "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": _jsonable({**TASK_OPTIM, **(FUSED if fused else {})}),
                      "filters_params": True,
                      "max_grad_norm": TASK_CLIP, "grad_accum_step": 1},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": "classifier", "student_module_io": "output",
                "teacher_module_path": "classifier", "teacher_module_io": "output",
                "temperature": TASK_T, "alpha": TASK_WEIGHTS["hard_ce"], "beta": TASK_WEIGHTS["kl"],
                "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }


def torchdistill_box(teacher, student, device: torch.device, fused: bool = True):
    import_peer("torchdistill")
    from torchdistill.core.distillation import get_distillation_box

    return get_distillation_box(teacher, student, {}, copy.deepcopy(torchdistill_train_config(fused)), device,
                                [device.index] if device.type == "cuda" else None, False, 1)


def torchdistill_step(box, batch: dict):
    """One step of torchdistill's loop: forward_process (teacher no_grad, student, criterion) and
    post_forward_process (backward, clip, step, zero_grad)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = box.forward_process(inputs, targets=batch["labels"])
    box.post_forward_process(loss=loss)
    return loss.detach()


def loss_match_torchdistill(teacher_dir, teacher, student, device, batch: dict, work: str) -> dict:
    """Both sides' total loss on one batch, same weights, dropout off: ours uncached and cached (the cached
    logits must equal a fresh forward), torchdistill's. The trainer's compute_loss adds the teacher terms in
    training mode only, so the students are in training mode with every dropout at 0."""
    student = copy.deepcopy(student)
    set_dropout(student, 0.0)
    student.train()
    trainer, _ = ours_task_trainer(teacher_dir, student, device, work)
    cached, _ = ours_task_trainer(teacher_dir, student, device, work, cache_over=batch)
    set_dropout(trainer.teacher, 0.0)
    box = torchdistill_box(trainer.teacher, student, device)
    with torch.no_grad():
        ours = trainer.compute_loss(student, dict(batch))
        ours_cached = cached.compute_loss(student, rows_of(batch)[1])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        peer = box.forward_process(inputs, targets=batch["labels"])
    box.clean_modules()
    assert cached.teacher_forwards == 0, "the cached step ran the teacher"
    return {"ours": float(ours), "ours_cached": float(ours_cached), "torchdistill": float(peer),
            "relative_difference": max(relative_difference(ours, peer), relative_difference(ours_cached, peer))}


def fixed_malloc_thresholds() -> bool:
    """glibc only: give every allocation over 64 KiB its own mapping and trim the heap at 64 KiB, so freed
    memory goes back to the system at once and a step's resident-set rise is its peak of live memory.

    By default glibc's thresholds move with the history of frees and freed memory stays mapped, so the
    rise of one step depends on the steps before it (the timed rounds' peaks vary by 2x from round to round).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 65536)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 65536))


def memory_probe(trainer, cached, box, batch: dict, memory: PeakMemory, rounds: int = 2) -> dict:
    """Peak memory of each task step with glibc's thresholds fixed (:func:`fixed_malloc_thresholds`; CUDA
    allocations need no such care), the largest of ``rounds`` steps after one untimed step each: ours
    uncached, ours cached, torchdistill's, and ours uncached with the teacher run before the student's
    forward (its features handed to the step), which is torchdistill's order. Every optimiser's state exists
    before its measured steps. Run after the timings: the thresholds stay fixed for the rest of the process."""
    fixed = memory.device.type == "cuda" or fixed_malloc_thresholds()
    cached_batch = rows_of(batch)[1]
    fresh = trainer.teacher_features

    def teacher_first():
        features = fresh(batch)
        trainer.teacher_features = lambda inputs: features
        try:
            ours_task_step(trainer, batch)
        finally:
            trainer.teacher_features = fresh

    steps = {"ours_task": lambda: ours_task_step(trainer, batch),
             "ours_task_cached": lambda: ours_task_step(cached, cached_batch),
             "torchdistill_task": lambda: torchdistill_step(box, batch),
             "ours_task_teacher_first": teacher_first}
    out = {"allocator": "glibc thresholds fixed at 64 KiB" if fixed else "default (not fixable here)",
           "trainer_optimizer": type(trainer.optimizer).__name__,
           "trainer_optimizer_flags": {k: v for k, v in (getattr(trainer.optimizer, "defaults", None) or {}).items()
                                       if k in ("fused", "foreach")}}
    for name, step in steps.items():
        step()
        peaks = []
        for _ in range(rounds):
            base = memory.start()
            step()
            peaks.append(memory.stop(base))
        out[f"{name}_mb"] = _mb(max(peaks))
    log(f"memory probe: {out}")
    return out


def teacher_cache_cost(times: dict, build_times: list, rows: int, ratios: dict) -> dict:
    """The teacher cache's build cost, per row and projected over an epoch of SST-2; adds the one-epoch figure
    ``task_cached_with_build_1_epoch`` (each cached step plus the build of its rows) to ``ratios``."""
    # The cache is built once per run over the whole training set: per epoch it costs one teacher pass over
    # the set, i.e. its per-row build time times the batch on every step of the first epoch (or that / E over
    # E epochs). The figure with it is the one-epoch worst case.
    build_s = summary(build_times)["median_s"]
    per_row_s = build_s / rows
    amortised = per_row_s * rows
    cached_with_build = [(w + bw, c + bc, None) for (w, c, _), (bw, bc, _) in zip(times["ours_task_cached"],
                                                                                  build_times)]
    ratios["task_cached_with_build_1_epoch"] = paired_ratio(
        {"td": times["torchdistill_task"], "ours": cached_with_build}, "td", "ours")
    return {"rows": rows, "build_s": build_s, "build_runs_s": summary(build_times)["runs_s"],
            "build_s_per_row": per_row_s,
            "build_batch_size": 128, "task_train_rows": SST2_TRAIN_ROWS,
            "build_s_per_epoch_of_task": per_row_s * SST2_TRAIN_ROWS,
            "build_s_per_step_over_1_epoch": amortised,
            "note": "build_s: median over the rounds of building the cache over the batch's rows; per_epoch = "
                    "per_row x the SST-2 training rows "
                    "(a projection: the cache is built once per run, so over E epochs divide by E)"}


def task_setup(teacher, batch: dict, batch_size: int) -> dict:
    """Part 2's setup as its report records it."""
    return {"teacher": f"BertForSequenceClassification {TASK_TEACHER_LAYERS} x {teacher.config.hidden_size} "
                       "(random weights), "
                       f"{TASK_LABELS} labels", "student_layers": TASK_LAYERS, "batch": batch_size,
            "seq": SEQ, "tokens_per_step": int(batch["attention_mask"].sum()),
            "objective": "1*kl(T=1) + 1*hard_ce", "optimizer": {"AdamW": _jsonable({**TASK_OPTIM, **FUSED})},
            "max_grad_norm": TASK_CLIP, "precision": "fp32",
            "ours": "glue_eval.trainer.DistillationTrainer.training_step + clip + the Trainer's optimizer step; "
                    "ours_task_cached: with glue-eval's default teacher cache (TeacherCache over the batch's "
                    "rows), ours_task: --no_teacher_cache"}


def bench_torchdistill(cfg: dict, device: torch.device, clock: Clock, work: str, shape: dict | None = None) -> dict:
    import_peer("torchdistill")
    teacher_dir, teacher, student0 = task_models(device, work, **(shape or {}))
    batch = task_batch(cfg["task_batch"], teacher.config.vocab_size, device)
    match = loss_match_torchdistill(teacher_dir, teacher, student0, device, batch, work)
    log(f"torchdistill loss match: {match['relative_difference']:.2e}")

    ours_student = copy.deepcopy(student0).train()
    trainer, _ = ours_task_trainer(teacher_dir, ours_student, device, work)
    grouped, _ = ours_task_trainer(teacher_dir, copy.deepcopy(student0).train(), device, work,
                                   length_groups=TASK_GROUPS)
    cached_student = copy.deepcopy(student0).train()
    cached, build_cache = ours_task_trainer(teacher_dir, cached_student, device, work, cache_over=batch)
    cached_batch = rows_of(batch)[1]
    td_student = copy.deepcopy(student0).train()
    box = torchdistill_box(teacher, td_student, device)
    assert box.optimizer.defaults["fused"], "torchdistill steps with fused AdamW, as the Trainer does"
    td_default_student = copy.deepcopy(student0).train()
    box_default = torchdistill_box(teacher, td_default_student, device, fused=False)  # the bracket
    memory = PeakMemory(device)

    def rebuild_cache() -> None:  # None: the clock reads a returned value as phase times
        build_cache()

    peaks = {"ours_task": [], "ours_task_cached": [], "torchdistill_task": [], "torchdistill_task_default_adamw": [],
             "ours_task_length_groups": []}
    variants = {"ours_task_cached": _measured(lambda: ours_task_step(cached, cached_batch), memory,
                                              peaks["ours_task_cached"]),
                "ours_task": _measured(lambda: ours_task_step(trainer, batch), memory, peaks["ours_task"]),
                "ours_task_length_groups": _measured(lambda: ours_task_step(grouped, batch), memory,
                                                     peaks["ours_task_length_groups"]),
                "torchdistill_task": _measured(lambda: torchdistill_step(box, batch), memory,
                                               peaks["torchdistill_task"]),
                "torchdistill_task_default_adamw": _measured(lambda: torchdistill_step(box_default, batch), memory,
                                                             peaks["torchdistill_task_default_adamw"]),
                # timed in the same rounds, so the same load: once cold, its first build would overstate it
                "teacher_cache_build": rebuild_cache}
    log(f"torchdistill step, batch {cfg['task_batch']} x {SEQ}, {cfg['repeats']} rounds")
    times = interleaved(variants, cfg["repeats"], 1, clock)
    build_times = times.pop("teacher_cache_build")
    assert cached.teacher_forwards == 0, "the cached step ran the teacher"
    ratios = {"task": paired_ratio(times, "torchdistill_task", "ours_task_cached"),
              "task_uncached": paired_ratio(times, "torchdistill_task", "ours_task"),
              "task_uncached_length_groups": paired_ratio(times, "torchdistill_task", "ours_task_length_groups"),
              "task_default_adamw": paired_ratio(times, "torchdistill_task_default_adamw", "ours_task_cached")}
    # peaks of the timed rounds only: the warm-up steps also allocate AdamW's state
    steps = {n: {**summary(t), "peak_memory_mb": _mb(max(peaks[n][-cfg["repeats"]:]))} for n, t in times.items()}
    cache = teacher_cache_cost(times, build_times, cfg["task_batch"], ratios)
    probe = memory_probe(trainer, cached, box, batch, memory) if cfg.get("memory_probe", True) else None
    profiles = profile_steps(variants, device) if cfg.get("profile") else None  # after: it holds memory of its own
    box.clean_modules()
    box_default.clean_modules()
    return {
        "setup": task_setup(teacher, batch, cfg["task_batch"]),
        "peer_config": torchdistill_train_config(),
        "loss_match": match,
        "loss_match_torchdistill": match["relative_difference"],
        "steps": steps,
        "teacher_cache": cache,
        "ratio_details": ratios,
        "vs_torchdistill_task": ratios["task"]["value"],
        "vs_torchdistill_task_uncached": ratios["task_uncached"]["value"],
        "vs_torchdistill_task_uncached_length_groups": ratios["task_uncached_length_groups"]["value"],
        "vs_torchdistill_task_cached_with_build_1_epoch": ratios["task_cached_with_build_1_epoch"]["value"],
        "vs_torchdistill_task_default_adamw": ratios["task_default_adamw"]["value"],
        "memory_probe": probe,
        "profiles": profiles,
    }


# --------------------------------------------------------------------------------------- shared pieces


def _measured(step, memory: PeakMemory, peaks: list):
    def run():
        base = memory.start()
        step()
        peaks.append(memory.stop(base))
    return run


def profile_steps(steps: dict, device: torch.device, top: int = 12) -> dict[str, str]:
    """torch.profiler table (top ops by self time) of one step of each side, for the "why" of a ratio."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, step in steps.items():
        with profile(activities=activities, record_shapes=True) as prof:
            step()
        tables[name] = prof.key_averages(group_by_input_shape=True).table(
            sort_by=key, row_limit=top, max_name_column_width=32, max_shapes_column_width=48)
        log(f"profile of one {name} step:\n{tables[name]}")
    return tables


def _mb(x: float) -> float | None:
    return None if x != x else round(x / 2**20, 1)


def _jsonable(optim: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in optim.items()}


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "textbrewer", "torchdistill", "torchvision", "accelerate"):
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    out["torch_cuda_build"] = torch.version.cuda
    return out


def memory_finding(probe: dict, steps: dict) -> str:
    """The cause of the timed rounds' peak-memory gap, in one paragraph, from the probe's numbers."""
    ours, cached, td, first = (probe[f"{k}_mb"] for k in ("ours_task", "ours_task_cached", "torchdistill_task",
                                                         "ours_task_teacher_first"))
    timed = {k: v["peak_memory_mb"] for k, v in steps.items()}
    return (f"Why the timed rounds' peaks differ (ours_task {timed.get('ours_task')} MB, torchdistill_task "
            f"{timed.get('torchdistill_task')} MB, ours_task_cached {timed.get('ours_task_cached')} MB): mostly "
            "the allocator. Those peaks are resident-set rises under glibc's default thresholds, which keep freed "
            "memory mapped and move with the history of frees, so a step's rise depends on what ran before it. "
            f"With the thresholds fixed, ours uncached peaks at {ours} MB, torchdistill at {td} MB and ours "
            f"cached at {cached} MB (the same fused AdamW as the uncached step)"
            + (", so the optimiser is not the cause" if cached <= td or close(cached, td) else "") + ". "
            + (f"The {ours - td:+.1f} MB left is the order of the forwards: our step runs the teacher after the "
               "student's forward, so the teacher's transient activations sit on top of the student's saved ones; "
               f"run the teacher first (torchdistill's order) and ours peaks at {first} MB."
               if ours > td and close(first, td) else
               f"Run with the teacher first (torchdistill's order), ours peaks at {first} MB."))


def close(a: float, b: float, rel: float = 0.02) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)


def ratio_key(figure: str) -> str:
    """``vs_textbrewer_full`` -> ``full``, ``vs_torchdistill_task_uncached`` -> ``task_uncached``: its key in
    the part's ``ratio_details``."""
    return figure.split("_", 2)[2]


def load_note(m: dict) -> str:
    """What the load average at the start says: other processes held cores in the minute before, or not."""
    load, cores = (m.get("load_average_at_start") or [None])[0], m.get("usable_cores")
    if not isinstance(load, (int, float)) or not isinstance(cores, int) or cores < 1:
        return ""
    if load >= 0.5 * cores:
        return (f" (a 1-minute average of {load:.1f} on {cores} cores: other processes, a previous run for one, held "
                "cores in the minute before)")
    return f" (below half of {cores} cores: the machine was about idle)"


def full_margin(st: dict, target: float) -> str:
    """What the full step's median time leaves at the target ratio (``st``: step -> median seconds)."""
    needed = st["textbrewer_full"] / target
    if st["ours_full"] <= needed:
        return (f"At the target of {target:g} (on the median step times) our full step could take {needed:.2f} s: "
                f"it has {needed - st['ours_full']:.2f} s in hand.")
    return (f"A ratio of {target:g} would need our full step at {needed:.2f} s, i.e. {st['ours_full'] - needed:.2f} s "
            "less than measured, with those matmuls left in place; the lever beyond is the matmuls' own cost "
            "(bf16 heads: not part of this fp32 comparison).")


def report_header(report: dict) -> list[str]:
    """The report's title, command, machine and versions, the figure table and what its columns mean."""
    m, v = report["machine"], report["versions"]
    lines = [
        "# Side by side with TextBrewer and torchdistill",
        "",
        f"Generated by `{report['command']}` on {report['date']}"
        + (" (smoke: narrow models, not figures to quote)." if report["smoke"] else "."),
        "",
        f"Machine (as measured): {m.get('description')}; {report['threads']} torch "
        f"thread{'' if report['threads'] == 1 else 's'} "
        f"({report['threads_choice']}), device `{report['device']}`; load average at start "
        f"{m.get('load_average_at_start')}{load_note(m)}. The two sides of each ratio ran interleaved, round by "
        "round, and a ratio is the median over rounds of the ratio within a round: a load that comes and goes "
        "falls on both sides.",
        "",
        f"Versions: torch {v['torch']} (CUDA build {v['torch_cuda_build'] or 'none: CPU build'}), transformers "
        f"{v['transformers']}, TextBrewer {v['textbrewer']}, torchdistill {v['torchdistill']}, torchvision "
        f"{v['torchvision']}, accelerate {v['accelerate']}. Both sides of each comparison ran in this one process, "
        "on this torch build, in fp32.",
        "",
        "| figure | value | target | process CPU-time ratio |",
        "|---|---|---|---|",
    ]
    for name in FIGURES:
        value = report["figures"].get(name)
        shown = "not run" if value is None else (f"{value:.2e}" if name.startswith("loss_match") else f"{value:.2f}x")
        cpu = ""
        if value is not None and name.startswith("vs_"):
            part = "textbrewer" if "textbrewer" in name else "torchdistill"
            cpu = f"{report[part]['ratio_details'][ratio_key(name)]['cpu_time_ratio_of_medians']:.2f}x"
        target = "(bracket)" if TARGETS[name] is None else f"{TARGETS[name][0]} {TARGETS[name][1]:g}"
        lines.append(f"| `{name}` | {shown} | {target} | {cpu} |")
    lines.append("")
    lines.append("`vs_*` = peer step time / our step time (median over rounds of the within-round ratio of wall "
                 "times; > 1 means we are faster). The CPU-time ratio divides the median process CPU times "
                 "instead: on a machine whose cores other jobs hold, it shows the work each side did, apart "
                 "from the time it waited for a core. `loss_match_*` = largest relative difference of the two "
                 "sides' total loss on one batch, same weights, dropout off. Profiles of one step per side "
                 "(`--profile`) are in the JSON file.")
    lines.append("")
    lines.append("`vs_torchdistill_task` times glue-eval --teacher's default step, which reads the teacher's logits "
                 "from its cache (`glue_eval.teacher_cache`, built once per run); `vs_torchdistill_task_uncached` "
                 "times the same step with `--no_teacher_cache` (the teacher runs every step, as in "
                 "torchdistill); `vs_torchdistill_task_cached_with_build_1_epoch` adds the cache's build time, "
                 "per row times the batch, to every cached step: its cost when the run is a single epoch (over "
                 "E epochs it is 1/E of that).")
    return lines


def full_mode_note(res: dict) -> list[str]:
    """Where the full step's extra time goes, against TextBrewer's, and what the target leaves (part 1 only)."""
    if not {"ours_full", "ours_masked", "textbrewer_full"} <= set(res["steps"]):
        return []
    st = {k: v["median_s"] for k, v in res["steps"].items()}
    target = TARGETS["vs_textbrewer_full"][1]
    extra = st["ours_full"] - st["ours_masked"]
    if extra <= 0:  # the medians of a noisy run can invert: no cost to explain
        return ["", f"Full mode: our full step's median ({st['ours_full']:.2f} s) came out at or below our masked "
                f"one's ({st['ours_masked']:.2f} s) in this run, which the extra head matmuls cannot do: the rounds "
                "were noisier than the difference. " + full_margin(st, target)]
    return ["", f"Full mode, where its cost is: our full step costs {extra:.2f} s "
            f"more than our masked one ({st['ours_full']:.2f} against {st['ours_masked']:.2f} s median): "
            "the teacher's and the student's vocabulary heads and the head's backward at the "
            f"{res['setup']['tokens_per_step'] - res['setup']['masked_positions']} tokens that are not MLM "
            "targets, four [tokens, 768] x [768, 30522] matmuls that TextBrewer runs too (it runs every "
            "head at every token in both modes). " + full_margin(st, target)]


def chunked_head_note(res: dict) -> list[str]:
    if res.get("chunked_head_speedup") is None:
        return []
    whole, chunked = res["steps"]["ours_full_whole_head"], res["steps"]["ours_full"]
    return ["", f"`ours_full_whole_head` is our full step with the whole vocabulary head at once "
            f"(`logit_chunk_rows: -1`, the engine before the chunked head): the chunked head "
            f"(`ours_full`, the default) is {res['chunked_head_speedup']:.2f}x its speed (median of the "
            f"within-round ratios), at a peak of {chunked['peak_memory_mb']} MB against "
            f"{whole['peak_memory_mb']} MB (resident-set peaks of the timed rounds, allocator as it is; "
            "`python -m bench.head_memory` measures each variant alone in a fresh process)."]


def teacher_cache_note(res: dict) -> list[str]:
    cache = res.get("teacher_cache")
    if not cache:
        return []
    return ["", f"Teacher cache: built over the step's {cache['rows']} rows in {cache['build_s']:.3f} s "
            f"(median over the same rounds; {cache['build_s_per_row'] * 1e3:.1f} ms a row, batches of "
            f"{cache['build_batch_size']}); "
            f"projected over an epoch of SST-2's {cache['task_train_rows']} training rows: "
            f"{cache['build_s_per_epoch_of_task']:.0f} s once per run, i.e. "
            f"{cache['build_s_per_step_over_1_epoch']:.3f} s per step of a one-epoch run, "
            f"{cache['build_s_per_step_over_1_epoch'] / 3:.3f} s over three epochs."]


def memory_probe_note(res: dict) -> list[str]:
    probe = res.get("memory_probe")
    if not probe:
        return []
    lines = ["", f"Memory probe: peak MB above the memory held before one step, allocator "
             f"{probe['allocator']} (so a step's rise is its peak of live memory, not the allocator's "
             "history); the Trainer's optimiser is "
             f"{probe['trainer_optimizer']} {probe['trainer_optimizer_flags']}:", "",
             "| step | peak MB |", "|---|---|"]
    lines += [f"| {k[:-3]} | {v} |" for k, v in probe.items() if k.endswith("_mb")]
    return lines + ["", memory_finding(probe, res["steps"])]


def loss_match_and_config(part: str, res: dict) -> list[str]:
    """The loss match per variant, the per-round ratios and the peer's configuration as run."""
    lines = ["", "Loss match (same batch, same weights, dropout off):", ""]
    match = res["loss_match"]
    rows = match.items() if part == "textbrewer" else [("task", match)]
    peer = "textbrewer" if part == "textbrewer" else "torchdistill"
    for variant, mm in rows:
        cached = f", ours cached {mm['ours_cached']:.7f}" if "ours_cached" in mm else ""
        lines.append(f"- {variant}: ours {mm['ours']:.7f}{cached}, {peer} {mm[peer]:.7f}, largest relative "
                     f"difference {mm['relative_difference']:.2e}")
    return lines + ["", "Per-round ratios (peer / ours): " + "; ".join(
        f"{k}: {', '.join(map(str, d['per_round']))}" for k, d in res["ratio_details"].items()), "",
        "Peer configuration as run:", "", "```json", json.dumps(res["peer_config"], indent=1), "```"]


def part_section(part: str, title: str, res: dict | None) -> list[str]:
    """One comparison's section: its setup, step times, notes, loss match and the peer's configuration."""
    lines = ["", f"## {title}", ""]
    if res is None:
        return lines + ["Not run: left out with --only."]
    s = res["setup"]
    lines.append(f"Setup: {s['teacher']}, student from teacher layers {','.join(map(str, s['student_layers']))}, "
                 f"batch {s['batch']} x {s['seq']} ({s['tokens_per_step']} real tokens), {s['objective']}, "
                 f"AdamW {s['optimizer']['AdamW']}, grad-norm clip {s['max_grad_norm']}, {s['precision']}.")
    lines += ["", "| step | median s | min s | max s | peak memory MB |", "|---|---|---|---|---|"]
    for name, st in res["steps"].items():
        lines.append(f"| {name} | {st['median_s']:.3f} | {st['min_s']:.3f} | {st['max_s']:.3f} | "
                     f"{st['peak_memory_mb']} |")
    if part == "textbrewer":
        lines += full_mode_note(res)
    return (lines + chunked_head_note(res) + teacher_cache_note(res) + memory_probe_note(res)
            + loss_match_and_config(part, res))


# How each peer's conventions were converted to ours, and what the peers needed: the same in every report.
CONVENTIONS = ["", "## Conventions converted", "",
              "- TextBrewer has no T^2: its `kd_loss_weight` is our `ce` weight times T^2 (5 x 4 = 20). Its "
              "`kd_loss_type=\"ce\"` is the soft cross-entropy `-sum p_t log p_s` (mean over rows), the same "
              "CE-shaped quantity as our `ce`, so the totals compare like with like (no entropy to add).",
              "- MLM is TextBrewer's hard-label loss: the student's own `loss` from `labels` "
              "(`hard_label_weight` 2). It runs the vocabulary head at every position of both models.",
              "- `cos` is an intermediate match of the last hidden states (`layer_T` 12, `layer_S` 4, the "
              "attention mask as `inputs_mask`).",
              "- torchdistill's `KDLoss` is `alpha * CE + beta * T^2 * KL(batchmean)`; with T=1, alpha=beta=1 it "
              "is our `1*kl + 1*hard_ce` (`kl` = T^2 x mean KL over rows = batchmean). The labels go in as "
              "`targets`: without them (as its GLUE example loop passes `targets=None`) `KDLoss` returns the "
              "soft term alone.",
              "- Optimisers: every side steps with torch's AdamW with `fused=True` (one kernel over all "
              "parameters): glue-eval's step uses the Trainer's own, transformers 5's default `adamw_torch_fused`; "
              "ours in part 1 is `distill.train.precision.Precision.make_optimizer`'s (fused by default, as distill-train "
              "builds it); TextBrewer is handed `torch.optim.AdamW(..., fused=True)` and torchdistill's `AdamW` "
              "key gets `fused: true` in its kwargs. The `*_default_adamw` brackets give the peer torch's default "
              "AdamW instead (a Python loop over the parameters), what its examples and configs build unless told "
              "otherwise: the difference is the optimiser alone.", "",
              "## What the peers needed (torchdistill 1.1.5, TextBrewer 0.2.1.post1)", "",
              "- torchdistill: `optimizer.filters_params: false` with a plain optimizer key (`AdamW`) hands the "
              "module itself to `torch.optim` and fails (`optimizer can only optimize Tensors`); the bench keeps "
              "the default `true`. Its default `func2extract_model_loss` returns every output field (`loss` and "
              "`logits`), so a `model_term` weight cannot carry the hard loss; the labels go to `KDLoss` as "
              "`targets` instead. It imports only beside the CUDA torch build its torchvision wheel was built for.",
              "- TextBrewer: its `TrainingConfig` creates `output_dir` on construction, and `fp16` means apex "
              "(`apex.amp`, removed upstream in 2025): it has no native mixed precision, so on a CPU it runs fp32 "
              "only. Its distillers need an adaptor per model; no patch to either peer was needed.", ""]


def report_markdown(report: dict) -> str:
    lines = report_header(report)
    for part, title in (("textbrewer", "1. Task-agnostic step vs TextBrewer GeneralDistiller"),
                        ("torchdistill", "2. Task step vs torchdistill DistillationBox")):
        lines += part_section(part, title, report.get(part))
    return "\n".join(lines + CONVENTIONS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 4 for part 1 and 5 rounds (< 15 min on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="every code path on narrow models, seconds (no figures)")
    p.add_argument("--only", default="textbrewer,torchdistill", help="comma list of textbrewer, torchdistill")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison")
    p.add_argument("--threads", default="auto", help="torch CPU threads: a number, or auto (default): torch's own "
                   "on an idle machine, 1 when the load average says other processes hold the cores (as bench.speed)")
    p.add_argument("--profile", action="store_true", help="also a torch.profiler table of one step of each side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="writes OUT.json and OUT.md (default docs/peers; --smoke writes nothing unless "
                                 "given one: its figures are not to quote)")
    args = p.parse_args(argv)
    quiet_library_progress()
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    for part in parts:
        if part not in PEERS:
            raise UsageError(f"--only {args.only!r}: {part!r} is not one of {', '.join(PEERS)}")
        import_peer(part)  # refuse before any work, with the install line
    cfg = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)
    shape = SMOKE_SHAPE if args.smoke else {}
    cfg["profile"] = args.profile
    if args.repeats is not None:
        if args.repeats < 1:
            raise UsageError(f"--repeats {args.repeats}: give at least 1 round")
        cfg["repeats"] = args.repeats
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        raise UsageError(f"--threads {args.threads!r}: give a number >= 1 or auto")
    threads_choice = set_threads(args.threads)
    log(f"torch threads: {torch.get_num_threads()} ({threads_choice})")
    device = torch.device(args.device)
    clock = Clock(device)
    report = {"command": command_line("bench.peers", sys.argv[1:] if argv is None else list(argv)),
              "quick": args.quick, "smoke": args.smoke, "shape": shape or "BERT-base width (768)",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "versions": versions(), "device": str(device),
              "threads": torch.get_num_threads(), "threads_choice": threads_choice, "config": cfg}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers-") as work:
        report["textbrewer"] = bench_textbrewer(cfg, device, clock, work, shape) if "textbrewer" in parts else None
        report["torchdistill"] = (bench_torchdistill(cfg, device, clock, work, shape) if "torchdistill" in parts
                                  else None)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["figures"] = {name: (report[part] or {}).get(name) for part in PEERS for name in FIGURES if part in name}
    out = args.out or (None if args.smoke else str(ROOT / "docs" / "peers"))
    if out:
        atomic_write_json(out + ".json", report)
        atomic_write_text(out + ".md", report_markdown(report))
        log(f"wrote {out}.json and {out}.md in {report['wall_s']} s")
    for name in FIGURES:
        value = report["figures"].get(name)
        if value is not None:
            print(f"{name}: {value:.3g}" if name.startswith("loss_match") else f"{name}: {value:.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
