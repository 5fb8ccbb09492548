"""The frozen teacher does only what the loss reads.

Three levers, each exact or bounded, each applied to a teacher that never trains:

- :func:`cast_linears`: under mixed precision, the teacher's ``nn.Linear`` weights and biases cast once to the
  autocast dtype. Autocast casts exactly those for every linear call (LayerNorm and embeddings stay fp32), so the
  teacher's outputs are the same, bit for bit, as autocast's on fp32 weights; only the per-forward cast of ~85M
  weights (bert-base) is gone. A linear whose weight is tied to a non-linear module (the masked-LM decoder and
  the word embeddings) gets its own cast copy: the embedding keeps its fp32 table.
- :func:`eager_only_on`: eager attention (the only kind that returns attention probabilities) on the layers a
  term reads attention maps from, sdpa on the others. Each other layer's attention module gets its own config
  copy naming :data:`SDPA`; the model's config stays eager, so the mask keeps eager's format. The recorded
  attentions then skip the sdpa layers: :func:`distill.models.loading.extract` puts them back at their layer
  numbers (:func:`attention_layers`). Families whose attention does not go through transformers' attention
  registry (MPNet) stay as they are.
- :func:`truncated`: the forward stops after the deepest layer a term reads (the layer list cut for the call).

``torch.inference_mode`` is not used on the training path: the teacher's outputs are loss targets, and some
losses save their target for backward (``F.mse_loss``: hid_mse, att_mse), which torch refuses for inference
tensors ("Inference tensors cannot be saved for backward"); a copy of every feature would undo what inference
mode saves over ``no_grad``.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections import Counter

import torch
from torch import nn

from distill.models.families import family_of, get_path, transformer_layers
from distill.models.layers import module_index

# A registered attention function: transformers' sdpa, without its warning that sdpa returns no weights (the
# layers that run it are the ones whose weights no term reads).
SDPA = "distill_sdpa"


def _register_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_without_weights(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("output_attentions", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(SDPA, sdpa_without_weights)


_register_sdpa()




def _attention_module(model: nn.Module, layer: nn.Module) -> nn.Module:
    return get_path(layer, family_of(model).self_attention_path)


# --------------------------------------------------------------------------------------- weights


def cast_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every ``nn.Linear``'s weight and bias of a frozen ``model`` to ``dtype``, in place; returns how many.

    A weight shared with a module that is not a linear (a decoder tied to the word embeddings) is replaced in
    the linear by a cast copy, so the other module keeps its own dtype. Call it only on a model that runs under
    ``torch.autocast(dtype=dtype)`` from then on: outside autocast an fp32 input meets a ``dtype`` weight.
    """
    owners = Counter(id(p) for m in model.modules() if not isinstance(m, nn.Linear)
                     for p in m.parameters(recurse=False))
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name)
            if param is None or param.dtype == dtype or not param.is_floating_point():
                continue
            if owners[id(param)]:  # tied to an embedding (or another non-linear): untie, the teacher never trains
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
            else:
                param.data = param.data.to(dtype)
        count += 1
    return count


# --------------------------------------------------------------------------------------- attention per layer


def supports_mixed_attention(model: nn.Module) -> bool:
    """Whether ``model``'s family picks its attention function per call from transformers' registry (BERT,
    DistilBERT, RoBERTa, XLM-R, ELECTRA; not MPNet), so each layer may run its own."""
    if not getattr(type(model), "_supports_sdpa", False):
        return False
    first = _attention_module(model, transformer_layers(model)[0])
    return hasattr(first, "config")


def eager_only_on(model: nn.Module, layers) -> tuple[int, ...] | None:
    """Eager attention on the 1-based ``layers`` only, the registry's sdpa (:data:`SDPA`) on the others.

    The model's own config is left as it is (eager: the mask keeps eager's format); each other layer's
    attention module gets a config copy of its own. Returns the layers that run eager, or None where the family
    cannot mix (nothing changed). A model loaded with sdpa is left alone when ``layers`` is empty.
    """
    if not supports_mixed_attention(model):
        return None
    wanted = {module_index(layer) for layer in layers}
    if model.config._attn_implementation != "eager":
        if wanted:
            raise ValueError("eager_only_on: the model was not loaded with eager attention, which the attention "
                             "maps need (load_model(..., eager=True))")
        return ()
    for i, layer in enumerate(transformer_layers(model)):
        module = _attention_module(model, layer)
        if i in wanted:
            module.config = model.config  # eager, shared again
        elif module.config is model.config or module.config._attn_implementation != SDPA:
            own = copy.copy(model.config)
            own._attn_implementation = SDPA
            module.config = own
    return tuple(sorted(i + 1 for i in wanted))


def attention_layers(model: nn.Module) -> tuple[int, ...] | None:
    """The 1-based layers whose attention probabilities a forward records, in order; None: every layer (the
    model runs one implementation throughout)."""
    if not supports_mixed_attention(model):
        return None
    eager = tuple(i + 1 for i, layer in enumerate(transformer_layers(model))
                  if _attention_module(model, layer).config._attn_implementation == "eager")
    return None if len(eager) == len(transformer_layers(model)) else eager


# --------------------------------------------------------------------------------------- depth


_CUTS: "weakref.WeakKeyDictionary[nn.ModuleList, dict[int, nn.ModuleList]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def truncated(model: nn.Module, depth: int | None):
    """Within the block, ``model`` runs its first ``depth`` transformer layers only (None or >= its depth: all).

    The family's layer list is replaced by its first ``depth`` layers for the call and put back after, even on
    an error. Hidden states then have ``depth + 1`` entries; anything after the last layer (pooler, heads)
    sees layer ``depth``'s output, so callers ask only for what lies at or below it.
    """
    layers = transformer_layers(model)
    if depth is None or depth >= len(layers):
        yield
        return
    parent_path, _, name = family_of(model).layers_path.rpartition(".")
    parent = get_path(model.base_model, parent_path) if parent_path else model.base_model
    cut = _CUTS.setdefault(layers, {})
    if depth not in cut:  # one list per depth, kept: a compiled forward sees the same module each step
        cut[depth] = nn.ModuleList(list(layers)[:max(depth, 0)])
    setattr(parent, name, cut[depth])
    try:
        yield
    finally:
        setattr(parent, name, layers)


# --------------------------------------------------------------------------------------- all at once


def prepare_teacher(model: nn.Module, attention: tuple[int, ...] = (), compute_dtype: torch.dtype | None = None
                    ) -> dict:
    """Set a frozen teacher up to do only what the loss reads: eager attention on the ``attention`` layers alone
    (1-based), and with ``compute_dtype`` (the autocast dtype of the run; None in fp32) its linear weights cast
    once. Returns a record of what was done, for logs and benches."""
    record = {"eager_layers": eager_only_on(model, attention)}
    if compute_dtype is not None and compute_dtype != torch.float32:
        record["linears_cast"] = cast_linears(model, compute_dtype)
        record["compute_dtype"] = str(compute_dtype).removeprefix("torch.")
    return record
