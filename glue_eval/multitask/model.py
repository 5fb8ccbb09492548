"""The multi-task model: one shared encoder, one head per task, saved as one folder.

The folder is an ordinary transformers folder for the encoder (``AutoModel.from_pretrained(folder)`` loads
it, with the tokenizer beside it), plus ``multitask.json`` (the tasks, their labels, metrics and head specs)
and ``heads/<n>.safetensors`` (each head's weights). :func:`load_multitask` gives back a model answering
``model(task=..., **inputs)``.

A head is built by ``HEAD_BUILDERS[spec.kind](spec, encoder_config, num_labels)`` and called as
``head(hidden [B, S, H], attention_mask [B, S]) -> logits [B, num_labels]`` (a span head, for extractive QA:
``[B, S, 2]``, the start and end logits of every token): a new kind of head is one builder here and one form of
config entry.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os

import torch
from torch import nn

from distill.common.errors import UsageError

from ..qa_tasks import EXTRACTIVE_QA
from .config import HeadSpec, parse_head

FORMAT = 1
MANIFEST = "multitask.json"
HEADS_DIR = "heads"


class StackHead(nn.Module):
    """Pool the encoder output (``cls``: first token; ``mean``: mean over real tokens), then linear layers of
    ``spec.layers`` widths, each followed by the activation and dropout, then the output layer."""

    def __init__(self, spec: HeadSpec, hidden_size: int, num_labels: int):
        super().__init__()
        from transformers.activations import ACT2FN

        self.pooling = spec.pooling
        layers: list[nn.Module] = [nn.Dropout(spec.dropout)]
        width = hidden_size
        for out in spec.layers:
            layers += [nn.Linear(width, out), ACT2FN[spec.activation], nn.Dropout(spec.dropout)]
            width = out
        layers.append(nn.Linear(width, num_labels))
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        return self.layers(pooled)


class TransformersHead(nn.Module):
    """A transformers head class (``RobertaClassificationHead`` ...) called on the last hidden states."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


class SpanHead(nn.Module):
    """Extractive QA's head: on every token, the optional stack (linear layers of ``spec.layers`` widths, each
    followed by the activation and dropout), then ``qa_outputs``, a linear layer of 2 outputs (start, end) as in
    transformers' ``...ForQuestionAnswering``, so a span head without a stack carries over to one weight for
    weight."""

    def __init__(self, spec: HeadSpec, hidden_size: int):
        super().__init__()
        from transformers.activations import ACT2FN

        layers: list[nn.Module] = [nn.Dropout(spec.dropout)] if spec.dropout else []
        width = hidden_size
        for out in spec.layers:
            layers += [nn.Linear(width, out), ACT2FN[spec.activation], nn.Dropout(spec.dropout)]
            width = out
        self.layers = nn.Sequential(*layers)
        self.qa_outputs = nn.Linear(width, 2)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.qa_outputs(self.layers(hidden))


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """transformers' QA loss: the mean of the start and end cross-entropies over each window's whole row (a
    position past the row, after clamping, is ignored), in float32."""
    ignored = start_logits.size(1)
    loss = nn.CrossEntropyLoss(ignore_index=ignored)
    starts, ends = start_positions.view(-1).clamp(0, ignored), end_positions.view(-1).clamp(0, ignored)
    return (loss(start_logits.float(), starts) + loss(end_logits.float(), ends)) / 2


def find_head_class(name: str) -> type:
    """A transformers class by name: exported at the top level, or in the ``modeling_*`` module of the model
    whose package name starts the class name (``XLMRobertaClassificationHead`` -> ``xlm_roberta``)."""
    import pkgutil

    import transformers
    import transformers.models as models

    found = getattr(transformers, name, None)
    if found is None:
        key = name.lower()
        packages = [p.name for p in pkgutil.iter_modules(models.__path__) if key.startswith(p.name.replace("_", ""))]
        for package in sorted(packages, key=len, reverse=True):
            try:
                module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
            except ImportError:
                continue
            found = getattr(module, name, None)
            if found is not None:
                break
    if not (inspect.isclass(found) and issubclass(found, nn.Module)):
        raise UsageError(f"head {name!r} is not a transformers module class: name a head class such as "
                         "RobertaClassificationHead or ElectraClassificationHead, or give a layer stack "
                         '{"layers": [...], "activation": "gelu"}')
    return found


def build_transformers_head(spec: HeadSpec, encoder_config, num_labels: int) -> nn.Module:
    config = copy.deepcopy(encoder_config)
    for key, value in spec.config.items():
        setattr(config, key, value)
    config.num_labels = num_labels
    cls = find_head_class(spec.class_name)
    try:
        return TransformersHead(cls(config))
    except Exception as err:  # noqa: BLE001 - whatever the class wants from the config: the user's choice
        raise UsageError(f"head {spec.class_name} could not be built on the encoder's config: "
                         f"{type(err).__name__}: {err}".splitlines()[0]) from None


def build_stack_head(spec: HeadSpec, encoder_config, num_labels: int) -> nn.Module:
    return StackHead(spec, encoder_config.hidden_size, num_labels)


def build_span_head(spec: HeadSpec, encoder_config, num_labels: int) -> nn.Module:
    return SpanHead(spec, encoder_config.hidden_size)


HEAD_BUILDERS = {"stack": build_stack_head, "transformers": build_transformers_head, "span": build_span_head}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Cross-entropy for classes, mean squared error for a one-output regression (as transformers' heads)."""
    if num_labels == 1:
        return nn.functional.mse_loss(logits.float().view(-1), labels.float().view(-1))
    return nn.functional.cross_entropy(logits.float(), labels.long().view(-1))


class MultitaskModel(nn.Module):
    """A shared encoder and a head per task. ``tasks``: name -> info dict (``kind``, ``num_labels``, ``labels``,
    ``metrics``, ``head``: the head's spec as JSON), in the run's task order.

    ``model(task=NAME, input_ids=..., attention_mask=..., [token_type_ids=...], [labels=...])`` returns a
    ``SequenceClassifierOutput``: ``logits`` ``[B, num_labels]`` and, given labels, the task's ``loss``. For an
    extractive-QA task, ``[start_positions=..., end_positions=...]`` instead of labels, and a
    ``QuestionAnsweringModelOutput``: ``start_logits`` and ``end_logits`` ``[B, S]`` and, given the positions,
    transformers' QA ``loss`` (:func:`span_loss`).
    """

    def __init__(self, encoder: nn.Module, heads: dict, tasks: dict):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.tasks = dict(tasks)
        self._token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None and self._token_types else {}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                            **extra).last_hidden_state

    def forward(self, task: str, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                start_positions=None, end_positions=None, **_):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

        if task not in self.heads:
            raise UsageError(f"task {task!r} has no head here: this model's tasks are {', '.join(self.tasks)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.heads[task](self.encode(input_ids, attention_mask, token_type_ids), attention_mask)
        if self.tasks[task].get("kind") == EXTRACTIVE_QA:
            start, end = (z.squeeze(-1).contiguous() for z in logits.split(1, dim=-1))
            loss = None if start_positions is None else span_loss(start, end, start_positions, end_positions)
            return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)
        loss = None if labels is None else task_loss(logits, labels, self.tasks[task]["num_labels"])
        return SequenceClassifierOutput(loss=loss, logits=logits)


def task_info(task, head: HeadSpec) -> dict:
    """What a saved model keeps of a task (:class:`glue_eval.tasks.Task`) and its head (an extractive-QA task: 2
    outputs per token, and whether questions may have no answer)."""
    info = {"kind": task.kind, "num_labels": 2 if task.is_qa else task.num_labels,
            "labels": list(task.labels) if task.labels else None, "metrics": list(task.metrics), "head": head.to_json()}
    return {**info, "version_2": task.version_2} if task.is_qa else info


def build_multitask(encoder_path: str, entries, eager: bool = False) -> MultitaskModel:
    """The encoder of ``encoder_path`` (any registered family, a distilled student included; its own head, if
    any, dropped) with a fresh head per :class:`glue_eval.multitask.config.TaskEntry` (drawn from the current
    torch seed)."""
    from distill.models.loading import load_model

    encoder = load_model(encoder_path, role="base", eager=eager, what="--model")
    heads, tasks = {}, {}
    for entry in entries:
        heads[entry.task.name] = HEAD_BUILDERS[entry.head.kind](entry.head, encoder.config, entry.task.num_labels)
        tasks[entry.task.name] = task_info(entry.task, entry.head)
    return MultitaskModel(encoder, heads, tasks)


def save_multitask(model: MultitaskModel, folder: str, tokenizer=None, card: str | None = None,
                   extra: dict | None = None, overwrite: bool = True) -> None:
    """Write ``folder`` whole or not at all (a temp folder, then one rename): the encoder as a transformers
    folder, the tokenizer, ``heads/``, ``multitask.json`` (tasks in order, plus ``extra``) and the card."""
    from safetensors.torch import save_file

    from distill.common.io import atomic_dir

    with atomic_dir(folder, overwrite=overwrite) as tmp:
        model.encoder.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        os.makedirs(os.path.join(tmp, HEADS_DIR))
        tasks = []
        for n, (name, info) in enumerate(model.tasks.items()):
            weights = f"{HEADS_DIR}/{n}.safetensors"
            state = {k: v.detach().contiguous().cpu() for k, v in model.heads[name].state_dict().items()}
            save_file(state, os.path.join(tmp, weights))
            tasks.append({"name": name, **info, "weights": weights})
        manifest = {"format": FORMAT, "tasks": tasks, **(extra or {})}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)


def load_multitask(folder: str, device=None) -> MultitaskModel:
    """A saved multi-task model (:func:`save_multitask`), in eval mode: ``model(task=..., **inputs)``."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UsageError(f"{folder!r} holds no {MANIFEST}: give a folder written by glue-eval --multitask")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{path} has format {manifest.get('format')!r}; this version reads format {FORMAT}")
    encoder = AutoModel.from_pretrained(folder)
    heads, tasks = {}, {}
    for item in manifest["tasks"]:
        qa = item.get("kind") == EXTRACTIVE_QA  # absent in folders written before QA tasks: classification
        spec = parse_head(f"task {item['name']!r}", item["head"], qa=qa)
        head = HEAD_BUILDERS[spec.kind](spec, encoder.config, item["num_labels"])
        head.load_state_dict(load_file(os.path.join(folder, item["weights"])), strict=True)
        heads[item["name"]] = head
        tasks[item["name"]] = {k: item[k] for k in ("kind", "num_labels", "labels", "metrics", "head", "version_2")
                               if k in item}
    model = MultitaskModel(encoder, heads, tasks).eval()
    return model.to(device) if device is not None else model
