"""Model families: the one place that knows transformers' class and module names.

An adaptor in TextBrewer's sense: :func:`extract` runs a model and returns a plain
:class:`Features` record (hidden states, attentions, value vectors, logits at chosen
positions), so the objective and the training loop never touch model classes.
A new family is one :class:`Family` entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    AutoConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertForMaskedLM,
    DistilBertModel,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    ElectraModel,
)

from .errors import UsageError
from .layers import module_index


# files that mean "a tokenizer is saved here" (WordPiece, sentencepiece, BPE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json")


@dataclass(frozen=True)
class Family:
    """Names that differ between model families. Paths are relative to the base model."""

    name: str
    layers_path: str  # ModuleList of transformer layers
    self_attention_path: str  # inside a layer: the module whose ``dropout.p`` drives attention dropout
    value_path: str  # inside a layer: the value projection (for MiniLM's value relation)
    num_layers_field: str
    hidden_size_field: str
    num_heads_field: str
    # role -> model class; roles: "base", "mlm" (masked-LM head), "rtd" (ELECTRA discriminator head)
    classes: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "bert", "encoder.layer", "attention.self", "attention.self.value",
        "num_hidden_layers", "hidden_size", "num_attention_heads",
        {"base": BertModel, "mlm": BertForMaskedLM},
    ),
    "distilbert": Family(
        "distilbert", "transformer.layer", "attention", "attention.v_lin",
        "n_layers", "dim", "n_heads",
        {"base": DistilBertModel, "mlm": DistilBertForMaskedLM},
    ),
    "electra": Family(
        "electra", "encoder.layer", "attention.self", "attention.self.value",
        "num_hidden_layers", "hidden_size", "num_attention_heads",
        {"base": ElectraModel, "mlm": ElectraForMaskedLM, "rtd": ElectraForPreTraining},
    ),
}


def family_of(config_or_model) -> Family:
    """The :class:`Family` of a config or model; a clear error for unsupported model types."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UsageError(
            f"model type {model_type!r} is not supported: supported families are {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def role_of(model: nn.Module) -> str:
    """"mlm", "rtd" or "base": which head the model carries."""
    for role, cls in family_of(model).classes.items():
        if type(model) is cls:
            return role
    raise UsageError(f"model class {type(model).__name__} is not one the toolkit knows how to distil")


def role_from_architectures(config) -> str:
    """The head a checkpoint was saved with, read from ``config.architectures``."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForMaskedLM") or arch == "BertForPreTraining":
        return "mlm"
    if arch == "ElectraForPreTraining":
        return "rtd"
    return "base"


def check_model_path(name_or_path: str, what: str = "teacher") -> None:
    """A path-like argument that does not exist is a user error, not a hub lookup."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 2)[-1]
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise UsageError(f"{what} folder {name_or_path!r} has no config.json: give a transformers model folder")
        return
    if looks_local or os.path.exists(name_or_path):
        raise UsageError(f"{what} {name_or_path!r} does not exist: give a model folder or a hub id")


def load_config(name_or_path: str, what: str = "teacher"):
    """``AutoConfig.from_pretrained`` with one clear line when a path is missing or a hub id unreachable."""
    check_model_path(name_or_path, what)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot load the {what} {name_or_path!r} ({first[:160]}): check the hub id and the network, "
            "or give a local folder saved with save_pretrained"
        ) from None


def load_model(name_or_path: str, role: str | None = None, eager: bool = False, what: str = "teacher", **kwargs):
    """Load a teacher (or student) with the head its checkpoint has (or ``role``).

    ``eager=True`` selects eager attention, the only implementation that returns
    attention probabilities (with sdpa, ``output_attentions`` yields nothing).
    """
    config = load_config(name_or_path, what)
    family = family_of(config)
    role = role or role_from_architectures(config)
    if role not in family.classes:
        raise UsageError(f"a {family.name} model has no {role!r} head: roles are {', '.join(family.classes)}")
    if eager:
        kwargs["attn_implementation"] = "eager"
    return family.classes[role].from_pretrained(name_or_path, **kwargs)


def get_path(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    return get_path(model.base_model, family_of(model).layers_path)


def num_layers(config_or_model) -> int:
    config = getattr(config_or_model, "config", config_or_model)
    return getattr(config, family_of(config).num_layers_field)


def hidden_size(config_or_model) -> int:
    config = getattr(config_or_model, "config", config_or_model)
    return getattr(config, family_of(config).hidden_size_field)


def num_heads(config_or_model) -> int:
    config = getattr(config_or_model, "config", config_or_model)
    return getattr(config, family_of(config).num_heads_field)


def set_attention_dropout(model: nn.Module, p: float) -> None:
    """Set attention-probability dropout in every layer (0 makes returned attentions pre-dropout)."""
    family = family_of(model)
    for layer in transformer_layers(model):
        get_path(layer, family.self_attention_path).dropout.p = p


def apply_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The model's prediction head on final hidden states ``[..., H]``.

    Returns ``[..., vocab]`` for masked-LM heads, ``[...]`` for ELECTRA's
    discriminator, ``None`` for a base model.
    """
    role = role_of(model)
    if role == "base":
        return None
    if isinstance(model, BertForMaskedLM):
        return model.cls(hidden)
    if isinstance(model, DistilBertForMaskedLM):
        x = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
        return model.vocab_projector(x)
    if isinstance(model, ElectraForMaskedLM):
        return model.generator_lm_head(model.generator_predictions(hidden))
    if isinstance(model, ElectraForPreTraining):
        return model.discriminator_predictions(hidden)
    raise AssertionError(f"no head rule for {type(model).__name__}")


@dataclass
class Features:
    """What one forward pass produced, in the layout the losses take.

    hidden_states: L+1 tensors ``[B, S, H]`` (index 0 = embedding output) or None.
    attentions: L tensors ``[B, heads, S, S]`` of probabilities, or None.
    values: 1-based layer -> value vectors ``[B, heads, S, head_dim]``.
    logits: head output at ``positions`` only: ``[N, vocab]`` (masked LM) or ``[N]``
        (ELECTRA discriminator), rows in ``positions.nonzero()`` order; None if not asked.
    """

    hidden_states: tuple | None = None
    attentions: tuple | None = None
    values: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None


def extract(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    hidden: bool = False,
    attentions: bool = False,
    value_layers: tuple[int, ...] = (),
    positions: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    sequence_logits: bool = False,
) -> Features:
    """Run ``model`` once and return only what was asked for.

    ``positions`` (bool ``[B, S]``) selects where the prediction head runs: the
    vocabulary projection is the costliest matmul of a small student, so it is
    evaluated only at positions a loss term uses. ``value_layers`` are 1-based.
    ``sequence_logits=True`` is for a task model (``*ForSequenceClassification``): the
    whole model runs, and ``logits`` is its own head's ``[B, classes]``.
    ``token_type_ids`` (``[B, S]``) tells sentence pairs apart where the family uses them.
    """
    family = family_of(model)
    layers = transformer_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    heads = num_heads(model)
    for layer in value_layers:
        def hook(_module, _inp, out, layer=layer):
            b, s, _ = out.shape
            captured[layer] = out.view(b, s, heads, -1).transpose(1, 2)

        hooks.append(get_path(layers[module_index(layer)], family.value_path).register_forward_hook(hook))
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    try:
        # A task model's head (pooler, dropout, classifier) differs by family: let the model run it.
        out = (model if sequence_logits else model.base_model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=hidden,
            output_attentions=attentions,
            return_dict=True,
            **extra,
        )
    finally:
        for h in hooks:
            h.remove()
    if attentions and not out.attentions:
        raise UsageError(
            f"{type(model).__name__} returned no attention weights: attention terms need "
            "attn_implementation='eager' (sdpa returns none)"
        )
    logits = out.logits if sequence_logits else None
    if positions is not None:
        logits = apply_head(model, out.last_hidden_state[positions])
    return Features(
        hidden_states=out.hidden_states if hidden else None,
        attentions=out.attentions if attentions else None,
        values=captured,
        logits=logits,
    )
