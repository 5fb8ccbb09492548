"""Layer-index conventions, in one place.

Users write layers 1-based ("BERT layers 1,5,8,12"). transformers returns
``hidden_states`` with L+1 entries (index 0 is the embedding output, index i the
output of layer i) and ``attentions`` with L entries (index i-1 is layer i).
Everything else in the toolkit calls these helpers instead of doing the arithmetic.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from distill.common.errors import UsageError


def parse_layers(spec: str | Iterable[int], num_layers: int | None = None, what: str = "teacher") -> list[int]:
    """Parse ``"1,5,8,12"`` (or a list) into validated 1-based layer numbers.

    The list must be non-empty and strictly increasing; with ``num_layers`` every
    entry must lie in ``1..num_layers``.
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            layers = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"layers {spec!r} are not a comma-separated list of integers, e.g. 1,5,8,12") from None
    else:
        layers = [int(x) for x in spec]
    if not layers:
        raise UsageError("the layer list is empty: give the teacher layers to copy, e.g. --layers 1,5,8,12")
    for a, b in zip(layers, layers[1:]):
        if b <= a:
            raise UsageError(
                f"layers {','.join(map(str, layers))} are not strictly increasing ({a} then {b}): "
                "list each teacher layer once, in order"
            )
    for layer in layers:
        if layer < 1:
            raise UsageError(f"layer {layer} is out of range: layers are 1-based (the first layer is 1)")
        if num_layers is not None and layer > num_layers:
            raise UsageError(
                f"layer {layer} is out of range: the {what} has {num_layers} layers; layers are 1-based"
            )
    return layers


def hidden_index(layer: int) -> int:
    """Index into ``hidden_states`` for 1-based ``layer`` (0 means the embedding output)."""
    return layer


def attention_index(layer: int) -> int:
    """Index into ``attentions`` for 1-based ``layer`` (must be >= 1)."""
    if layer < 1:
        raise ValueError(f"attention of layer {layer}: attentions exist for layers 1..L only")
    return layer - 1


def module_index(layer: int) -> int:
    """Index into the model's layer ``ModuleList`` for 1-based ``layer``."""
    return layer - 1


def check_layer_map(pairs: Sequence[tuple[int, int]], student_layers: int, teacher_layers: int, allow_zero: bool = True):
    """Validate (student_layer, teacher_layer) pairs; layer 0 (embeddings) allowed where ``allow_zero``."""
    low = 0 if allow_zero else 1
    for s, t in pairs:
        if not low <= s <= student_layers:
            raise UsageError(
                f"layer map entry {s}->{t}: student layer {s} does not exist "
                f"(the student has {student_layers} layers; layers are 1-based, 0 is the embeddings)"
            )
        if not low <= t <= teacher_layers:
            raise UsageError(
                f"layer map entry {s}->{t}: teacher layer {t} does not exist "
                f"(the teacher has {teacher_layers} layers; layers are 1-based, 0 is the embeddings)"
            )


def parse_layer_map(entries, student_layers: int | None = None, teacher_layers: int | None = None
                    ) -> tuple[tuple[int, int], ...]:
    """Validate an explicit ``[[student_layer, teacher_layer], ...]`` loss map: the one check, for the recipe
    and the objective alike. Entries are 1-based pairs of integers (0 = the embedding output); with the two
    layer counts every index must also exist. Returns the pairs as tuples."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise UsageError(
            f"the layer map {entries!r} is empty or not a list: give [student_layer, teacher_layer] pairs, "
            "e.g. [[1, 3], [2, 6]]"
        )
    pairs = []
    for entry in entries:
        if (
            not isinstance(entry, (list, tuple)) or len(entry) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in entry)
        ):
            raise UsageError(
                f"layer map entry {entry!r} is not a [student_layer, teacher_layer] pair of integers, e.g. [4, 12]"
            )
        pairs.append((entry[0], entry[1]))
    if student_layers is not None and teacher_layers is not None:
        check_layer_map(pairs, student_layers, teacher_layers)
    return tuple(pairs)
