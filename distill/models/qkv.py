"""Capture a layer's query, key and value projections during the forward pass the loss already runs.

MiniLMv2's relation terms compare ``softmax(x x^T / sqrt(d))`` of one layer's Q, K or V
vectors (:func:`distill.objective.losses.relation_kl`). Those vectors are the outputs of the layer's
query/key/value ``nn.Linear`` modules: forward hooks on them collect the outputs of the
forward the step runs anyway, so relations cost no extra forward. The Linear outputs come
before any dropout (dropout in BERT-style attention acts on the probabilities, after the
projections), so what is captured is the same in train and eval mode.

This module takes module objects, not family names: which modules of a layer are its
query/key/value projections is a fact of the family registry. Usage::

    layer = model.bert.encoder.layer[-1]
    modules = {"query": layer.attention.self.query, "key": layer.attention.self.key,
               "value": layer.attention.self.value}
    with capture_qkv(modules) as qkv:
        model(input_ids, attention_mask=mask)
    loss = relation_kl(qkv["query"], teacher_qkv["query"], mask, relation_heads=12)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

from torch import Tensor, nn

__all__ = ["capture_qkv"]


@contextlib.contextmanager
def capture_qkv(layer_modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Collect each module's output ``[B, S, width]`` while the context is open.

    Args:
        layer_modules: name (e.g. ``"query"``, ``"key"``, ``"value"``) -> the projection module
            whose output to keep; typically a layer's query/key/value ``nn.Linear``.

    Yields:
        a dict that each forward fills: name -> that module's output of the latest call,
        still attached to the autograd graph (and in the autocast dtype, e.g. bf16; the
        relation loss widens it). The hooks are removed on exit, even on an error, so a
        model is never left carrying them.

    Raises:
        ValueError: when a module's output is not a ``[B, S, width]`` tensor (a wrong module
            was named, e.g. the attention block instead of its projection).
    """
    captured: dict[str, Tensor] = {}
    handles = []

    def keep(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, Tensor) or output.dim() != 3:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"capture_qkv: {name!r} produced {shape}, not [batch, seq, width]: "
                                 "name the layer's query/key/value projection modules")
            captured[name] = output

        return hook

    try:
        for name, module in layer_modules.items():
            if not isinstance(module, nn.Module):
                raise ValueError(f"capture_qkv: {name!r} is a {type(module).__name__}, not a torch module")
            handles.append(module.register_forward_hook(keep(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
