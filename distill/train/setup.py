"""Run setup: the models, the objective, the precision and the batches a run needs, built once and handed to
the loop (nothing below the loop owns a model)."""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.common.errors import UsageError
from distill.common.assets import resolve_model_name, wiki_extract_path
from distill.models.loading import family_of, load_config, num_layers
from distill.models.student import INIT_RECORD, StudentSize, read_init_record, size_record
from distill.settings.config import DEMO_CORPUS, DistillConfig
from distill.train.distributed import Dist

def resolve_teacher(name: str) -> str:
    return resolve_model_name(name)  # the offline aliases (offline:all-MiniLM-L6-v2, offline:all-mpnet-base-v2)


def resolve_corpus(name: str) -> str:
    return wiki_extract_path() if name == DEMO_CORPUS else name


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



SIZE_FIELDS = ("student_num_layers", "student_hidden_size", "student_num_heads", "student_intermediate_size")


def student_size(cfg: DistillConfig) -> StudentSize:
    return StudentSize(cfg.student_num_layers, cfg.student_hidden_size, cfg.student_num_heads,
                       cfg.student_intermediate_size)


def student_plan(cfg: DistillConfig, teacher_config):
    """The teacher layers the student comes from (None for one of chosen size), the student's config, and
    for a student of chosen size its :func:`distill.models.student.size_record` (else None)."""
    from distill.models.families import FAMILIES
    from distill.models.layers import parse_layers
    from distill.models.loading import role_from_architectures
    from distill.models.student import check_pair, sized_student_config, student_config

    sized = [name for name in SIZE_FIELDS if getattr(cfg, name) is not None]
    if sized and cfg.student_num_layers is None:
        raise UsageError(f"{', '.join(sized)} need student_num_layers (the depth of a student of chosen size), e.g. 6")
    if sized and (cfg.student or cfg.student_layers is not None):
        clash = "student" if cfg.student else "student_layers"
        raise UsageError(f"{', '.join(sized)} build a student of chosen size at random, which {clash} contradicts "
                         "(it names a student built from teacher layers): drop one of them")
    if cfg.student_num_layers is not None:
        s_config = sized_student_config(teacher_config, student_size(cfg), cfg.student_type)
        s_config.architectures = [FAMILIES[family_of(s_config).name].classes[role_from_architectures(teacher_config)]]
        return None, s_config, size_record(s_config, teacher_config)
    if cfg.student:
        s_config = load_config(cfg.student, "student")
        record = read_init_record(cfg.student)
        if record and record.get("layers") is None and "initialised" in record:
            # a student of chosen size (distill-init --num_layers): no layer selection to default the loss map to
            if cfg.student_layers is not None:
                raise UsageError(f"student_layers {cfg.student_layers}: {cfg.student!r} was built at a chosen size "
                                 f"with random weights, not from teacher layers; use layer_map for a loss map")
            return None, s_config, {k: record[k] for k in ("num_layers", "hidden_size", "num_heads",
                                                          "intermediate_size", "initialised") if k in record}
        if record and cfg.student_layers is not None and list(cfg.student_layers) != record["layers"]:
            raise UsageError(
                f"student_layers {cfg.student_layers} disagree with {cfg.student!r}, built from teacher layers "
                f"{record['layers']} ({INIT_RECORD}): drop student_layers, or use layer_map for another loss map")
        layers = record["layers"] if record else cfg.student_layers
        if layers is None:
            raise UsageError(f"student {cfg.student!r} has no {INIT_RECORD}: set student_layers to the teacher "
                             "layers it was built from (they are the default loss layer map)")
        if num_layers(s_config) != len(layers):
            raise UsageError(
                f"student {cfg.student!r} has {num_layers(s_config)} layers but student_layers {layers} has "
                f"{len(layers)}: give the teacher layers it was built from")
        return parse_layers(layers, num_layers(teacher_config)), s_config, None
    if cfg.student_layers is None:
        raise UsageError("student_layers is not set: give the teacher layers to build the student from, "
                         "e.g. --student_layers 1,5,8,12 (or student_num_layers for a student of chosen size)")
    layers = parse_layers(cfg.student_layers, num_layers(teacher_config), what="teacher")
    student_type = cfg.student_type or family_of(teacher_config).name
    check_pair(family_of(teacher_config).name, student_type)
    s_config = student_config(teacher_config, len(layers), student_type)
    # the class build_student will make, so the objective can check the student's head from the config
    s_config.architectures = [FAMILIES[student_type].classes[role_from_architectures(teacher_config)]]
    return layers, s_config, None


def check_calibrate(cfg: DistillConfig, env: Dist) -> None:
    # calibrate >= 0 is the field's declared range, checked with the config
    if cfg.resume:
        raise UsageError("--calibrate measures a fresh student and trains nothing: drop --resume")
    if env.world > 1:
        raise UsageError("--calibrate runs in one process: start it without torchrun")





# --- what the loop is handed ------------------------------------------------------------------

@dataclass
class Run:
    """Everything setup builds for the loop, once."""

    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    objective: nn.Module
    precision: object
    batches: object
    generator: nn.Module | None  # ELECTRA's generator when it trains (else None)
    layers: list[int] | None  # the teacher layers the student comes from (None: a student of chosen size)
    size: dict | None  # a student of chosen size: its shape and initialisation
    sentence: object  # the teacher's sentence-transformers pipeline, written beside the student (or None)
    pooler_start: dict | None  # the frozen pooler, saved exactly as it came
    teacher_config: object
    total_steps: int
    global_batch: int
    teachers: list = field(default_factory=list)  # the teachers the step runs (several: one per objective)

    def step_teachers(self):
        """What :class:`StudentStep` runs: the one teacher, or the list of several."""
        return self.teachers if len(self.teachers) > 1 or (self.teachers and self.teachers[0] is not self.teacher
                                                            ) else self.teacher


@dataclass
class Optimisation:
    """The step module (student + objective projections [+ generator]), what wraps it, and its optimiser."""

    step_module: nn.Module
    model: nn.Module | None  # step_module, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object


def start_process(cfg: DistillConfig) -> tuple[Dist, tuple[int, str, str], Path]:
    """This process's rank and device, its torch threads (and why, and the allocator's settings), and the checked
    output folder."""
    from distill.common.hardware import resolve_threads, tune_malloc
    from distill.common.io import check_output_dir
    from distill.train.checkpoints import CHECKPOINTS, check_resume_config, latest_checkpoint
    from distill.train.distributed import setup_distributed

    env = setup_distributed(cfg.device)
    # torchrun on a CPU: the processes of this node share its cores
    threads = resolve_threads(cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads[0])
    allocator = tune_malloc() if cfg.malloc_tuning and env.device.type == "cpu" else None
    threads = (*threads, allocator or "the allocator's defaults")
    out = Path(cfg.output_dir)
    if cfg.calibrate:
        check_calibrate(cfg, env)  # it writes only calibration.json: any output folder will do
    elif not cfg.resume:
        check_output_dir(out, cfg.overwrite_output_dir, "--overwrite_output_dir (or --resume to continue)")
        if env.main and (out / CHECKPOINTS).is_dir():  # overwritten: a later --resume must not find the old run's
            import shutil

            shutil.rmtree(out / CHECKPOINTS)
            print(f"--overwrite_output_dir: removed the previous run's checkpoints in {str(out / CHECKPOINTS)!r}",
                  file=sys.stderr)
    elif not latest_checkpoint(out):
        raise UsageError(f"--resume: no checkpoint in {str(out / CHECKPOINTS)!r}; start without --resume")
    else:
        check_resume_config(cfg, out)
    return env, threads, out


def build_run(cfg: DistillConfig, env: Dist) -> Run:
    """Configs first, so every config error comes before a weight load; then the models, the batches."""
    from distill.models.sentence import pipeline_source, read_pipeline
    from distill.train.electra import check_recipe
    from distill.train.precision import Precision
    from distill.train.teachers import build_objective, load_teachers, read_teachers

    teachers = read_teachers(cfg, resolve_teacher)  # every teacher's config; which of them teach, and how much
    teacher_path, teacher_config = teachers.first  # the student is built from the first teacher
    check_recipe(cfg, teacher_config)  # ELECTRA recipes: teacher, generator and rtd terms agree
    layers, student_config, size = student_plan(cfg, teacher_config)
    source = pipeline_source(teacher_path, cfg.student)  # sentence-transformers in, sentence-transformers out
    sentence = read_pipeline(source, student_config) if source else None
    set_seed(cfg.seed)  # before the objective: its width projections are drawn when it is built
    objective = build_objective(cfg, teachers, student_config, layers)
    precision = Precision.from_config(cfg.precision, cfg.fp16_opt_level, device=env.device, force_o3=cfg.force_o3,
                                      amp_backend=cfg.amp_backend)
    teacher, student, tokenizer, pooler_start = load_models(cfg, env, teacher_path, teacher_config, layers, size,
                                                            objective)
    taught_by = load_teachers(teachers, teacher, student, tokenizer, objective, env.device, cfg.block_size,
                              None if cfg.teacher_fp32 else precision.autocast_dtype)
    if not any(model is teacher for model in taught_by):
        # the first teacher built the student and teaches nothing (weight 0): let it go; the batches read one
        # that teaches (the teachers share one vocabulary, checked as they loaded)
        teacher = taught_by[0]
    return build_data(cfg, env, Run(teacher, student, tokenizer, objective, precision, None, None, layers, size,
                                    sentence, pooler_start, teacher_config, 0, 0, taught_by))


def load_models(cfg: DistillConfig, env: Dist, teacher_path: str, teacher_config, layers, size, objective):
    """The frozen teacher, the student (a folder, one of chosen size, or copied teacher layers), the tokenizer,
    and the student's pooler state when it has one (frozen: no term reads it)."""
    from transformers import AutoTokenizer

    from distill.models.loading import TOKENIZER_FILES, check_tokenizer, load_model, pooler_module, set_attention_dropout
    from distill.models.student import build_sized_student, build_student

    teacher = load_model(teacher_path, eager=objective.needs_attention, what="teacher").to(env.device).eval()
    teacher.requires_grad_(False)
    if cfg.student:
        student = load_model(cfg.student, eager=objective.needs_attention, what="student")
    elif size is not None:  # a student of chosen size: random weights, nothing of the teacher's copied
        student = build_sized_student(teacher_config, student_size(cfg), cfg.student_type, seed=cfg.seed,
                                      attn_implementation=teacher.config._attn_implementation)
    else:
        student, _ = build_student(teacher, layers, cfg.student_type, teacher_name=cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if cfg.student and any(os.path.exists(os.path.join(cfg.student, f)) for f in TOKENIZER_FILES):
        from distill.data.corpus import check_same_tokenizer

        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(cfg.student))
    check_tokenizer(teacher.config, tokenizer)
    pooler, pooler_start = pooler_module(student), None
    if pooler is not None:
        # no term reads the pooled output: freeze it, and save it exactly as it came (O2 would round it)
        pooler.requires_grad_(False)
        pooler_start = {k: v.detach().clone() for k, v in pooler.state_dict().items()}
    student.to(env.device).train()
    if objective.needs_attention:
        set_attention_dropout(student, 0.0)  # attention terms compare pre-dropout probabilities
    objective.to(env.device)
    return teacher, student, tokenizer, pooler_start


def build_data(cfg: DistillConfig, env: Dist, run: Run) -> Run:
    """The batches (ELECTRA: with the generator's corruptor) and the number of optimiser steps."""
    from distill.train.batches import make_batches
    from distill.train.electra import setup_generator

    # ELECTRA: the generator is built here; the batches get only a corruptor, a trained one joins the step
    corruptor, run.generator = setup_generator(cfg, run.tokenizer, run.teacher, env.device, run.precision)
    run.batches = make_batches(cfg, resolve_corpus(cfg.corpus), run.tokenizer, run.teacher, run.objective, env,
                               run.student, corruptor)
    run.global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * env.world
    steps_per_epoch = run.batches.num_sequences // run.global_batch
    if steps_per_epoch == 0:
        raise UsageError(
            f"the corpus gives {run.batches.num_sequences} sequences, fewer than one global batch of "
            f"{run.global_batch} (per_device_batch_size x gradient_accumulation_steps x processes): lower them or "
            "add text")
    run.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    return run


def calibrate_only(cfg: DistillConfig, run: Run, out: Path) -> str:
    """--calibrate: each term's value and gradient norm on the first batches; weights that balance them."""
    from distill.objective.calibrate import run_calibration
    from distill.train.step import StudentStep

    step_module = StudentStep(run.student, run.objective, run.step_teachers(),
                              getattr(run.batches, "trained_generator", None), teacher_fp32=cfg.teacher_fp32)
    run_calibration(step_module, run.student.parameters(), (run.batches.chunk(k, 0) for k in range(cfg.calibrate)),
                    run.precision.autocast, out)
    return str(out)


def optimisation(cfg: DistillConfig, run: Run, env: Dist) -> Optimisation:
    """The precision's model preparation (O2: fp16 weights), the step module, AdamW and its schedule, DDP."""
    from transformers import get_linear_schedule_with_warmup

    from distill.train.distributed import NO_BUFFER_SYNC
    from distill.train.step import StudentStep, freeze_unused, param_groups

    run.student = run.precision.prepare(run.student)
    if run.generator is not None:  # ELECTRA with train_generator
        run.precision.prepare(run.generator)
    if cfg.compile:  # each model's forward apart: the teacher's under no_grad, the student's with its backward
        compile_models(*dict.fromkeys([run.teacher, *run.teachers]), run.student)
    step_module = StudentStep(run.student, run.objective, run.step_teachers(), run.generator,
                              teacher_fp32=cfg.teacher_fp32)
    if env.world > 1:
        freeze_unused(step_module, run.batches.chunk(0, 0), run.precision)
    # fused AdamW where the device has it (make_optimizer's default): one kernel for all parameters
    optimizer = run.precision.make_optimizer(param_groups(step_module, cfg.weight_decay), torch.optim.AdamW,
                                             lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                             eps=cfg.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * run.total_steps), run.total_steps)
    model = step_module
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[env.device.index] if env.device.type == "cuda" else None, **NO_BUFFER_SYNC)
    return Optimisation(step_module, model, optimizer, scheduler)


def compile_models(*models: nn.Module) -> None:
    """``torch.compile`` each model's base (the encoder extract runs), in place; the heads stay eager (the chunked
    vocabulary head runs outside the model)."""
    for model in models:
        model.base_model.compile()


def announce(cfg: DistillConfig, run: Run, env: Dist, out: Path, threads: tuple[int, str, str], start_step: int):
    """The main process records the recipe with what "auto" became here, opens the logs and says what runs;
    the logger (None on the other ranks)."""
    from distill.common.hardware import machine_description
    from distill.common.io import atomic_write_json
    from distill.train.logs import LOGS, Logger

    if not env.main:
        return None
    (out / LOGS).mkdir(parents=True, exist_ok=True)
    # what the "auto" fields became on this machine, next to them ("_" keys: the file stays a valid recipe)
    resolved = {"precision": run.precision.mode, "precision_reason": run.precision.auto_reason,
                "threads": threads[0], "threads_reason": threads[1], "allocator": threads[2],
                "machine": machine_description()}
    atomic_write_json(out / "distill_config.json", {**cfg.to_dict(), "_resolved": resolved})
    logger = Logger(out / LOGS, cfg.progress, run.total_steps, start_step)
    if run.precision.auto_reason:
        print(run.precision.auto_reason, file=sys.stderr)
    print(f"threads: {threads[0]} ({threads[1]})", file=sys.stderr)
    print(f"allocator: {threads[2]}", file=sys.stderr)
    print(f"distilling {sum(p.numel() for p in run.student.parameters()) / 1e6:.1f}M-parameter student from "
          f"{cfg.teacher}{f' and {len(cfg.other_teachers)} more teacher(s)' if cfg.other_teachers else ''} on {env.world} x {env.device.type}, {run.precision.description}"
          f"{'; the teacher in fp32 (teacher_fp32)' if cfg.teacher_fp32 and run.precision.autocast_dtype else ''}; {run.total_steps} steps "
          f"of {run.global_batch} x {cfg.block_size} tokens; terms {run.objective.describe()}", file=sys.stderr)
    if not cfg.resume and cfg.layer_map is None:
        note_self_copies(run)
    return logger


def note_self_copies(run: Run) -> None:
    """A note when terms compare student layers with the very teacher layers they were copied from."""
    copies = run.objective.self_copy_pairs(run.layers)
    if not copies:
        return
    n_s, n_t = len(run.layers), num_layers(run.teacher_config)
    uniform = [[i, round(i * n_t / n_s)] for i in range(1, n_s + 1)]
    shown = sorted({s for pairs in copies.values() for s, _ in pairs})
    fix = (f"a layer_map such as {uniform} gives them targets" if all(s != t for s, t in uniform) else
           "a layer_map pairing them with higher teacher layers gives them targets")
    print(f"note: {', '.join(copies)} compare student layers {','.join(map(str, shown))} with the teacher "
          "layers they were copied from, on the same inputs: from a fresh copy these terms start near 0 and "
          f"teach those layers little; {fix}", file=sys.stderr)
