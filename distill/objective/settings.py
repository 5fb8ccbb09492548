"""The objective's settings, declared once: distill-train's recipe and glue-eval's task stage both take
them from here (``DistillConfig`` inherits them; glue-eval's arguments derive the ``task`` ones), and
:meth:`distill.objective.plan.Objective.from_config` builds from an instance."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from distill.common.declare import AT_LEAST_1, Range, check_ranges, setting, task_fields
from distill.objective import losses
from distill.objective.terms import (
    DISTILBERT_WEIGHTS,
    RELATION_HEADS,
    REPRESENTATION_WEIGHTS,
    SOFT,
    TERMS,
    format_weights,
    select,
    term_list,
)


@dataclass
class ObjectiveSettings:
    # --- objective ---
    weights: dict[str, float] = setting(REPRESENTATION_WEIGHTS, f"loss term -> weight, e.g. {format_weights(DISTILBERT_WEIGHTS)}; terms: {term_list(select(token_level=True))}")
    temperature: float = setting(2.0, f"softmax temperature of the soft-target terms ({term_list(select(temperature=True))}); they are multiplied by T^2",
                            range=losses.TEMPERATURE, task=True, task_default=1.0,
                            task_help=f"temperature of the {'/'.join(select(temperature=True, sequence_level=True))} terms (multiplied by T^2)")
    layer_map: list[list[int]] | None = setting(None, "explicit [[student_layer, teacher_layer], ...] for intermediate terms (0 = embeddings)", task=True)
    relation_heads: int = setting(RELATION_HEADS, f"relation heads of the MiniLMv2 terms ({term_list(select(feature='qkv'))}): split both models' query/key/value vectors into this many heads of their own size; must divide both widths (MiniLMv2: 48 for base-size teachers, 64 for large)", range=AT_LEAST_1)
    relation_teacher_layer: int | None = setting(None, "the 1-based teacher layer the relation terms compare with the student's last layer (default: the last; MiniLMv2 takes an upper-middle one for large teachers, e.g. 21 of 24)", range=AT_LEAST_1)
    restrict_ce_to_mask: bool = setting(False, f"compute {'/'.join(select(logits_at=SOFT))} on masked positions only (default: every real token)")
    projection: bool = setting(True, "learn a linear map student->teacher width where hidden sizes differ (dropped from the saved student)")
    logit_chunk_rows: int = setting(0, f"run the vocabulary head over this many logit rows at a time, each chunk's gradient taken at once, so no [tokens, vocab] logits are held (the values are the whole head's); 0: auto (about 2^22 logits a chunk, at least a quarter of the head width in rows), -1: never chunk; applies when every logit term is a mean over rows ({term_list(k for k, spec in TERMS.items() if spec.row_mean)})", range=Range(-1))

    def check(self) -> "ObjectiveSettings":
        """Every field against its declared range (one UsageError line); ``self``."""
        check_ranges(self)
        return self


def task_settings_class(settings=ObjectiveSettings) -> type:
    """The settings of dataclass ``settings`` that glue-eval's task stage shares (``task=True``), as a dataclass
    its arguments inherit: same names, types and ranges, each with its task default and help. glue-eval
    derives it from the whole recipe (``DistillConfig``), so a shared field declared anywhere reaches it."""
    hints = typing.get_type_hints(settings)
    return dataclasses.make_dataclass("TaskObjectiveSettings", [
        (f.name, hints[f.name], dataclasses.field(default=f.metadata["task_default"],
                                                  metadata={**f.metadata, "help": f.metadata["task_help"]}))
        for f in task_fields(settings)])


def task_values(args) -> dict:
    """The shared objective settings' values on ``args`` (glue-eval's arguments), to build a task-stage
    objective."""
    return {f.name: getattr(args, f.name) for f in task_fields(ObjectiveSettings)}
