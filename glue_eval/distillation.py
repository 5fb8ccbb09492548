"""Task-specific distillation while fine-tuning (TinyBERT's second stage): a Trainer whose loss adds teacher terms.

The terms and their weights are :class:`distill.objective.Objective`'s, at sequence
level: every term of the registry (:mod:`distill.terms`) that exists there, e.g. soft
targets at ``--temperature`` (times T^2), raw-logit MSE (the soft term that fits STS-B's
regression), the task labels, and intermediate terms over the layer map given by
``--student_layers``. ``python -m distill.terms --markdown`` lists them.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict

import torch
from transformers import AutoModelForSequenceClassification

from distill import terms
from distill.errors import UsageError

from .finetune import glue_trainer_class
from .tasks import Task


def task_terms() -> tuple[str, ...]:
    """The terms of task distillation: the registry's sequence-level ones (read when asked, so a term
    registered later counts)."""
    return terms.level_terms(sequence_level=True)


def soft_terms() -> tuple[str, ...]:
    """Sequence-level terms that compare distributions over classes: meaningless for a one-output regression."""
    return tuple(k for k in task_terms() if terms.TERMS[k].softmax_outputs)


def regression_terms() -> tuple[str, ...]:
    """Sequence-level terms that compare the teacher's logits and fit a one-output regression head."""
    specs = {k: terms.TERMS[k] for k in task_terms()}
    return tuple(k for k, s in specs.items() if s.feature == "logits" and s.teacher and not s.softmax_outputs)


def __getattr__(name):
    # The old constant names, derived from the registry when read.
    derived = {"TASK_TERMS": task_terms, "SOFT_TERMS": soft_terms,
               "ATTENTION_TERMS": lambda: terms.select(feature="attentions", sequence_level=True)}
    if name in derived:
        return derived[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_weights(text: str, task: Task | None = None) -> dict[str, float]:
    """``'{"kl": 1.0, "hard_ce": 1.0}'`` (a JSON object of term -> weight) -> dict; one clear error for anything
    else (the weights are checked by :func:`distill.terms.check_weights`, as the objective checks them)."""
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--distill_weights {text!r} is not JSON ({err}): e.g. '{json.dumps(terms.TASK_WEIGHTS)}'"
        ) from None
    if not isinstance(weights, dict) or not weights:
        raise UsageError(f"--distill_weights {text!r} must be a JSON object of term -> weight, "
                         f"e.g. {json.dumps(terms.TASK_WEIGHTS)}")
    terms.check_weights(weights, sequence_level=True, what="--distill_weights")
    if task is not None and task.is_regression:
        soft = [n for n in soft_terms() if weights.get(n)]
        if soft:
            raise UsageError(
                f"--distill_weights: {soft[0]!r} compares class distributions, but {task.display} is regression "
                f"(one output): use {' or '.join(regression_terms())} for the teacher term"
            )
    return weights


def needs_attention(weights: dict[str, float]) -> bool:
    return any(w and terms.TERMS[n].feature == "attentions" for n, w in weights.items())


def load_teacher(path: str, task: Task, eager: bool):
    """The fine-tuned teacher as saved; its head must be this task's (same labels, same order)."""
    kwargs = {"attn_implementation": "eager"} if eager else {}
    try:
        teacher = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"--teacher {path!r} could not be loaded as a classifier: {err}".splitlines()[0]) from None
    config = teacher.config
    if config.num_labels != task.num_labels:
        raise UsageError(
            f"--teacher {path!r} has {config.num_labels} outputs but {task.display} needs {task.num_labels}: "
            f"give a teacher fine-tuned on {task.display} (glue-eval --save_model on the teacher)"
        )
    names = tuple(config.id2label[i] for i in range(config.num_labels))
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if task.labels and not generic and names != task.labels:
        raise UsageError(
            f"--teacher {path!r} was fine-tuned with labels {list(names)}, {task.display}'s are {list(task.labels)}: "
            "its classes would be compared with the wrong ones"
        )
    return teacher.eval()


def distillation_kwargs(glue, task: Task, student) -> dict:
    """``teacher`` and ``objective`` for :class:`DistillationTrainer` (student already loaded)."""
    from distill.models import set_attention_dropout
    from distill.objective import Objective

    weights = parse_weights(glue.distill_weights, task)
    teacher = load_teacher(glue.teacher, task, needs_attention(weights))
    if teacher.get_input_embeddings().num_embeddings != student.get_input_embeddings().num_embeddings:
        raise UsageError(
            f"--teacher {glue.teacher!r} and the student have different vocabularies "
            f"({teacher.get_input_embeddings().num_embeddings} vs {student.get_input_embeddings().num_embeddings} "
            "tokens): both read the same token ids, so they need the same tokenizer"
        )
    objective = Objective.from_config(
        weights, glue.temperature, student_config=student, teacher_config=teacher,
        student_layers=glue.student_layers, projection=True, sequence_level=True,
    )
    if objective.needs_attention:
        # Attention terms compare pre-dropout probabilities: the student's must be returned without dropout.
        set_attention_dropout(student, 0.0)
    return {"teacher": teacher, "objective": objective}


@contextlib.contextmanager
def captured_values(model, layers):
    """``{layer: value vectors [B, heads, S, d]}`` of the 1-based ``layers`` during one forward of ``model``
    (what :func:`distill.models.extract` captures for ``val_kl``), filled when the forward runs."""
    from distill.layers import module_index
    from distill.models import family_of, get_path, num_heads, transformer_layers

    captured, hooks = {}, []
    model = getattr(model, "module", model)  # a DDP / DataParallel wrapper holds the model
    if layers:
        family, heads, blocks = family_of(model), num_heads(model), transformer_layers(model)
        for layer in layers:
            def hook(_module, _inp, out, layer=layer):
                b, s, _ = out.shape
                captured[layer] = out.view(b, s, heads, -1).transpose(1, 2)

            hooks.append(get_path(blocks[module_index(layer)], family.value_path).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


class DistillationTrainer(glue_trainer_class()):
    """``Trainer`` whose training loss is ``objective(student, teacher)``; evaluation stays the task loss.

    The objective's learned width projections (if any) train with the student in an
    extra optimiser group and are never saved with it. The mean of each term over a
    logging window is logged as ``distill/<term>`` (unweighted).
    """

    def __init__(self, *args, teacher, objective, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.objective = objective.to(self.args.device)
        self._terms = defaultdict(float)
        self._term_batches = 0

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        extra = [p for p in self.objective.parameters() if p.requires_grad]
        if extra and not any(p is extra[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from distill.models import Features

        requests = self.objective.requests()
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        with captured_values(model, requests["student"].value_layers) as s_values:
            out = model(**features, output_hidden_states=requests["student"].hidden,
                        output_attentions=requests["student"].attentions)
        with torch.no_grad(), self._teacher_autocast(), \
                captured_values(self.teacher, requests["teacher"].value_layers) as t_values:
            t_out = self.teacher(**features, output_hidden_states=requests["teacher"].hidden,
                                 output_attentions=requests["teacher"].attentions)
        student = Features(hidden_states=out.hidden_states, attentions=out.attentions, values=s_values,
                           logits=out.logits)
        teacher = Features(hidden_states=t_out.hidden_states, attentions=t_out.attentions, values=t_values,
                           logits=t_out.logits)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
        loss, terms = self.objective(student, teacher, batch)
        for name, value in terms.items():
            self._terms[name] += float(value)
        self._term_batches += 1
        return (loss, out) if return_outputs else loss

    def _teacher_autocast(self):
        # The teacher is not wrapped by accelerate, so it would run in fp32 under --bf16/--fp16.
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        return torch.autocast(self.args.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def log(self, logs, start_time=None):
        if self._term_batches and "loss" in logs:
            logs.update({f"distill/{k}": round(v / self._term_batches, 5) for k, v in self._terms.items()})
            self._terms.clear()
            self._term_batches = 0
        super().log(logs, start_time)
