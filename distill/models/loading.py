"""Models through the family registry: load, inspect and run any registered family.

An adaptor in TextBrewer's sense: :func:`extract` runs a model and returns a plain
:class:`Features` record (hidden states, attentions, value vectors, logits at chosen
positions), so the objective and the training loop never touch model classes.
Every family-specific fact (classes, module paths, heads) comes from
:mod:`distill.models.families`; a new family is one entry there.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig

from distill.common.errors import UsageError
from distill.models.families import (  # noqa: F401
    FAMILIES,
    Family,
    VocabHead,
    family_of,
    get_path,
    max_positions,
    role_from_architecture,
    transformer_layers,
)
from distill.models.frozen import attention_layers, truncated
from distill.models.layers import module_index
from distill.models.qkv import capture_qkv
from distill.models.vocab_head import DeferredLogits, capture_autocast

# files that mean "a tokenizer is saved here" (WordPiece, sentencepiece, BPE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json")


def role_of(model: nn.Module) -> str:
    """"mlm", "rtd" or "base": which head the model carries."""
    family = family_of(model)
    for role in family.classes:
        if type(model) is family.cls(role):
            return role
    raise UsageError(f"model class {type(model).__name__} is not one the toolkit knows how to distil")


def role_from_architectures(config) -> str:
    """The head a checkpoint was saved with, read from ``config.architectures``."""
    return role_from_architecture((getattr(config, "architectures", None) or [""])[0])


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
    """``AutoConfig.from_pretrained`` with one clear line when a path is missing or a hub id unreachable.

    A config that names a head its weights do not hold (all-mpnet-base-v2 says ``MPNetForMaskedLM``
    but saved the encoder alone) is read as the family's base model, so no head starts at random
    and terms that need the head are refused by name.
    """
    check_model_path(name_or_path, what)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot load the {what} {name_or_path!r} ({first[:160]}): check the hub id and the network, "
            "or give a local folder saved with save_pretrained"
        ) from None
    _drop_missing_head(name_or_path, config)
    return config


def _drop_missing_head(name_or_path: str, config) -> None:
    """Point ``config.architectures`` at the base model when the checkpoint holds none of its head's tensors."""
    model_type = getattr(config, "model_type", None)
    role = role_from_architectures(config)
    if model_type not in FAMILIES or role == "base" or role not in FAMILIES[model_type].classes:
        return
    family = FAMILIES[model_type]
    keys = checkpoint_keys(name_or_path)
    if not keys:
        return  # weights not found here: loading reports that, not this check
    with torch.device("meta"):  # the head's parameter names, without allocating a model
        model = family.cls(role)(config)
    prefix = model.base_model_prefix + "."
    head = [k for k in model.state_dict() if not k.startswith(prefix)]
    if head and not any(k in keys for k in head):
        if name_or_path not in _NOTED:  # said once per process, however often the config is read
            _NOTED.add(name_or_path)
            print(f"note: {name_or_path} names {config.architectures[0]} but its weights hold no "
                  f"{head[0].split('.')[0]}.* tensors (no {_HEADS.get(role, role)} head): read as "
                  f"{family.classes['base']}", file=sys.stderr)
        config.architectures = [family.classes["base"]]


_NOTED: set[str] = set()
_HEADS = {"mlm": "masked-LM", "rtd": "discriminator"}


def checkpoint_keys(name_or_path: str) -> set[str]:
    """The tensor names a checkpoint's weight files hold (read from headers; ``set()`` when none are found)."""
    keys: set[str] = set()
    for path in _checkpoint_files(name_or_path):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys.update(f.keys())
        else:
            keys.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return keys


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
    model = family.cls(role).from_pretrained(name_or_path, **kwargs)
    if pooler_module(model) is None:  # a masked-LM class dropped the checkpoint's pooler: keep it
        attach_pooler(model, checkpoint_pooler(name_or_path, config))
    return model


def _checkpoint_files(name_or_path: str) -> list[str]:
    """The weight files of a local folder or a (cached) hub checkpoint: safetensors first, sharded or not."""
    import json

    from transformers.utils import cached_file

    def find(name):
        if os.path.isdir(name_or_path):
            path = os.path.join(name_or_path, name)
            return path if os.path.isfile(path) else None
        try:
            return cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if path := find(single):
            return [path]
        if path := find(index):
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [p for p in map(find, shards) if p]
    return []


def checkpoint_pooler(name_or_path: str, config) -> dict[str, torch.Tensor]:
    """The pooler tensors a checkpoint file holds, keyed relative to the pooler (``dense.weight``).

    Read from the file, not from a loaded model: a masked-LM class drops the pooler on load,
    but a checkpoint such as bert-base-uncased's still holds ``bert.pooler.*``. ``{}`` when the
    family has no pooler or the checkpoint none.
    """
    family = family_of(config)
    if family.pooler_path is None:
        return {}
    prefixes = (f"{family.cls('base').base_model_prefix}.{family.pooler_path}.", f"{family.pooler_path}.")
    found: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(name_or_path):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefixes):
                        found[key.split(f"{family.pooler_path}.", 1)[1]] = f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.update({k.split(f"{family.pooler_path}.", 1)[1]: v for k, v in state.items() if k.startswith(prefixes)})
    return found


def pooler_module(model: nn.Module) -> nn.Module | None:
    """The base model's pooler, or None (a family without one, or a class that drops it)."""
    path = family_of(model).pooler_path
    if path is None:
        return None
    parent_path, _, name = path.rpartition(".")
    parent = get_path(model.base_model, parent_path) if parent_path else model.base_model
    return getattr(parent, name, None)


def attach_pooler(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Give a model whose class drops the pooler (a masked-LM head) the pooler ``tensors``.

    The pooler becomes a submodule of the base model, so ``save_pretrained`` writes it under
    the names the family's other classes load (``bert.pooler.*``): a sequence classifier
    built from the folder then starts from it, and the masked-LM class reports it as unused,
    as it does for bert-base-uncased itself. Returns True when a pooler was attached.
    """
    family = family_of(model)
    if not tensors or family.pooler_path is None:
        return False
    if pooler_module(model) is not None:
        return False  # the class has a pooler of its own, which from_pretrained filled
    parent_path, _, name = family.pooler_path.rpartition(".")
    parent = get_path(model.base_model, parent_path) if parent_path else model.base_model
    pooler = family.build_pooler(model.config)
    pooler.load_state_dict(tensors)  # strict: a checkpoint with another pooler layout is an error
    ref = next(model.parameters())
    setattr(parent, name, pooler.to(device=ref.device, dtype=ref.dtype))
    return True


def check_tokenizer(config, tokenizer, name: str = "teacher") -> None:
    """The tokenizer's quirks must match what the family's embeddings assume.

    Where position ids are counted from ``input_ids`` past ``padding_idx`` (RoBERTa, XLM-R),
    padding with any other id than the model's ``pad_token_id`` shifts real tokens' positions.
    """
    family = family_of(config)
    for what in ("cls", "sep"):
        if getattr(tokenizer, f"{what}_token_id", None) is None:
            raise UsageError(f"the {name} tokenizer has no {what} token ({getattr(family.tokens, what)} for "
                             f"{family.name}): save the tokenizer the model was trained with in the folder")
    types = tokenizer("a", "b").get("token_type_ids") or [0]
    if max(types) >= family.tokens.token_types:
        raise UsageError(
            f"the {name} tokenizer gives a sentence pair token type {max(types)}, but {family.name} models embed "
            f"{family.tokens.token_types} type(s): use the tokenizer the model was trained with")
    if family.tokens.positions_from_padding and tokenizer.pad_token_id != config.pad_token_id:
        raise UsageError(
            f"the {name} tokenizer pads with id {tokenizer.pad_token_id} but the {family.name} model's "
            f"pad_token_id is {config.pad_token_id}, from which its position ids are counted: use the tokenizer "
            "the model was trained with")



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
    return None if role == "base" else family_of(model).heads[role](model, hidden)


def vocab_head(model: nn.Module):
    """The model's :class:`distill.models.families.VocabHead` (a head onto the vocabulary), or None."""
    role = role_of(model)
    head = None if role == "base" else family_of(model).heads[role]
    return head if isinstance(head, VocabHead) else None


@dataclass
class Features:
    """What one forward pass produced, in the layout the losses take.

    hidden_states: L+1 tensors ``[B, S, H]`` (index 0 = embedding output) or None.
    attentions: L tensors ``[B, heads, S, S]`` of probabilities, or None.
    values: 1-based layer -> value vectors ``[B, heads, S, head_dim]``.
    qkv: ``(1-based layer, "query" | "key" | "value")`` -> that projection's output
        ``[B, S, width]`` (all heads concatenated, before dropout), for relation terms.
    logits: head output at ``positions`` only: ``[N, vocab]`` (masked LM) or ``[N]``
        (ELECTRA discriminator), rows in ``positions.nonzero()`` order; None if not asked.
        With ``extract(defer_head=True)`` a vocabulary head's output is a
        :class:`distill.models.vocab_head.DeferredLogits` instead (the decoder not yet run).
    """

    hidden_states: tuple | None = None
    attentions: tuple | None = None
    values: dict = field(default_factory=dict)
    qkv: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None


def extract(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    hidden: bool = False,
    attentions: bool = False,
    value_layers: tuple[int, ...] = (),
    qkv: tuple[tuple[int, str], ...] = (),
    positions: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    sequence_logits: bool = False,
    defer_head: bool = False,
    depth: int | None = None,
) -> Features:
    """Run ``model`` once and return only what was asked for.

    ``positions`` (bool ``[B, S]``) selects where the prediction head runs: the
    vocabulary projection is the costliest matmul of a small student, so it is
    evaluated only at positions a loss term uses. ``value_layers`` are 1-based.
    ``qkv``: ``(layer, "query" | "key" | "value")`` pairs whose projection outputs to keep
    (hooks on the family's query/key/value modules during this same forward).
    ``sequence_logits=True`` is for a task model (``*ForSequenceClassification``): the
    whole model runs, and ``logits`` is its own head's ``[B, classes]``.
    ``token_type_ids`` (``[B, S]``) tells sentence pairs apart where the family uses them.
    ``defer_head=True``: where the head ends in a linear layer onto the vocabulary, ``logits`` is
    a :class:`distill.models.vocab_head.DeferredLogits` (the transform run, the decoder not), for terms
    that take the logits chunk by chunk.
    ``depth``: run the first ``depth`` layers only (None: all), for a teacher whose terms read nothing deeper;
    hidden states and attentions past it come back as None, and no head may be asked for.
    Attentions are indexed by layer whatever ran: a layer that ran sdpa
    (:func:`distill.models.frozen.eager_only_on`) has None in its place.
    """
    family = family_of(model)
    if depth is not None and depth < num_layers(model) and (positions is not None or sequence_logits):
        raise ValueError(f"extract(depth={depth}) stops before the last layer, so no head can run on it: "
                         "ask for the whole model (depth=None) where logits are wanted")
    layers = transformer_layers(model)
    # modules looked up before any hook goes on, so a bad layer leaves the model as it was
    paths = {"query": family.query_path, "key": family.key_path, "value": family.value_path}
    projections = {(layer, name): get_path(layers[module_index(layer)], paths[name]) for layer, name in qkv}
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
        with truncated(model, depth), capture_qkv(projections) as captured_qkv:
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
    logits = out.logits if sequence_logits else _head_at(model, out.last_hidden_state, positions, defer_head)
    return Features(
        hidden_states=_full_length(out.hidden_states, num_layers(model) + 1) if hidden else None,
        attentions=_by_layer(model, out.attentions, depth) if attentions else None,
        values=captured,
        qkv=dict(captured_qkv),
        logits=logits,
    )


def _head_at(model: nn.Module, last: torch.Tensor, positions: torch.Tensor | None, defer_head: bool):
    """The prediction head on the last hidden states at ``positions`` (None: not asked): ``[N, ...]`` rows, or a
    :class:`DeferredLogits` where ``defer_head`` and the head ends in a vocabulary decoder."""
    if positions is None:
        return None
    head = vocab_head(model) if defer_head else None
    rows = last[positions]
    if head is None:
        return apply_head(model, rows)
    decoder = head.decoder_of(model)
    return DeferredLogits(head.transform(model, rows), decoder.weight, decoder.bias, capture_autocast(rows.device.type))


def _full_length(states: tuple, length: int) -> tuple:
    """``states`` padded with None to ``length`` entries (a truncated forward's hidden states stay indexed by layer)."""
    return tuple(states) + (None,) * (length - len(states))


def _by_layer(model: nn.Module, recorded: tuple, depth: int | None) -> tuple:
    """The recorded attention maps at their layer numbers: entry ``i`` is layer ``i + 1``'s, None for a layer that
    ran sdpa or lies past ``depth``."""
    total = num_layers(model)
    ran = attention_layers(model) or tuple(range(1, total + 1))
    ran = [layer for layer in ran if depth is None or layer <= depth]
    if len(ran) != len(recorded):
        raise RuntimeError(f"{type(model).__name__} recorded {len(recorded)} attention maps where layers {ran} run "
                           "eager attention: the per-layer attention set-up no longer matches the model")
    if len(ran) == total:
        return tuple(recorded)
    out = [None] * total
    for layer, att in zip(ran, recorded):
        out[layer - 1] = att
    return tuple(out)
