"""Task-specific distillation while fine-tuning (TinyBERT's second stage): the teacher terms, stages and their runs.

The terms and their weights are :class:`distill.objective.plan.Objective`'s, at sequence
level: every term of the registry (:mod:`distill.objective.terms`) that exists there, e.g. soft
targets at ``--temperature`` (times T^2), raw-logit MSE (the soft term that fits STS-B's
regression), the task labels, and intermediate terms over the layer map given by
``--student_layers``. ``python -m distill.objective.terms --markdown`` lists them.

TinyBERT runs the task stage in two steps (``--stages``): the intermediate terms
first, then the prediction-layer terms; each stage is one ``Trainer.train()`` with
its own optimiser and schedule, on the same student. The training set may hold
augmented and unlabelled rows (``labelled`` = 0): the teacher labels them, and
``hard_ce`` never sees them. The trainer itself is :mod:`glue_eval.trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from transformers import AutoModelForSequenceClassification

from distill.common.errors import UsageError
from distill.objective import terms

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
    return tuple(k for k in task_terms()
                 if terms.TERMS[k].feature == "logits" and terms.TERMS[k].teacher and not terms.TERMS[k].softmax_outputs)


def parse_weights(text: str, task: Task | None = None) -> dict[str, float]:
    """``'{"kl": 1.0, "hard_ce": 1.0}'`` (a JSON object of term -> weight) -> dict; one clear error for anything
    else (the weights are checked by :func:`distill.objective.terms.check_weights`, as the objective checks them)."""
    if isinstance(text, dict):  # an arguments .json file holds the object itself
        text = json.dumps(text)
    try:
        weights = json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise UsageError(
            f"--distill_weights {text!r} is not JSON ({err}): e.g. '{{\"kl\": 1.0, \"hard_ce\": 1.0}}'"
        ) from None
    if not isinstance(weights, dict) or not weights:
        raise UsageError(f"--distill_weights {text!r} must be a JSON object of term -> weight, e.g. {{\"kl\": 1.0}}")
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



STAGE_KEYS = ("weights", "epochs", "max_steps", "learning_rate")


def parse_stages(text: str, task: Task | None = None) -> list[dict]:
    """``--stages``: a JSON list (or a ``.json`` file holding one) of stages run in order.

    Each stage is ``{"weights": {term: weight}, "epochs": E}``; ``"max_steps"`` instead of
    (or over) ``"epochs"``, and ``"learning_rate"``, are optional; what a stage leaves out
    comes from the run's own TrainingArguments. Returns the stages with weights checked.
    """
    where = "--stages"
    if isinstance(text, list):  # an arguments .json file holds the list itself
        text = json.dumps(text)
    if not isinstance(text, str):
        raise UsageError(f"--stages {text!r} must be a JSON list of stages (or a .json file holding one)")
    if text.endswith(".json") and not os.path.isfile(text):
        raise UsageError(f"--stages file {text!r} does not exist: give a JSON list of stages, or that list itself")
    if text.endswith(".json"):
        where = f"--stages file {text!r}"
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        stages = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{where} is not JSON ({err}): e.g. '[{{\"weights\": {{\"hid_mse\": 1, \"att_mse\": 1}}, \"epochs\": 10}}, "
            f"{{\"weights\": {{\"kl\": 1}}, \"epochs\": 3}}]'"
        ) from None
    if not isinstance(stages, list) or not stages:
        raise UsageError(f"{where} must be a non-empty JSON list of stages, e.g. "
                         '[{"weights": {"kl": 1}, "epochs": 3}]')
    out = []
    for i, stage in enumerate(stages, start=1):
        name = f"{where}: stage {i}"
        if not isinstance(stage, dict) or "weights" not in stage:
            raise UsageError(f'{name} must be an object with "weights", e.g. {{"weights": {{"kl": 1}}, "epochs": 3}}')
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise UsageError(f"{name} has unknown keys {unknown}: a stage takes {', '.join(STAGE_KEYS)}")
        try:
            weights = parse_weights(json.dumps(stage["weights"]), task)
        except UsageError as err:
            raise UsageError(str(err).replace("--distill_weights", f"{name} weights", 1)) from None
        for key, kind in (("epochs", (int, float)), ("max_steps", int), ("learning_rate", (int, float))):
            value = stage.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not value > 0
                                      or not math.isfinite(value)):
                raise UsageError(f"{name}: {key} is {value!r}: give a number > 0")
        out.append({"weights": weights, "epochs": stage.get("epochs"), "max_steps": stage.get("max_steps"),
                    "learning_rate": stage.get("learning_rate")})
    return out


def run_stages(glue, task: Task) -> list[dict]:
    """The stages of a run: ``--stages``, else one stage of ``--distill_weights`` with the run's own schedule."""
    if glue.stages:
        return parse_stages(glue.stages, task)
    return [{"weights": parse_weights(glue.distill_weights, task), "epochs": None, "max_steps": None,
             "learning_rate": None}]


def check_task_stage(glue, tasks) -> None:
    """Every --teacher setting, checked before anything loads (one clear line each)."""
    given = [f for f in ("augment", "augment_model", "unlabelled_file", "stages", "layer_map") if getattr(glue, f)]
    if not glue.teacher:
        if given:
            raise UsageError(f"--{given[0]} needs --teacher: augmented and unlabelled rows are labelled by the "
                             "teacher, and stages and layer maps weight or pair teacher terms")
        return
    if glue.layer_map is not None:  # its shape now; the layer counts once the models' configs are read
        from distill.models.layers import parse_layer_map

        try:
            parse_layer_map(glue.layer_map)
        except UsageError as err:
            raise UsageError(f"--layer_map: {err}") from None
    if not os.path.isfile(os.path.join(glue.teacher, "config.json")):
        raise UsageError(f"--teacher {glue.teacher!r} is not a model folder (no config.json): give a fine-tuned "
                         "teacher, e.g. OUT/<task>/<cell>/model from glue-eval --save_model")
    from distill.common.declare import check_ranges

    try:
        check_ranges(glue)  # the shared objective settings, against their one declared range
    except UsageError as err:
        raise UsageError(f"--{err}") from None
    for task in tasks:
        run_stages(glue, task)
    if glue.augment < 0:
        raise UsageError(f"--augment {glue.augment}: give the number of variants per training example (0 = none)")
    if not 0 < glue.augment_probability <= 1:
        raise UsageError(f"--augment_probability {glue.augment_probability}: give a probability in (0, 1] "
                         "(TinyBERT: 0.4)")
    if glue.augment_candidates < 1:
        raise UsageError(f"--augment_candidates {glue.augment_candidates}: give a count >= 1 (TinyBERT: 15)")
    if glue.augment_model and not glue.augment:
        raise UsageError("--augment_model names the masked LM of --augment N: give --augment too")
    if glue.augment_model and not os.path.isfile(os.path.join(glue.augment_model, "config.json")):
        raise UsageError(f"--augment_model {glue.augment_model!r} is not a model folder (no config.json): give a "
                         "masked-LM folder, e.g. the pre-trained teacher")
    if glue.unlabelled_file and not os.path.isfile(glue.unlabelled_file):
        raise UsageError(f"--unlabelled_file {glue.unlabelled_file!r} does not exist: give a text file (one example "
                         "per line, a tab between the two texts of a pair) or a table with the task's text columns")
    if glue.teacher_cache_mb < 0:
        raise UsageError(f"--teacher_cache_mb {glue.teacher_cache_mb}: give MiB >= 0 (0 caches logits only)")


def load_checked_teacher(glue, task: Task, student, eager: bool):
    """The teacher, checked against the student's vocabulary (both read the same token ids); several teachers
    (``--teacher A --teacher B``) as one :class:`glue_eval.teachers.TeacherMixture`."""
    from .teachers import load_mixture, teacher_paths

    if len(teacher_paths(glue)) > 1:
        return load_mixture(glue, lambda path: load_teacher(path, task, eager), student)
    teacher = load_teacher(glue.teacher, task, eager)
    if teacher.get_input_embeddings().num_embeddings != student.get_input_embeddings().num_embeddings:
        raise UsageError(
            f"--teacher {glue.teacher!r} and the student have different vocabularies "
            f"({teacher.get_input_embeddings().num_embeddings} vs {student.get_input_embeddings().num_embeddings} "
            "tokens): both read the same token ids, so they need the same tokenizer"
        )
    return teacher


def stage_objectives(weights: dict, glue, student, teacher, each_teacher: bool = False):
    """(soft, hard) objectives of one stage: the terms that read the teacher, and those against the gold labels
    (the registry's ``teacher=False`` terms, which the unlabelled and augmented rows must not reach); either None.
    ``each_teacher``: ``teacher`` is a :class:`glue_eval.teachers.TeacherMixture` whose teachers each take their
    own terms (representation terms with several teachers): ``soft`` is their
    :class:`distill.objective.mixture.TeacherMix`."""
    from distill.objective.plan import Objective
    from distill.objective.settings import task_values

    from .teachers import mixture_objective

    def build(part):
        if not part:
            return None
        return Objective.from_config(part, **task_values(glue), student_config=student, teacher_config=teacher,
                                     student_layers=glue.student_layers, projection=True, sequence_level=True)

    soft = {k: v for k, v in weights.items() if terms.TERMS[k].teacher and v}
    hard = {k: v for k, v in weights.items() if not terms.TERMS[k].teacher and v}
    if each_teacher and soft:
        return mixture_objective(soft, glue, student, teacher), build(hard)
    return build(soft), build(hard)


def each_teacher_terms(teacher, stages) -> bool:
    """Whether several teachers each take their own terms: a (fixed- or entropy-weighted) mixture and a stage that
    compares teachers' layers (:func:`glue_eval.teachers.representation_terms`)."""
    from .teachers import TeacherMixture, representation_terms

    return isinstance(teacher, TeacherMixture) and bool(representation_terms(s["weights"] for s in stages))


def attention_needed(glue, task: Task) -> bool:
    """Whether any --teacher stage has an attention term (the models then run eager attention)."""
    return bool(glue.teacher) and any(needs_attention(stage["weights"]) for stage in run_stages(glue, task))


def train_with_teacher(model, data: dict, tokenizer, shared: dict, args, glue, task: Task):
    """Run every stage on ``model``; returns (the last trainer, a :class:`glue_eval.trainer.TrainOutput`).

    data: the task's tokenized splits; the training set gets its ``row`` and ``labelled`` columns here
        (augmented and unlabelled rows 0: :func:`glue_eval.encode.teacher_train_set`).
    shared: Trainer arguments shared by the stages (eval set, collator, tokenizer, metrics).
    """
    from .encode import teacher_train_set
    from .trainer import TrainOutput

    train, extra = teacher_train_set(task, data, tokenizer, args, glue)
    trainer, stages, cache = run_teacher_stages(model, train, shared, args, glue, task)
    gate = cache.pop("gate", None)  # the gating network's record (--teacher_gate), apart from the cache's
    return trainer, TrainOutput(sum(s["steps"] for s in stages), stages[-1]["loss"],
                                sum(s["runtime_s"] for s in stages), len(train),
                                {**extra, "stages": stages, "teacher_cache": cache, **({"gate": gate} if gate else {})})


def run_teacher_stages(model, train, trainer_kwargs: dict, args, glue, task: Task):
    """Every stage of a --teacher run on ``model``: (the last trainer, a record of the stages, the cache's size)."""
    from distill.models.loading import set_attention_dropout

    from .trainer import DistillationTrainer

    stages = run_stages(glue, task)
    teacher = load_checked_teacher(glue, task, model, any(needs_attention(s["weights"]) for s in stages))
    from .gate import gated_teacher

    teacher, gate = gated_teacher(teacher, train, trainer_kwargs["data_collator"], args, glue)  # (teacher, None)
    each = each_teacher_terms(teacher, stages)
    objectives = [stage_objectives(s["weights"], glue, model, teacher, each) for s in stages]
    cache, cache_record = None, {"enabled": bool(glue.teacher_cache), **({"gate": gate} if gate else {})}
    if glue.teacher_cache:
        cache, built = build_teacher_cache(teacher, [soft for soft, _ in objectives], train,
                                           trainer_kwargs["data_collator"], args, glue, each)
        cache_record.update(built)
    dropout = _attention_dropout(model)
    trainer, record = None, []
    for stage, (soft, hard) in zip(stages, objectives):
        # Attention terms compare pre-dropout probabilities; later stages get the model's dropout back.
        set_attention_dropout(model, 0.0 if needs_attention(stage["weights"]) else dropout)
        changes = {k: stage[k] for k in ("learning_rate",) if stage[k] is not None}
        if stage["epochs"] is not None:
            # A stage's epochs count even when the command line set --max_steps for the run.
            changes.update(num_train_epochs=float(stage["epochs"]), max_steps=-1)
        if stage["max_steps"] is not None:
            changes["max_steps"] = int(stage["max_steps"])
        stage_args = dataclasses.replace(args, **changes) if changes else args
        trainer = DistillationTrainer(model=model, args=stage_args, train_dataset=train, teacher=teacher, soft=soft,
                                      hard=hard, teacher_cache=cache, **trainer_kwargs)
        out = trainer.train()
        logs = [{k: v for k, v in entry.items() if k.startswith("distill/") or k in ("loss", "step")}
                for entry in trainer.state.log_history if "loss" in entry]
        record.append({"weights": stage["weights"], "epochs": stage_args.num_train_epochs,
                       "max_steps": stage_args.max_steps, "learning_rate": stage_args.learning_rate,
                       "steps": out.global_step, "loss": out.training_loss, "logs": logs,
                       "teacher_forwards": trainer.teacher_forwards,
                       "runtime_s": round(out.metrics.get("train_runtime", 0.0), 2),
                       **({"teachers": soft.to_dict()["teachers"]} if each and soft is not None else {})})
    set_attention_dropout(model, dropout)
    return trainer, record, cache_record


def build_teacher_cache(teacher, softs: list, train, collate, args, glue, each: bool):
    """The teacher cache of a run (``softs``: each stage's soft objective, None skipped) and its record. With
    ``each`` (several teachers each taking their own terms) one :class:`glue_eval.teacher_cache.TeacherCache` per
    teacher, their representations kept only if all of them fit ``--teacher_cache_mb`` together."""
    from .teacher_cache import TeacherCache, build_each, plan_for
    from .trainer import teacher_autocast

    teacher.to(args.device)
    options = dict(batch_size=args.per_device_eval_batch_size, device=args.device,
                   autocast=lambda: teacher_autocast(args))
    if each:
        plans = [plan_for(soft.objectives[k] for soft in softs if soft is not None)
                 for k in range(len(teacher.teachers))]
        caches = build_each(list(teacher.teachers), train, collate, plans, limit_mb=glue.teacher_cache_mb, **options)
        return caches, {"rows": len(caches[0].logits), "per_teacher": len(caches),
                        "representations": all(c.has_representations for c in caches),
                        "representations_requested": any(not p.empty for p in plans), "limit_mb": glue.teacher_cache_mb}
    plan = plan_for(softs)
    cache = TeacherCache.build(teacher, train, collate, plan, limit_mb=glue.teacher_cache_mb, **options)
    return cache, {"rows": len(cache.logits), "representations": cache.has_representations,
                   "representations_requested": not plan.empty, "limit_mb": glue.teacher_cache_mb}


def _attention_dropout(model) -> float:
    from distill.models.loading import family_of, get_path, transformer_layers

    layer = transformer_layers(model)[0]
    return float(get_path(layer, family_of(model).self_attention_path).dropout.p)
