"""Task distillation for extractive QA: a fine-tuned QA teacher's start and end distributions.

A window's span head gives two distributions over its tokens, the answer's start and its end. The logit terms
of the registry read them as two rows per window (``span_rows``: ``[2B, S]``, start rows then end rows, padding
excluded from every softmax), so ``kl`` (or ``ce``) at ``--temperature`` is the mean of the start and end
divergences (times T^2) and ``hard_ce`` against the gold start and end tokens is transformers' own QA loss
(the mean of the start and end cross-entropies), over real tokens. Representation terms (``hid_mse``,
``att_mse`` ...) compare the windows' layers as in a sentence task. The teacher's span logits are computed once
per training window (:class:`SpanLogitCache`, as :mod:`glue_eval.teacher_cache` does for class logits); its
representations, when a term reads them, are recomputed per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from distill.common.errors import UsageError
from distill.models.loading import Features, extract
from distill.objective import terms

from .distillation import _attention_dropout, needs_attention, run_stages
from .tasks import Task
from .trainer import ROW, DistillationTrainer, TrainOutput, teacher_autocast

PAD_LOGIT = -1e9  # a padded position's logit in the span rows: softmax gives it exactly 0, and it stays finite


def span_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 2, S]`` start/end logits -> ``[2B, S]`` float32 rows (starts, then ends), padding at
    :data:`PAD_LOGIT` so no softmax and no loss reads it."""
    z = logits.float().masked_fill(~mask.bool()[:, None, :], PAD_LOGIT)
    return torch.cat((z[:, 0], z[:, 1]))


@contextlib.contextmanager
def span_logits_as_logits(model):
    """While open, ``model``'s output also holds ``logits``: its start and end logits as ``[B, 2, S]``, which is
    what :func:`distill.models.loading.extract` reads of a task head (``sequence_logits=True``)."""

    def hook(_module, _inputs, out):
        out["logits"] = torch.stack((out.start_logits, out.end_logits), dim=1)
        return out

    handle = model.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def load_qa_teacher(path: str, student, eager: bool):
    """The fine-tuned QA teacher; its span head must be trained and its vocabulary the student's."""
    from transformers import AutoModelForQuestionAnswering

    kwargs = {"attn_implementation": "eager"} if eager else {}
    try:
        teacher, info = AutoModelForQuestionAnswering.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"--teacher {path!r} could not be loaded for question answering: "
                         f"{str(err).splitlines()[0]}") from None
    if info.get("missing_keys"):
        raise UsageError(f"--teacher {path!r} has no trained span head (missing {sorted(info['missing_keys'])[0]}): "
                         "give a teacher fine-tuned on QA (glue-eval --task squad --save_model)")
    rows, own = teacher.get_input_embeddings().num_embeddings, student.get_input_embeddings().num_embeddings
    if rows != own:
        raise UsageError(f"--teacher {path!r} and the student have different vocabularies ({rows} vs {own} tokens): "
                         "both read the same token ids, so they need the same tokenizer")
    return teacher.eval()


@dataclasses.dataclass
class SpanLogitCache:
    """The teacher's start/end logits of every training window: row -> ``[2, S_i]`` float32 over its real
    tokens; put back into a batch's padded layout by :meth:`features`."""

    rows: list

    @classmethod
    def build(cls, teacher, dataset, collate, *, batch_size: int = 64, device=None,
              autocast=contextlib.nullcontext) -> "SpanLogitCache":
        device = device or next(teacher.parameters()).device
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
        windows = dataset.select_columns(columns)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]["input_ids"]))  # little padding
        kept = [None] * len(windows)
        teacher.eval()
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([windows[i] for i in chunk]).items()}
            with torch.no_grad(), autocast(), span_logits_as_logits(teacher):
                z = extract(teacher, batch["input_ids"], batch["attention_mask"],
                            token_type_ids=batch.get("token_type_ids"), sequence_logits=True).logits
            real = batch["attention_mask"].bool().cpu()
            for b, row in enumerate(chunk):
                kept[row] = z[b].float().cpu()[:, real[b]].clone()
        return cls(kept)

    def features(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> Features:
        real = attention_mask.bool()
        z = torch.zeros(real.shape[0], 2, real.shape[1], device=attention_mask.device)
        for i, r in enumerate(rows.tolist()):
            z[i][:, real[i]] = self.rows[r].to(attention_mask.device)
        return Features(logits=z)


class QADistillationTrainer(DistillationTrainer):
    """:class:`glue_eval.trainer.DistillationTrainer` for span heads. ``soft``: the representation terms (on
    the windows as they are); ``span``: the teacher's logit terms and ``hard``: ``hard_ce``, both on
    :func:`span_rows`; ``teacher_cache``: a :class:`SpanLogitCache`."""

    def __init__(self, *args, span=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.span = span.to(self.args.device) if span is not None else None

    def distillation_loss(self, model, inputs):
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids")
        request = self.soft.requests()["student"] if self.soft is not None else None
        teacher = self.teacher_features(inputs) if (self.soft is not None or self.span is not None) else None
        with span_logits_as_logits(model):
            student = extract(model, ids, mask, token_type_ids=types, sequence_logits=True,
                              hidden=bool(request and request.hidden),
                              attentions=bool(request and request.attentions),
                              value_layers=request.value_layers if request else ())
        total, found = None, {}
        if self.soft is not None:
            total, found = self.soft(student, teacher, {"input_ids": ids, "attention_mask": mask})
        rows = {"input_ids": torch.cat((ids, ids)), "attention_mask": torch.cat((mask, mask)),
                "labels": torch.cat((inputs["start_positions"], inputs["end_positions"]))}
        zs = Features(logits=span_rows(student.logits, mask))
        for objective, other in ((self.span, teacher), (self.hard, None)):
            if objective is None:
                continue
            zt = Features(logits=span_rows(other.logits, mask)) if other is not None else Features()
            value, parts = objective(zs, zt, rows)
            total = value if total is None else total + value
            found = {**found, **parts}
        return total, found, student

    def teacher_features(self, inputs) -> Features:
        """Span logits from the cache; representations (if a term reads them) from one teacher forward."""
        mask = inputs["attention_mask"]
        request = self.soft.requests()["teacher"] if self.soft is not None else None
        cached = self.teacher_cache.features(inputs[ROW], mask) if self.teacher_cache is not None else None
        if cached is not None and request is None:
            return cached
        self.teacher_forwards += 1
        with torch.no_grad(), self._teacher_autocast(), span_logits_as_logits(self.teacher):
            out = extract(self.teacher, inputs["input_ids"], mask, token_type_ids=inputs.get("token_type_ids"),
                          hidden=bool(request and request.hidden), attentions=bool(request and request.attentions),
                          value_layers=request.value_layers if request else (), sequence_logits=True)
        if cached is not None:
            out.logits = cached.logits
        return out


def qa_stage_objectives(weights: dict, glue, student, teacher):
    """(representation terms, span logit terms, hard_ce) objectives of one stage; each None when empty."""
    from distill.objective.plan import Objective
    from distill.objective.settings import task_values

    def build(part):
        if not part:
            return None
        return Objective.from_config(part, **task_values(glue), student_config=student, teacher_config=teacher,
                                     student_layers=glue.student_layers, projection=True, sequence_level=True)

    specs = {k: terms.TERMS[k] for k, v in weights.items() if v}
    inner = {k: weights[k] for k, s in specs.items() if s.feature != "logits"}
    span = {k: weights[k] for k, s in specs.items() if s.feature == "logits" and s.teacher}
    hard = {k: weights[k] for k, s in specs.items() if not s.teacher}
    return build(inner), build(span), build(hard)


def train_qa_with_teacher(model, train, shared: dict, args, glue, task: Task):
    """Every --teacher stage on ``model`` over the training windows: (the last trainer, a TrainOutput)."""
    from distill.models.loading import set_attention_dropout

    stages = run_stages(glue, task)
    eager = any(needs_attention(s["weights"]) for s in stages)
    from .teachers import load_mixture, teacher_paths

    if len(teacher_paths(glue)) > 1:  # several teachers: the mixture of their span distributions
        teacher = load_mixture(glue, lambda path: load_qa_teacher(path, model, eager), model)
    else:
        teacher = load_qa_teacher(glue.teacher, model, eager)
    train = train.add_column(ROW, list(range(len(train))))
    from .gate import gated_teacher

    teacher, gate = gated_teacher(teacher, train, shared["data_collator"], args, glue, span_targets)  # (teacher, None)
    cache, cache_record = None, {"enabled": bool(glue.teacher_cache)}
    if glue.teacher_cache:
        teacher.to(args.device)
        cache = SpanLogitCache.build(teacher, train, shared["data_collator"], batch_size=args.per_device_eval_batch_size,
                                     device=args.device, autocast=lambda: teacher_autocast(args))
        cache_record.update(rows=len(cache.rows), representations=False)
    dropout = _attention_dropout(model)
    trainer, record = None, []
    for stage in stages:
        inner, span, hard = qa_stage_objectives(stage["weights"], glue, model, teacher)
        set_attention_dropout(model, 0.0 if needs_attention(stage["weights"]) else dropout)
        trainer = QADistillationTrainer(model=model, args=_stage_args(args, stage), train_dataset=train,
                                        teacher=teacher, soft=inner, span=span, hard=hard, teacher_cache=cache,
                                        **shared)
        out = trainer.train()
        logs = [{k: v for k, v in entry.items() if k.startswith("distill/") or k in ("loss", "step")}
                for entry in trainer.state.log_history if "loss" in entry]
        record.append({"weights": stage["weights"], "epochs": trainer.args.num_train_epochs,
                       "max_steps": trainer.args.max_steps, "learning_rate": trainer.args.learning_rate,
                       "steps": out.global_step, "loss": out.training_loss, "logs": logs,
                       "teacher_forwards": trainer.teacher_forwards,
                       "runtime_s": round(out.metrics.get("train_runtime", 0.0), 2)})
    set_attention_dropout(model, dropout)
    return trainer, TrainOutput(sum(s["steps"] for s in record), record[-1]["loss"],
                                sum(s["runtime_s"] for s in record), len(train),
                                {"stages": record, "teacher_cache": cache_record, **({"gate": gate} if gate else {})})


def span_targets(mixture, train, collate, args):
    """The gate's targets on the training windows (:class:`glue_eval.gate.SpanTargets`): every teacher's start/end
    logits, computed once (a :class:`SpanLogitCache` each, real tokens only), and each window's gold start and end."""
    from .gate import SpanTargets

    caches = [SpanLogitCache.build(t, train, collate, batch_size=args.per_device_eval_batch_size, device=args.device,
                                   autocast=lambda: teacher_autocast(args)) for t in mixture.teachers]
    return SpanTargets(caches, torch.tensor([train["start_positions"], train["end_positions"]]).t())


def _stage_args(args, stage: dict):
    changes = {k: stage[k] for k in ("learning_rate",) if stage[k] is not None}
    if stage["epochs"] is not None:
        changes.update(num_train_epochs=float(stage["epochs"]), max_steps=-1)
    if stage["max_steps"] is not None:
        changes["max_steps"] = int(stage["max_steps"])
    return dataclasses.replace(args, **changes) if changes else args
