"""Several teachers in distill-train: which ones teach, with which weights, through which layer maps.

``--teacher A --teacher B --teacher_weights 0.7,0.3`` (or a recipe's ``"teacher": [A, B]``). The student is
built from the first teacher (its ``student_layers``) exactly as with one; every teacher then teaches through
its own :class:`distill.objective.plan.Objective`, and :class:`distill.objective.mixture.TeacherMix` mixes
them: ``ce`` / ``kl`` on the mixture of their soft targets, every other term the weighted sum of each
teacher's own value. A teacher of the first one's depth reads the first one's layer map; one of another depth
reads that map with its teacher layers scaled to its own depth (:func:`distill.objective.mixture.scaled_layer_map`).

Fixed weights are simplified first: a teacher listed twice counts once with the sum of its weights, and a
teacher of weight 0 is left out (not even run), so one teacher left is the one-teacher run, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.common.errors import UsageError
from distill.models.layers import parse_layer_map
from distill.models.loading import load_config, num_layers
from distill.objective.mixture import CONFIDENCE, TeacherMix, parse_teacher_weights, scaled_layer_map, vocabulary_mismatch
from distill.objective.terms import CORRUPTED_INPUT, TERMS
from distill.settings.config import DistillConfig, teacher_list


@dataclass
class Teachers:
    """The teachers that teach: their resolved paths, configs and weights (a list summing to 1, or
    :data:`CONFIDENCE`); ``first`` is the first teacher's (the one the student is built from) path and config."""

    paths: list[str]
    configs: list
    weights: list[float] | str
    first: tuple[str, object]

    @property
    def several(self) -> bool:
        return len(self.paths) > 1 or self.paths[0] != self.first[0]


def read_teachers(cfg: DistillConfig, resolve) -> Teachers:
    """Every teacher's config (no weights loaded yet), the teachers that teach and their weights."""
    paths = [resolve(name) for name in teacher_list(cfg)]
    weights = parse_teacher_weights(cfg.teacher_weights, len(paths), allow_zero=True)
    if weights != CONFIDENCE:  # the same teacher twice: once, with both weights; weight 0: not at all
        merged: dict[str, float] = {}
        for path, weight in zip(paths, weights):
            merged[path] = merged.get(path, 0.0) + weight
        merged = {path: weight for path, weight in merged.items() if weight > 0}
        paths, weights = list(merged), list(merged.values())
    configs = {path: load_config(path, "teacher") for path in dict.fromkeys([*paths, resolve(cfg.teacher)])}
    return Teachers(paths, [configs[p] for p in paths], weights, (resolve(cfg.teacher), configs[resolve(cfg.teacher)]))


def check_several(cfg: DistillConfig, teachers: Teachers, student_config) -> None:
    """What several teachers need: no ELECTRA corruption, soft-target logit terms only, one vocabulary, and for
    ``entropy`` a soft-target term whose distributions it reads. One UsageError line each."""
    active = [name for name, weight in cfg.weights.items() if weight]
    if cfg.generator or any(TERMS[name].input == CORRUPTED_INPUT for name in active if name in TERMS):
        raise UsageError("several teachers distil masked-LM and representation recipes; an ELECTRA recipe "
                         "(generator, rtd terms) takes one teacher")
    raw = [name for name in active if name in TERMS and TERMS[name].feature == "logits" and TERMS[name].teacher
           and not TERMS[name].temperature]
    if raw:
        raise UsageError(f"term {raw[0]!r} compares one teacher's raw logits: with several teachers use ce or kl, "
                         "which read the mixture of their soft targets")
    if teachers.weights == CONFIDENCE and not any(name in TERMS and TERMS[name].temperature for name in active):
        raise UsageError("--teacher_weights entropy weighs the teachers by their masked-LM distributions, which no "
                         "active term reads: add ce or kl, or give fixed weights such as 0.5,0.5")
    own = getattr(student_config, "vocab_size", None)
    for path, config in zip(teachers.paths, teachers.configs):
        if own is not None and getattr(config, "vocab_size", own) != own:
            raise vocabulary_mismatch(path, config.vocab_size, own)


def build_objective(cfg: DistillConfig, teachers: Teachers, student_config, layers):
    """The objective: one teacher's :class:`Objective` as ever, or a :class:`TeacherMix` of one per teacher."""
    from distill.objective.plan import Objective

    first_path, first_config = teachers.first
    if not teachers.several:
        return Objective.from_config(settings=cfg, student_config=student_config, teacher_config=first_config,
                                     student_layers=layers)
    check_several(cfg, teachers, student_config)
    first_map = (parse_layer_map(cfg.layer_map) if cfg.layer_map is not None else
                 [(i, t) for i, t in enumerate(layers, start=1)] if layers is not None else None)
    n_first = num_layers(first_config)
    objectives = []
    for k, (path, config) in enumerate(zip(teachers.paths, teachers.configs), start=1):
        if path == first_path:
            fields = {"student_layers": layers}
        else:
            n = num_layers(config)
            fields = {"layer_map": scaled_layer_map(first_map, n_first, n) if first_map else None,
                      "relation_teacher_layer": None if cfg.relation_teacher_layer is None else
                      max(1, min(n, round(cfg.relation_teacher_layer * n / n_first)))}
        try:
            objectives.append(Objective.from_config(settings=cfg, student_config=student_config,
                                                    teacher_config=config, **fields))
        except UsageError as err:
            raise UsageError(f"teacher {k} ({path}): {err}") from None
    return TeacherMix(objectives, teachers.weights, teachers.paths)


def load_teachers(teachers: Teachers, first, student, tokenizer, objective, device, block_size: int,
                  compute_dtype) -> list:
    """The frozen teachers the step runs, one per objective (the first teacher's model reused where it
    teaches), each checked against the student's vocabulary and tokenizer and set up to compute only what its
    terms read (:func:`distill.models.frozen.prepare_teacher`)."""
    from distill.data.corpus import check_block_size
    from distill.models.families import max_positions
    from distill.models.frozen import prepare_teacher
    from distill.models.loading import load_model
    from distill.objective.mixture import check_same_vocabulary

    loaded = {teachers.first[0]: first}
    out = []
    for k, path in enumerate(teachers.paths):
        if path not in loaded:
            model = load_model(path, eager=objective.needs_attention, what="teacher").to(device).eval()
            model.requires_grad_(False)
            check_same_vocabulary(model, path, student, tokenizer)
            check_block_size(block_size, max_positions(model))
            loaded[path] = model
        request = (objective.objectives[k] if teachers.several else objective).requests()["teacher"]
        prepare_teacher(loaded[path], request.attention_layers, compute_dtype)
        out.append(loaded[path])
    return out
