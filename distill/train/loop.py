"""The distillation loop, top to bottom: setup, data, forward, loss, backward, step, log, checkpoint.

Determinism by construction: optimiser step ``k`` uses the global batch
``order(epoch)[k*G:(k+1)*G]`` (G = per-device batch x accumulation x world size),
cut into chunks of ``per_device_batch_size``; process ``rank`` takes chunk
``micro * world + rank`` at micro-step ``micro``, and chunk ``c`` is masked with a
generator seeded from ``(seed, step, c)``. So the data a step sees depends only on the
step number: resuming needs no sampler state, and N processes see exactly what one
process sees with N times the accumulation.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distill.common.assets import resolve_model_name, wiki_extract_path
from distill.common.errors import UsageError
from distill.common.io import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    default_file_mode,
)
from distill.models.loading import (
    TOKENIZER_FILES,
    Features,
    check_tokenizer,
    extract,
    family_of,
    load_config,
    load_model,
    num_layers,
    pooler_module,
    set_attention_dropout,
)
from distill.models.student import (
    INIT_RECORD,
    StudentSize,
    build_sized_student,
    build_student,
    read_init_record,
    size_record,
)
from distill.settings.config import (
    DEMO_CORPUS,
    DistillConfig,
    check_config,
)
from distill.train.checkpoints import (
    CHECKPOINTS,
    RunStats,
    check_resume_config,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distill.train.distributed import (
    NO_BUFFER_SYNC,
    Dist,
    all_finite,
    setup_distributed,
)

LOGS = "logs"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); what was last good has been saved."""


# --- setup ------------------------------------------------------------------------------------

def resolve_teacher(name: str) -> str:
    return resolve_model_name(name)  # the offline aliases (offline:all-MiniLM-L6-v2, offline:all-mpnet-base-v2)


def resolve_corpus(name: str) -> str:
    return wiki_extract_path() if name == DEMO_CORPUS else name


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- the step module: everything with gradients, so DDP sees one forward ----------------------

class StudentStep(nn.Module):
    """Student (+ objective projections) forward and loss for one micro-batch.

    Wrapped in DistributedDataParallel as a whole, so the projections' gradients are
    synchronised too. The teacher is held outside the module tree (frozen, never
    synchronised) and runs under ``no_grad``. ``generator``: an ELECTRA generator that
    trains (:class:`distill.train.electra.GeneratorStep`): it corrupts the batch here, and its
    MLM loss (term ``gen_mlm``) joins the total, so DDP, the optimiser and checkpoints see it.
    """

    def __init__(self, student: nn.Module, objective: nn.Module, teacher: nn.Module, generator=None):
        super().__init__()
        self.student = student
        self.objective = objective
        self.generator = generator
        self._teacher = (teacher,)  # a tuple keeps it out of parameters(), state_dict() and DDP

    def forward(self, batch: dict):
        gen_loss = None
        if self.generator is not None:
            batch, gen_loss = self.generator(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher_out = Features()
        if self.objective.needs_teacher:  # e.g. an mlm-only objective asks nothing of the teacher
            with torch.no_grad():
                teacher_out = extract(self._teacher[0], ids, mask, **self.objective.extract_kwargs(batch, "teacher"))
        student_out = extract(self.student, ids, mask, **self.objective.extract_kwargs(batch, "student"))
        loss, terms = self.objective(student_out, teacher_out, batch)
        if gen_loss is not None:
            loss, terms = loss + self.generator.weight * gen_loss, {**terms, "gen_mlm": gen_loss.detach()}
        return loss, terms

    def term_values(self, batch: dict) -> dict:
        """Each active term's unweighted value, attached to the graph (``--calibrate``; no generator loss)."""
        from distill.objective.calibrate import objective_terms

        if self.generator is not None:
            with torch.no_grad():
                batch, _ = self.generator(batch, with_loss=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher_out = Features()
        if self.objective.needs_teacher:
            with torch.no_grad():
                teacher_out = extract(self._teacher[0], ids, mask, **self.objective.extract_kwargs(batch, "teacher"))
        student_out = extract(self.student, ids, mask, **self.objective.extract_kwargs(batch, "student"))
        return objective_terms(self.objective, student_out, teacher_out, batch)


# --- the loop ---------------------------------------------------------------------------------

def train(cfg: DistillConfig) -> str:
    """Run a distillation described by ``cfg``; return the folder holding the student.

    The main process holds the output folder's lock for the whole run: a second writer is refused.
    """
    from distill.common.locks import output_lock

    check_config(cfg)  # a config built in code gets the checks a recipe or the command line gets
    with output_lock(cfg.output_dir, "distill-train", enabled=int(os.environ.get("RANK", "0")) == 0):
        return _train(cfg)


def _train(cfg: DistillConfig) -> str:
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from distill.objective.plan import Objective
    from distill.train.batches import make_batches
    from distill.train.precision import Precision

    env = setup_distributed(cfg.device)
    from distill.common.hardware import (
        describe_machine,
        machine_description,
        resolve_threads,
    )

    # torchrun on a CPU: the processes of this node share its cores
    threads, threads_why = resolve_threads(cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    out = Path(cfg.output_dir)
    if cfg.calibrate:
        check_calibrate(cfg, env)  # it writes only calibration.json: any output folder will do
    elif not cfg.resume:
        check_output_dir(out, cfg.overwrite_output_dir, "--overwrite_output_dir (or --resume to continue)")
    elif not latest_checkpoint(out):
        raise UsageError(f"--resume: no checkpoint in {str(out / CHECKPOINTS)!r}; start without --resume")
    else:
        check_resume_config(cfg, out)

    # models and objective: configs first, so every config error comes before a weight load
    teacher_path = resolve_teacher(cfg.teacher)
    teacher_config = load_config(teacher_path, "teacher")
    from distill.train.electra import check_recipe, setup_generator

    check_recipe(cfg, teacher_config)  # ELECTRA recipes: teacher, generator and rtd terms agree
    layers, student_config, size = student_plan(cfg, teacher_config)
    from distill.models.sentence import pipeline_source, read_pipeline

    source = pipeline_source(teacher_path, cfg.student)  # sentence-transformers in, sentence-transformers out
    sentence = read_pipeline(source, student_config) if source else None
    objective = Objective.from_config(settings=cfg, student_config=student_config, teacher_config=teacher_config,
                                      student_layers=layers)
    precision = Precision.from_config(cfg.precision, cfg.fp16_opt_level, device=env.device, force_o3=cfg.force_o3,
                                      amp_backend=cfg.amp_backend)
    set_seed(cfg.seed)
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
    pooler = pooler_module(student)
    pooler_start = None
    if pooler is not None:
        # no term reads the pooled output: freeze it, and save it exactly as it came (O2 would round it)
        pooler.requires_grad_(False)
        pooler_start = {k: v.detach().clone() for k, v in pooler.state_dict().items()}
    student.to(env.device).train()
    if objective.needs_attention:
        set_attention_dropout(student, 0.0)  # attention terms compare pre-dropout probabilities
    objective.to(env.device)

    # ELECTRA: the generator is built here; the batches get only a corruptor, a trained one joins the step
    corruptor, generator = setup_generator(cfg, tokenizer, teacher, env.device, precision)
    batches = make_batches(cfg, resolve_corpus(cfg.corpus), tokenizer, teacher, objective, env, student, corruptor)
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * env.world
    steps_per_epoch = batches.num_sequences // global_batch
    if steps_per_epoch == 0:
        raise UsageError(
            f"the corpus gives {batches.num_sequences} sequences, fewer than one global batch of {global_batch} "
            "(per_device_batch_size x gradient_accumulation_steps x processes): lower them or add text")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)

    if cfg.calibrate:  # measure the terms on the first steps' batches, change nothing, stop
        from distill.objective.calibrate import run_calibration

        step_module = StudentStep(student, objective, teacher, getattr(batches, "trained_generator", None))
        run_calibration(step_module, student.parameters(), (batches.chunk(k, 0) for k in range(cfg.calibrate)),
                        precision.autocast, out)
        return str(out)

    student = precision.prepare(student)
    if generator is not None:  # ELECTRA with train_generator
        precision.prepare(generator)
    step_module = StudentStep(student, objective, teacher, generator)
    if env.world > 1:
        freeze_unused(step_module, batches.chunk(0, 0), precision)
    # fused AdamW where the device has it (make_optimizer's default): one kernel for all parameters
    optimizer = precision.make_optimizer(param_groups(step_module, cfg.weight_decay), torch.optim.AdamW,
                                         lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         eps=cfg.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    model = step_module
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[env.device.index] if env.device.type == "cuda" else None, **NO_BUFFER_SYNC)

    start_step, stats = 0, RunStats()
    if cfg.resume:
        start_step, stats = load_checkpoint(latest_checkpoint(out), step_module, optimizer, scheduler, precision, env)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # dropout differs per process, as in any DDP run
    if env.main:
        (out / LOGS).mkdir(parents=True, exist_ok=True)
        # what the "auto" fields became on this machine, next to them ("_" keys: the file stays a valid recipe)
        resolved = {"precision": precision.mode, "precision_reason": precision.auto_reason, "threads": threads,
                    "threads_reason": threads_why, "machine": machine_description()}
        atomic_write_json(out / "distill_config.json", {**cfg.to_dict(), "_resolved": resolved})
    logger = Logger(out / LOGS, env.main and cfg.progress, total_steps, start_step) if env.main else None
    if env.main:
        if precision.auto_reason:
            print(precision.auto_reason, file=sys.stderr)
        print(f"threads: {threads} ({threads_why})", file=sys.stderr)
        print(f"distilling {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M-parameter student from "
              f"{cfg.teacher} on {env.world} x {env.device.type}, {precision.description}; {total_steps} steps of "
              f"{global_batch} x {cfg.block_size} tokens; terms {objective.describe()}", file=sys.stderr)
        copies = objective.self_copy_pairs(layers) if not cfg.resume and cfg.layer_map is None else {}
        if copies:
            n_s, n_t = len(layers), num_layers(teacher_config)
            uniform = [[i, round(i * n_t / n_s)] for i in range(1, n_s + 1)]
            shown = sorted({s for pairs in copies.values() for s, _ in pairs})
            fix = (f"a layer_map such as {uniform} gives them targets" if all(s != t for s, t in uniform) else
                   "a layer_map pairing them with higher teacher layers gives them targets")
            print(f"note: {', '.join(copies)} compare student layers {','.join(map(str, shown))} with the teacher "
                  "layers they were copied from, on the same inputs: from a fresh copy these terms start near 0 and "
                  f"teach those layers little; {fix}", file=sys.stderr)

    window = Window()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        losses = []
        for micro in range(cfg.gradient_accumulation_steps):
            chunk = micro * env.world + env.rank
            batch = batches.chunk(step, chunk)
            sync = micro == cfg.gradient_accumulation_steps - 1
            with (model.no_sync() if env.world > 1 and not sync else nullcontext()):
                with precision.autocast():
                    loss, terms = model(batch)
                precision.backward(loss / cfg.gradient_accumulation_steps)
            losses.append(loss.detach())
            window.add(loss.detach(), terms, int(batch["attention_mask"].sum()))
        if not precision.scales_loss and not all_finite(torch.stack(losses), env):
            # the weights are still those of the last finished step: save them, then stop
            save_checkpoint(out, step, step_module, optimizer, scheduler, precision, stats, cfg, env)
            raise TrainingError(
                f"loss is {[float(x) for x in losses]} at step {step + 1} ({window.last_terms()}): saved step {step} to "
                f"{out / CHECKPOINTS}; lower learning_rate or check the data, then --resume")
        result = precision.step(optimizer, cfg.max_grad_norm)
        if not result.skipped:
            scheduler.step()
        stats.skipped += int(result.skipped)
        stats.tokens += window.tokens_since_step * env.world
        window.step_done(time.perf_counter() - t0)
        done = step + 1
        if logger and (done % cfg.logging_steps == 0 or done == total_steps):
            record = window.flush(env, done, scheduler.get_last_lr()[0], result, stats)
            logger.log(done, record)
        elif env.world > 1 and (done % cfg.logging_steps == 0 or done == total_steps):
            window.flush(env, done, scheduler.get_last_lr()[0], result, stats)  # every rank joins the all-reduce
        if logger:
            logger.tick(window.last_loss, window.tokens_per_s)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
            save_checkpoint(out, done, step_module, optimizer, scheduler, precision, stats, cfg, env)
    if logger:
        logger.close()
    if env.main:
        save_student(out, student, precision, tokenizer, cfg, layers, objective, stats, total_steps, env,
                     batches.describe(), pooler_start, machine=describe_machine(),
                     sentence=sentence, size=size)
        print(f"student saved to {out} (load it with from_pretrained({str(out)!r}))", file=sys.stderr)
        if generator is not None:
            from distill.train.electra import save_generator

            print(f"trained generator saved to {save_generator(out, generator, precision, tokenizer)}", file=sys.stderr)
    if env.world > 1:
        # DDP's reducer must not hold the last reference to the process group: its destructor would
        # then join gloo's worker thread while holding the GIL, which that thread may need (a hang at exit)
        del model
        dist.destroy_process_group()
    return str(out)


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


def freeze_unused(step_module: nn.Module, batch: dict, precision) -> list[str]:
    """Freeze parameters the objective never reaches (e.g. BERT's pooler, or a head no term uses).

    One probe forward/backward finds them. Frozen, they need no optimiser state and DDP
    can run without ``find_unused_parameters`` (a graph walk every step). The probe runs
    before the run seeds its RNGs (or loads them on resume), so it changes no result.
    """
    with precision.autocast():
        loss, _ = step_module(batch)
    loss.float().backward()
    unused = [name for name, p in step_module.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in step_module.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


def param_groups(module: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --- statistics and logging -------------------------------------------------------------------

class Window:
    """Sums of the loss and terms since the last log, kept on the device; one sync per step (the progress bar)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens = 0
        self.tokens_since_step = 0
        self.seconds = 0.0
        self.last_loss = float("nan")
        self.tokens_per_s = 0.0
        self._last_terms: dict = {}

    def add(self, loss, terms, tokens):
        for k, v in {"loss": loss, **terms}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1
        self.tokens += tokens
        self.tokens_since_step += tokens
        self._last_terms = terms

    def last_terms(self) -> str:
        return ", ".join(f"{k}={float(v):.4g}" for k, v in self._last_terms.items())

    def step_done(self, seconds: float):
        self.seconds += seconds
        self.tokens_per_s = self.tokens_since_step / max(seconds, 1e-9)
        self.last_loss = float(self.sums["loss"] / max(self.count, 1)) if self.count else float("nan")
        self.tokens_since_step = 0

    def flush(self, env: Dist, step, lr, result, stats: RunStats) -> dict:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        tokens = torch.tensor([float(self.tokens), self.seconds], device=values.device)
        if env.world > 1:
            dist.all_reduce(values)
            values /= env.world
            dist.all_reduce(tokens)
        record = {k: float(v) for k, v in zip(keys, values.tolist())}
        record.update(step=step, lr=lr, loss_scale=result.scale, skipped_steps=stats.skipped,
                      grad_norm=result.grad_norm, tokens_per_s=float(tokens[0]) / max(float(tokens[1]) / env.world, 1e-9),
                      tokens_seen=stats.tokens)
        stats.last_terms = {k: record[k] for k in keys}
        self.sums, self.count, self.tokens, self.seconds = {}, 0, 0, 0.0
        return record


class Logger:
    """Progress bar, TensorBoard and a JSONL file; only the main process has one."""

    def __init__(self, folder: Path, progress: bool, total: int, start: int):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        log = folder / "train_log.jsonl"
        if start and log.exists():  # a resumed run redoes the steps after its checkpoint: drop their records
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            atomic_write_text(log, "".join(line + "\n" for line in kept))
        self.jsonl = open(log, "a", encoding="utf-8")
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1 if start else None)
        self.bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)

    def log(self, step: int, record: dict):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)

    def tick(self, loss: float, tokens_per_s: float):
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()
        self.tb.close()
        self.jsonl.close()


# --- checkpoints ------------------------------------------------------------------------------

# --- the saved student ------------------------------------------------------------------------

def save_student(out: Path, student, precision, tokenizer, cfg, layers, objective, stats, steps, env, data_desc,
                 pooler_state=None, machine: str | None = None, sentence=None, size: dict | None = None):
    """save_pretrained (fp32 weights, safetensors), tokenizer, model card; config.json written last.

    ``sentence``: the teacher's sentence-transformers pipeline (``sentence_models``), written beside the weights.
    ``size``: a student of chosen size (``layers`` is then None): its shape and how it was initialised.
    """
    from distill.train.card import training_card

    export = precision.export_model(student)  # O2 trains fp16 weights: export the fp32 masters
    if pooler_state is not None:  # the frozen pooler, exact (it has no fp32 master to export)
        pooler_module(export).load_state_dict(pooler_state)
    tmp = Path(out) / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export.config.output_hidden_states = False
    export.config.output_attentions = False
    export.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if sentence is not None:
        sentence.write(tmp)
    (tmp / "README.md").write_text(
        training_card(cfg, layers, objective, stats, steps, env.world, env.device.type, precision.description,
                      type(export).__name__, data_desc, auto_reason=precision.auto_reason, machine=machine,
                      size=size),
        encoding="utf-8")
    atomic_write_json(tmp / INIT_RECORD, {"teacher": cfg.teacher, "student_type": family_of(export).name,
                                          "layers": list(layers) if layers is not None else None, **(size or {}),
                                          "distilled": True})
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:
        if (tmp / name).is_file():
            os.chmod(tmp / name, default_file_mode())
    if sentence is None:  # a sentence pipeline left by an earlier run in this folder is not this student's
        (Path(out) / "modules.json").unlink(missing_ok=True)
    for name in [n for n in names if n != "config.json"] + ["config.json"]:  # config last: a folder with it is whole
        if (tmp / name).is_dir() and (Path(out) / name).is_dir():
            shutil.rmtree(Path(out) / name)  # a module folder (e.g. 1_Pooling) of an earlier run here
        os.replace(tmp / name, Path(out) / name)
    tmp.rmdir()
    atomic_write_text(Path(out) / LOGS / "final_terms.json", json.dumps(stats.last_terms or {}, indent=2) + "\n")
