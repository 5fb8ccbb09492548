"""The torch modules that are exported: one per head, inputs by name, outputs named as the clients read them.

transformers 5's models do not trace with positional inputs through the TorchScript exporter, so
each head is a small module whose ``forward(input_ids, attention_mask[, token_type_ids])`` calls
the model by keyword. Output names are the ones ONNX Runtime clients look up:
``last_hidden_state`` (optimum's ``ORTModelForFeatureExtraction``, and so sentence-transformers'
``backend="onnx"``, which pools it itself), ``sentence_embedding`` (the pipeline's own pooling and
normalisation, what ``SentenceTransformer.encode`` returns) and ``logits``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from distill.common.errors import UsageError
from distill.models.families import family_of
from distill.models.sentence import MODULES, pooling_mode

HEADS = ("encoder", "sentence", "classifier")
# pooling modes the exported graph computes (sentence-transformers' names); others are refused at export
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens")


def _kind(module: dict) -> str:
    """``Transformer``, ``Pooling``, ``Normalize``... from a modules.json entry's class path."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def input_names(model: nn.Module) -> list[str]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` where the family embeds more than one segment."""
    names = ["input_ids", "attention_mask"]
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types and family_of(model).tokens.token_types > 1:
        names.append("token_type_ids")
    return names


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor, sqrt_len: bool = False) -> torch.Tensor:
    """Mean of ``hidden [B, T, H]`` over the positions ``mask [B, T]`` keeps -> ``[B, H]``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = weights.sum(1).clamp(min=1e-9)
    return (hidden * weights).sum(1) / (counts.sqrt() if sqrt_len else counts)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' pooling of ``hidden [B, T, H]`` -> ``[B, H * modes]`` (modes joined by ``+``)."""
    parts = []
    for one in mode.split("+"):
        if one == "cls":
            parts.append(hidden[:, 0])
        elif one == "mean":
            parts.append(_masked_mean(hidden, mask))
        elif one == "mean_sqrt_len_tokens":
            parts.append(_masked_mean(hidden, mask, sqrt_len=True))
        elif one == "max":
            filled = hidden.masked_fill(mask.unsqueeze(-1) == 0, -1e9)
            parts.append(filled.max(1).values)
        else:
            raise UsageError(f"pooling mode {one!r} cannot be exported: the exporter computes "
                             f"{', '.join(POOLING_MODES)}; export --head encoder and pool outside the graph")
    return torch.cat(parts, dim=-1)


class _Graph(nn.Module):
    """Calls ``model`` with the inputs by name; subclasses say what comes out."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def run(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.names:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs)


class EncoderGraph(_Graph):
    outputs = ("last_hidden_state",)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.run(input_ids, attention_mask, token_type_ids).last_hidden_state


class SentenceGraph(_Graph):
    """The encoder, then the pipeline's Pooling and (when listed) Normalize: the embedding ``encode`` gives."""

    outputs = ("last_hidden_state", "sentence_embedding")

    def __init__(self, model: nn.Module, names: list[str], mode: str, normalize: bool):
        super().__init__(model, names)
        self.mode = mode
        self.normalize = normalize

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.run(input_ids, attention_mask, token_type_ids).last_hidden_state
        pooled = pool(hidden, attention_mask, self.mode)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=1)
        return hidden, pooled


class ClassifierGraph(_Graph):
    outputs = ("logits",)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.run(input_ids, attention_mask, token_type_ids).logits


def sentence_modules(folder: str | Path) -> tuple[str, bool]:
    """``(pooling mode, normalize)`` of a sentence-transformers folder's ``modules.json``.

    The graph holds Transformer -> Pooling [-> Normalize]; any other module (a Dense projection)
    is refused with the way out, since the embedding would silently differ from ``encode``'s.
    """
    folder = Path(folder)
    modules = json.loads((folder / MODULES).read_text(encoding="utf-8"))
    kinds = [_kind(m) for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UsageError(f"{str(folder)!r} has sentence-transformers modules {kinds}: the exporter builds "
                         "Transformer -> Pooling [-> Normalize]; export --head encoder and run the rest in "
                         "sentence-transformers")
    pooling = next(m for m in modules if _kind(m) == "Pooling")
    config = json.loads((folder / pooling["path"] / "config.json").read_text(encoding="utf-8"))
    mode = pooling_mode(config)
    pool(torch.zeros(1, 1, 1), torch.ones(1, 1), mode)  # an unknown mode fails here, before any export
    return mode, kinds[-1] == "Normalize"


def build_graph(model: nn.Module, head: str, folder: str | Path | None = None) -> _Graph:
    """The module to export for ``head``; ``folder`` holds the sentence pipeline of a ``sentence`` head."""
    names = input_names(model)
    if head == "encoder":
        return EncoderGraph(model, names)
    if head == "classifier":
        return ClassifierGraph(model, names)
    if head == "sentence":
        mode, normalize = sentence_modules(folder)
        return SentenceGraph(model, names, mode, normalize)
    raise UsageError(f"head {head!r} is not one the exporter knows: choose {', '.join(HEADS)}")
