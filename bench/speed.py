"""The speed report: distillation step, data preparation and student inference, as ratios.

Run from the repository root::

    python -m bench.speed --quick                       # < 5 min on a 2-core CPU
    python -m bench.speed --out docs/speed.json         # the full report (~15 min there)
    python -m bench.speed --smoke                       # every code path on tiny models, seconds

Four measurements, each a median of repeated runs. The compared variants run
interleaved, one round after another (A B C, C B A, ...), so load from other
processes hits all alike; a ratio is the median over rounds of the ratio within a
round (the ratio of the medians and of the CPU times are in the JSON too).
On a CPU, ``--threads auto`` uses torch's default thread count on an idle machine and
1 thread when the load average says other processes hold the cores. On a CUDA device
the distillation step runs in fp32, bf16, fp16 O1 and fp16 O2; on a CPU in fp32 (and
bf16 in the full report); the named ratios are the fp32 ones.

1. **Distillation step** (DistilBERT objective ``5*ce + 2*mlm + 1*cos``, T=2): a
   BertForMaskedLM teacher of BERT-base shape (12 x 768, random weights), a 4-layer
   student built by ``distill.models.student.build_student`` from teacher layers 1,5,8,12,
   batch ``B x 128`` of packed blocks masked by ``distill.data.masking``. One step is
   forward, loss, backward and an AdamW step through ``distill.train.precision.Precision``.
   Variants:

   - ``engine_masked`` / ``engine_full``: ``distill.train.loop.StudentStep`` (teacher
     ``extract`` under no_grad, student ``extract``, ``Objective``) with
     ``restrict_ce_to_mask`` True / False. Masked: vocabulary heads only at the 15%
     MLM targets; full: at every real token (packed blocks have no padding).
   - ``plain_masked`` / ``plain_full``: the same loss written the obvious way, as the
     DistilBERT research code did: both models called with
     ``output_hidden_states=True``, full ``[B, S, V]`` logits from both, ce as
     ``F.kl_div(batchmean)`` on ``masked_select``-ed rows (MLM targets / real
     tokens), mlm as ``F.cross_entropy`` over all ``B*S`` rows with ignore_index,
     cos as ``F.cosine_embedding_loss`` on the real tokens' last hidden states.
   - ``floor_masked`` / ``floor_full``: the engine's work minus the objective:
     teacher ``extract`` + student ``extract`` with exactly the outputs the
     objective asks for (hidden states, heads at the same positions), then a trivial
     loss (mean of the student's logits + mean of its last hidden state), backward
     and step. ``engine / floor`` is the cost of the objective itself.
   - ``floor_student``: student forward/backward alone (no teacher, no head,
     trivial mean of the last hidden state) and step: the least a step can do.

   The full report also times the pieces of a step apart (teacher encoder, heads,
   loss, backward, optimizer): what dominates each variant.

   **The demo recipe's step** (section ``demo``): ``distill-train``'s default recipe (the
   real all-MiniLM-L6-v2 teacher, 3-layer student from layers 2,4,6, cos + hid_mse +
   att_mse, batch 16 x 128) at precision ``auto`` against ``fp32`` and ``bf16``: what
   ``auto`` chose on this machine, and what that choice is worth.

2. **Data preparation**: ``distill.data.corpus.load_corpus_blocks`` (fresh cache folder each
   repetition, 128-token packed blocks) against a line-by-line ``tokenizer.encode``
   loop with the same MiniLM tokenizer over the same paragraphs (then the same
   packing in numpy and ``np.save``), each with ``TOKENIZERS_PARALLELISM`` unset and
   set to ``false``; ``prep_vs_loop`` is the lower of the two ratios (the pipeline
   should use the cores in either environment). Both read the same text file: the clean
   paragraphs of the real Wikipedia extract, one per line. Each repetition runs in a
   fresh subprocess so peak memory (VmHWM above the post-import baseline) is its own.
   Also reported: the pipeline from the raw MediaWiki dump (markup cleaning
   included), the cached re-load, and the loop with transformers' pure-Python
   ``BertTokenizerLegacy`` (the tokenizer the DistilBERT scripts used).

3. **Inference**: BertModel 12 x 768 (teacher) against 4- and 6-layer students
   (layers 1,5,8,12 and 2,4,6,8,10,12), eval, no_grad, seq 128, batch 32 (8 in
   quick mode) and 1, same threads.

4. **The levers of issue 24** (sections ``teacher12``, ``baseline``, ``compile``; :mod:`bench.levers`): the
   teacher levers one by one on a 12-layer teacher, the demo recipe's step in this engine against an older
   commit's (``--baseline REV``, each engine in a worker process of its own), glibc's allocator tuned, and
   torch.compile on and off.

The last lines printed are the ratios, ``name: value``, one per line.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.levers import (BEFORE_ISSUE_24, BenchError, bench_baseline, bench_compile, bench_teacher12,
                          render_levers, resolve_commit)
from bench.common import (
    ROOT,
    SEQ,
    SHAPE,
    Clock,
    command_line,
    add_utilisation,
    interleaved,
    log,
    machine,
    make_batch,
    paired_ratio,
    set_threads,
    summary,
    teacher_config,
    UTILISATION_HEADERS,
    counted,
    fmt_table,
    utilisation_cells,
    utilisation_note,
    vm_kb,
    write_json,
    write_text,
)

WEIGHTS = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
TEMPERATURE = 2.0
STUDENT_LAYERS = [1, 5, 8, 12]
STUDENT6_LAYERS = [2, 4, 6, 8, 10, 12]
RATIO_NAMES = ("distill_step_vs_plain_masked", "distill_step_vs_plain_full", "distill_step_over_floor",
               "prep_vs_loop", "prep_vs_loop_parallelism_unset", "prep_vs_loop_parallelism_false",
               "student4_vs_teacher_inference", "demo_step_auto_vs_fp32", "demo_step_bf16_vs_fp32",
               "demo_step_vs_baseline", "demo_step_engine_vs_baseline", "demo_step_malloc_tuned_vs_default",
               "teacher12_step_vs_autocast_eager",
               "teacher12_cast_vs_autocast", "teacher12_eager_mapped_vs_all_eager", "teacher_depth_cut_vs_whole",
               "demo_step_compiled_vs_eager", "demo_teacher_compiled_vs_eager",
               "task_prediction_length_groups_vs_one_forward", "task_intermediate_length_groups_vs_one_forward")
TARGETS = {"distill_step_vs_plain_masked": (">=", 1.3), "distill_step_vs_plain_full": (">=", 1.0),
           "distill_step_over_floor": ("<=", 1.15), "prep_vs_loop": (">=", 10.0),
           "student4_vs_teacher_inference": (">=", 2.8), "demo_step_vs_baseline": (">=", 1.3),
           "teacher12_step_vs_autocast_eager": (">=", 1.5)}

# Quick: the named ratios only, lean enough for < 5 min on 2 shared cores. Full: everything.
QUICK = dict(batch=4, repeats=3, warmup=0, precisions_cpu=("fp32",), extra_floors=False, breakdown_repeats=0,
             demo_repeats=3,
             prep_repeats=2, prep_cached=False, prep_scale=1, dump_repeats=0, legacy_paragraphs=300,
             infer_batch=8, infer_repeats=3, infer_repeats_batch1=5)
FULL = dict(batch=8, repeats=5, warmup=0, precisions_cpu=("fp32", "bf16"), extra_floors=True, breakdown_repeats=2,
            demo_repeats=9,  # the demo's step on glibc's default allocator varies 2x from round to round
            prep_repeats=4, prep_cached=True, prep_scale=4, dump_repeats=1, legacy_paragraphs=1000,
            infer_batch=32, infer_repeats=4, infer_repeats_batch1=12)
CUDA_PRECISIONS = ("fp32", "bf16", "fp16 O1", "fp16 O2")


# --------------------------------------------------------------------------------------- 1. distillation step


# --smoke shrinks bench.common's SHAPE (BERT-base) to this width, in place (not the layer count: students take
# layers 1,5,8,12), to check every code path, fp16 O1/O2 included (allowed on a CPU for that), in seconds.
SMOKE = {"shape": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64), "allow_cpu_fp16": False}


def plain_loss(student, teacher, batch: dict, restrict_ce_to_mask: bool):
    """The DistilBERT research code's step (distiller.py), written inline: full logits everywhere."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return plain_objective(s_out.logits, t_out.logits, s_out.hidden_states[-1], t_out.hidden_states[-1], batch,
                           restrict_ce_to_mask)


def plain_objective(s_logits, t_logits, s_h, t_h, batch: dict, restrict_ce_to_mask: bool):
    """DistilBERT's loss as its code wrote it: masked_select, KLDivLoss(batchmean), CrossEntropyLoss,
    CosineEmbeddingLoss, on ``[B, S, V]`` logits and ``[B, S, H]`` last hidden states."""
    mask, labels = batch["attention_mask"], batch["mlm_labels"]
    vocab = s_logits.size(-1)
    sel = (labels > -1) if restrict_ce_to_mask else mask.bool()
    sel = sel.unsqueeze(-1).expand_as(s_logits)
    s_sel = torch.masked_select(s_logits, sel).view(-1, vocab)
    t_sel = torch.masked_select(t_logits, sel).view(-1, vocab)
    loss_ce = F.kl_div(F.log_softmax(s_sel / TEMPERATURE, dim=-1), F.softmax(t_sel / TEMPERATURE, dim=-1),
                       reduction="batchmean") * TEMPERATURE ** 2
    loss_mlm = F.cross_entropy(s_logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    dim = s_h.size(-1)
    hmask = mask.bool().unsqueeze(-1).expand_as(s_h)
    s_h = torch.masked_select(s_h, hmask).view(-1, dim)
    t_h = torch.masked_select(t_h, hmask).view(-1, dim)
    loss_cos = F.cosine_embedding_loss(s_h, t_h, s_h.new_ones(s_h.size(0)), reduction="mean")
    return WEIGHTS["ce"] * loss_ce + WEIGHTS["mlm"] * loss_mlm + WEIGHTS["cos"] * loss_cos


def floor_loss(student, teacher, objective, batch: dict):
    """The engine's forward work with a trivial loss in place of the objective."""
    from distill.models.loading import extract
    from distill.models.vocab_head import DeferredLogits

    def logits(features):  # a deferred (chunked) head runs here: the floor keeps the heads' matmuls
        z = features.logits
        return z.materialize() if isinstance(z, DeferredLogits) else z

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits(extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher")))
    s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
    return logits(s).float().mean() + s.hidden_states[-1].float().mean()


def student_only_loss(student, batch: dict):
    out = student.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state.float().mean()


def parse_precision(name: str) -> tuple[str, str]:
    return ("fp16", name.split()[1]) if name.startswith("fp16") else (name, "O2")


def bench_distill(cfg: dict, device: torch.device, precisions, clock: Clock) -> dict:
    from transformers import BertForMaskedLM

    from distill.models.student import build_student
    from distill.objective.plan import Objective
    from distill.train.precision import Precision
    from distill.train.step import StudentStep

    torch.manual_seed(0)
    teacher = BertForMaskedLM(teacher_config()).to(device).eval()
    teacher.requires_grad_(False)
    student0, _ = build_student(teacher, STUDENT_LAYERS)
    objectives = {
        v: Objective.from_config(WEIGHTS, TEMPERATURE, student_config=student0, teacher_config=teacher,
                                 student_layers=STUDENT_LAYERS, restrict_ce_to_mask=(v == "masked")).to(device)
        for v in ("masked", "full")
    }
    batch = {k: v.to(device) for k, v in make_batch(cfg["batch"], teacher.config.vocab_size).items()}
    tokens = int(batch["attention_mask"].sum())
    results = {"batch": cfg["batch"], "seq": SEQ, "tokens_per_step": tokens,
               "masked_positions": int((batch["mlm_labels"] != -100).sum()), "precisions": {}}
    for name in precisions:
        prec_name, level = parse_precision(name)
        log(f"distillation step, {name}, batch {cfg['batch']} x {SEQ}")
        prec = Precision.from_config(prec_name, level, device=device, allow_cpu_fp16=SMOKE["allow_cpu_fp16"])
        if prec.mode != name:
            log(f"  skipped: {name} runs as {prec.mode} on {device.type}")
            continue
        student = copy.deepcopy(student0).to(device).train()
        student = prec.prepare(student)
        optimizer = prec.make_optimizer([p for p in student.parameters() if p.requires_grad], torch.optim.AdamW,
                                        lr=1e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
        engines = {v: StudentStep(student, objectives[v], teacher) for v in objectives}

        def run(loss_fn):
            def step():
                t0 = clock.now()
                with prec.autocast():
                    loss = loss_fn()
                t1 = clock.now()
                prec.backward(loss)
                t2 = clock.now()
                prec.step(optimizer, 5.0)
                t3 = clock.now()
                return {"forward_loss": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}
            return step

        variants = {
            "plain_masked": run(lambda: plain_loss(student, teacher, batch, True)),
            "engine_masked": run(lambda: engines["masked"](batch)[0]),
            "floor_masked": run(lambda: floor_loss(student, teacher, objectives["masked"], batch)),
            "plain_full": run(lambda: plain_loss(student, teacher, batch, False)),
            "engine_full": run(lambda: engines["full"](batch)[0]),
        }
        if cfg["extra_floors"] and name == precisions[0]:  # the other precisions: the compared variants only
            variants["floor_full"] = run(lambda: floor_loss(student, teacher, objectives["full"], batch))
            variants["floor_student"] = run(lambda: student_only_loss(student, batch))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = interleaved(variants, cfg["repeats"], cfg["warmup"], clock)
        entry = {"description": prec.description, "variants": {n: summary(t, tokens) for n, t in times.items()}}
        if device.type == "cuda":  # before the FLOP count and the matmul rate allocate their own
            entry["peak_gpu_memory_gb_all_variants"] = torch.cuda.max_memory_allocated(device) / 2**30
        add_utilisation(entry, variants, {n: prec.autocast_dtype or torch.float32 for n in variants}, device,
                        cfg.get("matmul_n"))
        pairs = {"plain_over_engine_masked": ("plain_masked", "engine_masked"),
                 "plain_over_engine_full": ("plain_full", "engine_full"),
                 "engine_over_floor_masked": ("engine_masked", "floor_masked"),
                 "engine_over_floor_full": ("engine_full", "floor_full"),
                 "engine_masked_over_floor_student": ("engine_masked", "floor_student"),
                 "engine_full_over_engine_masked": ("engine_full", "engine_masked")}
        entry["ratio_details"] = {k: paired_ratio(times, a, b) for k, (a, b) in pairs.items()
                                  if a in times and b in times}
        entry["ratios"] = {k: v["value"] for k, v in entry["ratio_details"].items()}
        results["precisions"][name] = entry
    return results


DEMO_PRECISIONS = ("auto", "fp32", "bf16")


def bench_demo(cfg: dict, device: torch.device, clock: Clock) -> dict:
    """The demo recipe's own step (``distill-train`` with no arguments: the real all-MiniLM-L6-v2 teacher, a
    3-layer student from its layers 2,4,6, cos + hid_mse + att_mse, batch 16 x 128) at precision auto
    against fp32 and bf16 on this machine. ``auto`` is what a user gets; it runs as one of the other two."""
    from distill.common.assets import minilm_dir
    from distill.models.loading import load_model, set_attention_dropout
    from distill.models.student import build_student
    from distill.objective.plan import Objective
    from distill.settings.config import DEMO_RECIPE
    from distill.train.precision import Precision
    from distill.train.step import StudentStep

    torch.manual_seed(0)
    teacher = load_model(minilm_dir(), eager=True).to(device).eval()
    teacher.requires_grad_(False)
    layers, batch_size = DEMO_RECIPE["student_layers"], cfg.get("demo_batch", DEMO_RECIPE["per_device_batch_size"])
    student0, _ = build_student(teacher, layers)
    set_attention_dropout(student0, 0.0)
    objective = Objective.from_config(DEMO_RECIPE["weights"], student_config=student0.config,
                                      teacher_config=teacher.config, student_layers=layers).to(device)
    batch = {k: v.to(device) for k, v in make_batch(batch_size, teacher.config.vocab_size).items()}
    tokens = int(batch["attention_mask"].sum())
    variants, descriptions, dtypes = {}, {}, {}
    for name in DEMO_PRECISIONS:
        prec = Precision.from_config(name, device=device)
        descriptions[name] = prec.auto_reason or prec.description
        dtypes[name] = prec.autocast_dtype or torch.float32
        if prec.auto_reason:
            log(f"demo step: {prec.auto_reason}")
        student = copy.deepcopy(student0).to(device).train()
        student = prec.prepare(student)
        step_module = StudentStep(student, objective, teacher)
        optimizer = prec.make_optimizer([p for p in student.parameters() if p.requires_grad], torch.optim.AdamW,
                                        lr=DEMO_RECIPE["learning_rate"], fused=device.type in ("cpu", "cuda"))

        def step(prec=prec, step_module=step_module, optimizer=optimizer):
            with prec.autocast():
                loss, _ = step_module(batch)
            prec.backward(loss)
            prec.step(optimizer, 5.0)

        variants[name] = step
    log(f"demo recipe step, batch {batch_size} x {SEQ}: {', '.join(DEMO_PRECISIONS)}")
    times = interleaved(variants, cfg["demo_repeats"], 1, clock)
    details = {f"fp32_over_{n}": paired_ratio(times, "fp32", n) for n in DEMO_PRECISIONS if n != "fp32"}
    out = {"batch": batch_size, "seq": SEQ, "student_layers": layers, "weights": DEMO_RECIPE["weights"],
           "auto_resolves_to": Precision.from_config("auto", device=device).mode, "descriptions": descriptions,
           "variants": {n: summary(t, tokens) for n, t in times.items()}, "ratio_details": details,
           "ratios": {k: v["value"] for k, v in details.items()}}
    add_utilisation(out, variants, dtypes, device, cfg.get("matmul_n"))
    return out


def _setup(cfg: dict, device: torch.device, precision: str):
    from transformers import BertForMaskedLM

    from distill.models.student import build_student
    from distill.objective.plan import Objective
    from distill.train.precision import Precision

    torch.manual_seed(0)
    teacher = BertForMaskedLM(teacher_config()).to(device).eval()
    teacher.requires_grad_(False)
    student, _ = build_student(teacher, STUDENT_LAYERS)
    student.to(device).train()
    objectives = {v: Objective.from_config(WEIGHTS, TEMPERATURE, student_config=student, teacher_config=teacher,
                                           student_layers=STUDENT_LAYERS, restrict_ce_to_mask=(v == "masked"))
                  for v in ("masked", "full")}
    batch = {k: v.to(device) for k, v in make_batch(cfg["batch"], teacher.config.vocab_size).items()}
    prec_name, level = parse_precision(precision)
    prec = Precision.from_config(prec_name, level, device=device, allow_cpu_fp16=SMOKE["allow_cpu_fp16"])
    student = prec.prepare(student)
    optimizer = prec.make_optimizer(list(student.parameters()), torch.optim.AdamW, lr=1e-6)
    return teacher, student, objectives, batch, prec, optimizer


PIECES = ("teacher encoder", "teacher head", "student encoder fwd", "student head fwd", "loss fwd",
          "loss+head bwd", "student encoder bwd", "optimizer")


def breakdown(cfg: dict, device: torch.device, precision: str, repeats: int, clock: Clock) -> dict:
    """Where a step's time goes: the step cut into pieces, each timed on its own (median of runs).

    Same work as ``extract`` + objective (engine) or the plain step, split at the final hidden
    state: the head and loss run on a detached copy, so their backward is timed apart from the
    encoder's. Kinds: engine_masked, engine_full, plain_full.
    """
    from distill.models.loading import Features

    teacher, student, objectives, batch, prec, optimizer = _setup(cfg, device, precision)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def piecewise(kind: str) -> dict:
        t = {}
        mark = clock.now()

        def tick(name):
            nonlocal mark
            now = clock.now()
            t[name] = now - mark
            mark = now

        objective = objectives["masked" if kind == "engine_masked" else "full"]
        plain = kind.startswith("plain")
        with prec.autocast():
            pos_t = None if plain else objective.positions(batch, "teacher")
            pos_s = None if plain else objective.positions(batch, "student")
            with torch.no_grad():
                t_out = teacher.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                tick("teacher encoder")
                t_h = t_out.last_hidden_state
                t_logits = teacher.cls(t_h if plain else t_h[pos_t])
                tick("teacher head")
            s_out = student.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            tick("student encoder fwd")
            h = s_out.last_hidden_state
            h_det = h.detach().requires_grad_()
            s_logits = student.cls(h_det if plain else h_det[pos_s])
            tick("student head fwd")
            if plain:
                loss = plain_objective(s_logits, t_logits, h_det, t_h, batch, False)
            else:
                loss, _ = objective(Features(hidden_states=(*s_out.hidden_states[:-1], h_det), logits=s_logits),
                                    Features(hidden_states=t_out.hidden_states, logits=t_logits), batch)
            tick("loss fwd")
        prec.backward(loss)
        tick("loss+head bwd")
        h.backward(h_det.grad)
        tick("student encoder bwd")
        prec.step(optimizer, 5.0)
        tick("optimizer")
        return t

    kinds = ("engine_masked", "engine_full", "plain_full")
    for kind in kinds:  # warm-up
        piecewise(kind)
    runs = {k: [] for k in kinds}
    for r in range(repeats):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            runs[kind].append(piecewise(kind))
    out = {}
    for kind, items in runs.items():
        med = {p: statistics.median(x[p] for x in items) for p in PIECES}
        total = sum(med.values())
        out[kind] = {"pieces_median_s": med, "sum_s": total,
                     "share": {p: v / total for p, v in med.items()}}
    return out


def profile_engine(cfg: dict, device: torch.device, precision: str = "fp32", variant: str = "masked",
                   top: int = 15) -> str:
    """torch.profiler table (top ops by self time) of one engine step, after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    from distill.train.step import StudentStep

    teacher, student, objectives, batch, prec, optimizer = _setup(cfg, device, precision)
    step_module = StudentStep(student, objectives[variant], teacher)

    def step():
        with prec.autocast():
            loss, _ = step_module(batch)
        prec.backward(loss)
        prec.step(optimizer, 5.0)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top,
                                                               max_name_column_width=32, max_shapes_column_width=60)


# --------------------------------------------------------------------------------------- 2. data preparation


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def prep_worker(kind: str, text_file: str, cache_dir: str, max_lines: int | None) -> dict:
    """One data-preparation run in this (fresh) process; returns tokens, seconds and peak memory.

    Every kind imports the same libraries before the clock starts, so neither pays for imports.
    """
    import datasets  # noqa: F401  (imported lazily by distill.data.corpus: not part of the work)
    import pyarrow  # noqa: F401
    from transformers import AutoTokenizer

    from distill.common.assets import minilm_dir, wiki_extract_path
    from distill.data.corpus import load_corpus_blocks

    if kind == "legacy":
        from transformers.models.bert.tokenization_bert_legacy import (
            BertTokenizerLegacy,
        )

        tokenizer = BertTokenizerLegacy.from_pretrained(minilm_dir())
    else:
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.model_max_length = 10**9  # no "longer than 512" warning: whole paragraphs are tokenised
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if kind == "cached":  # build the cache first, untimed, then time the re-load
        load_corpus_blocks(text_file, tokenizer, SEQ, cache_dir)
    import gc

    gc.collect()
    base_rss = vm_kb("VmRSS")
    resettable = _reset_peak()
    t0 = time.perf_counter()
    if kind in ("pipeline", "cached"):
        blocks = load_corpus_blocks(text_file, tokenizer, SEQ, cache_dir)
        num_blocks = len(blocks)
        meta = json.loads(next(Path(cache_dir).glob("tokens-*/meta.json")).read_text())
        tokens = meta["num_tokens"]
    elif kind == "dump":
        blocks = load_corpus_blocks(wiki_extract_path(), tokenizer, SEQ, cache_dir)
        num_blocks = len(blocks)
        meta = json.loads(next(Path(cache_dir).glob("tokens-*/meta.json")).read_text())
        tokens = meta["num_tokens"]
    else:  # "loop" / "legacy": the DistilBERT scripts' way, then the same packing as the pipeline
        ids = []
        with open(text_file, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if max_lines is not None and n >= max_lines:
                    break
                text = line.strip()
                if text:
                    ids.append(tokenizer.encode(text, add_special_tokens=False))
        tokens = sum(len(x) for x in ids)
        # each paragraph followed by [SEP], as the pipeline packs
        flat = np.fromiter((t for seq in ids for t in (*seq, sep_id)), dtype=np.int32, count=tokens + len(ids))
        inner = SEQ - 2
        n = len(flat) // inner
        out = np.empty((n, SEQ), dtype=np.int32)
        out[:, 0], out[:, -1] = cls_id, sep_id
        out[:, 1:-1] = flat[: n * inner].reshape(n, inner)
        np.save(os.path.join(cache_dir, "blocks.npy"), out)
        num_blocks = n
    seconds = time.perf_counter() - t0
    peak = vm_kb("VmHWM")
    return {"kind": kind, "seconds": seconds, "tokens": int(tokens), "blocks": int(num_blocks),
            "tokens_per_s": tokens / seconds, "base_rss_mb": base_rss / 1024,
            "peak_above_base_mb": (peak - base_rss) / 1024 if resettable else None}


# TOKENIZERS_PARALLELISM in a prep worker: None leaves it unset (the tokenizer's own threads on), "false" is
# what many users set to silence the fork warning (and the test suite sets); "inherit" keeps the caller's.
PARALLELISM_SETTINGS = {"": None, "_tokenizers_parallelism_false": "false"}


def _run_worker(kind: str, text_file: str, max_lines: int | None = None, parallelism: str | None = "inherit") -> dict:
    cache = tempfile.mkdtemp(prefix=f"speed-{kind}-")
    env = dict(os.environ)
    if parallelism != "inherit":
        env.pop("TOKENIZERS_PARALLELISM", None)
        if parallelism is not None:
            env["TOKENIZERS_PARALLELISM"] = parallelism
    try:
        cmd = [sys.executable, "-m", "bench.speed", "--prep-worker", kind, "--text-file", text_file,
               "--cache-dir", cache]
        if max_lines is not None:
            cmd += ["--max-lines", str(max_lines)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"prep worker {kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def bench_prep(cfg: dict) -> dict:
    from distill.common.assets import wiki_extract_path
    from distill.data.corpus import iter_paragraphs

    log("data preparation: extracting the Wikipedia paragraphs")
    work = tempfile.mkdtemp(prefix="speed-prep-")
    try:
        t0 = time.perf_counter()
        paragraphs = list(iter_paragraphs([wiki_extract_path()]))
        clean_s = time.perf_counter() - t0
        text_file = os.path.join(work, "wiki_paragraphs.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            for p in paragraphs:
                f.write(p + "\n")
        # pipeline and loop, each with TOKENIZERS_PARALLELISM unset ("pipeline", "loop") and =false
        order = [(kind + suffix, kind, setting) for suffix, setting in PARALLELISM_SETTINGS.items()
                 for kind in ("pipeline", "loop")]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in order}
        for r in range(cfg["prep_repeats"]):
            for name, kind, setting in (order if r % 2 == 0 else order[::-1]):
                runs[name].append(_run_worker(kind, text_file, parallelism=setting))
            log(f"  round {r + 1}/{cfg['prep_repeats']}: " + ", ".join(
                f"{k} {v[-1]['seconds']:.2f}s" for k, v in runs.items()))
        extra = {"legacy": _run_worker("legacy", text_file, cfg["legacy_paragraphs"])}
        if cfg["prep_cached"]:
            extra["cached"] = _run_worker("cached", text_file)
        log("  " + ", ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s" for k, v in extra.items()))
        dump = [_run_worker("dump", text_file) for _ in range(cfg["dump_repeats"])]
        scaled = {}
        if cfg["prep_scale"] > 1:  # memory as the corpus grows: the same paragraphs k times over
            big_file = os.path.join(work, f"wiki_paragraphs_x{cfg['prep_scale']}.txt")
            with open(big_file, "w", encoding="utf-8") as f:
                for _ in range(cfg["prep_scale"]):
                    for p in paragraphs:
                        f.write(p + "\n")
            scaled = {f"{kind}_x{cfg['prep_scale']}": _run_worker(kind, big_file) for kind in ("pipeline", "loop")}
            log("  " + ", ".join(f"{k} {v['seconds']:.2f}s, peak +{v['peak_above_base_mb'] or 0:.0f} MB"
                                 for k, v in scaled.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def agg(items: list[dict]) -> dict:
        out = summary([x["seconds"] for x in items], items[0]["tokens"])
        peaks = [x["peak_above_base_mb"] for x in items if x["peak_above_base_mb"] is not None]
        out["peak_above_base_mb"] = statistics.median(peaks) if peaks else None
        out["base_rss_mb"] = statistics.median(x["base_rss_mb"] for x in items)
        out["blocks"] = items[0]["blocks"]
        return out

    result = {"paragraphs": len(paragraphs), "characters": sum(len(p) for p in paragraphs),
              "mediawiki_cleaning_s": clean_s, "variants": {k: agg(v) for k, v in runs.items()}}
    for kind, item in {**extra, **scaled}.items():
        result["variants"][kind] = agg([item])
    if dump:
        result["variants"]["dump"] = agg(dump)
    v = result["variants"]
    result["ratios"], result["ratio_details"] = {}, {}
    for suffix in PARALLELISM_SETTINGS:
        pipe, loop = "pipeline" + suffix, "loop" + suffix
        per_round = [p["tokens_per_s"] / q["tokens_per_s"] for p, q in zip(runs[pipe], runs[loop])]
        name = "pipeline_over_loop_tokens_per_s" + suffix
        result["ratios"][name] = statistics.median(per_round)
        result["ratio_details"][name] = {
            "value": statistics.median(per_round), "per_round": [round(x, 3) for x in per_round],
            "ratio_of_medians": v[pipe]["tokens_per_s"] / v[loop]["tokens_per_s"]}
    result["ratios"]["pipeline_over_legacy_loop_tokens_per_s"] = (
        v["pipeline"]["tokens_per_s"] / v["legacy"]["tokens_per_s"])
    if "cached" in v:
        result["ratios"]["cached_reload_over_loop_tokens_per_s"] = (
            v["cached"]["tokens_per_s"] / v["loop"]["tokens_per_s"])
    if "dump" in v:
        result["ratios"]["dump_pipeline_over_loop_tokens_per_s"] = v["dump"]["tokens_per_s"] / v["loop"]["tokens_per_s"]
    return result


# --------------------------------------------------------------------------------------- 3. inference


def bench_inference(cfg: dict, device: torch.device, clock: Clock) -> dict:
    from transformers import BertModel

    from distill.models.student import build_student

    torch.manual_seed(0)
    config = teacher_config()
    config.architectures = ["BertModel"]
    teacher = BertModel(config).to(device).eval()
    models = {"teacher12": teacher,
              "student4": build_student(teacher, STUDENT_LAYERS)[0].to(device).eval(),
              "student6": build_student(teacher, STUDENT6_LAYERS)[0].to(device).eval()}
    out = {"seq": SEQ, "batches": {}}
    for batch in (cfg["infer_batch"], 1):
        log(f"inference, batch {batch} x {SEQ}")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(999, 30522, (batch, SEQ), generator=g).to(device)
        mask = torch.ones_like(ids)

        def fwd(model):
            def run():
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
            return run

        repeats = cfg["infer_repeats"] if batch > 1 else cfg["infer_repeats_batch1"]
        times = interleaved({n: fwd(m) for n, m in models.items()}, repeats, cfg["warmup"], clock)
        details = {"student4_speedup": paired_ratio(times, "teacher12", "student4"),
                   "student6_speedup": paired_ratio(times, "teacher12", "student6")}
        out["batches"][str(batch)] = {
            "variants": {n: summary(t, batch * SEQ) for n, t in times.items()},
            "ratio_details": details, "ratios": {k: v["value"] for k, v in details.items()},
        }
    out["throughput_batch"] = cfg["infer_batch"]
    return out


# --------------------------------------------------------------------------------------- task-stage teacher cache


def task_stage_models(device: torch.device):
    """The task stage's random teacher (12 layers of ``SHAPE``) and 4-layer student, sequence classifiers, eager."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, num_hidden_layers=12, num_labels=2, **SHAPE)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(config).to(device).eval()
    small = BertConfig(vocab_size=30522, num_hidden_layers=4, num_labels=2, **SHAPE)
    small._attn_implementation = "eager"
    return teacher, BertForSequenceClassification(small).to(device)


def task_stage_collate(items: list[dict]) -> dict:
    """Rows padded to the longest, as glue-eval's collator does, with the teacher cache's row keys."""
    width = max(len(x["input_ids"]) for x in items)
    pad = lambda key: torch.tensor([x[key] + [0] * (width - len(x[key])) for x in items])  # noqa: E731
    out = {"input_ids": pad("input_ids"), "attention_mask": pad("attention_mask")}
    out.update({k: torch.tensor([x[k] for x in items]) for k in ("row", "labelled", "label") if k in items[0]})
    if "label" in out:
        out["labels"] = out.pop("label")
    return out


def task_stage_data(n: int, batch: int, device: torch.device):
    """``(dataset, its batches on device, lengths)``: ``n`` labelled examples of 32..128 random tokens (uniform,
    as bench.peers' task batch; GLUE's sentences are mostly shorter)."""
    import datasets

    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(32, SEQ + 1, (n,), generator=g).tolist()
    rows = {"input_ids": [[101] + torch.randint(999, 30522, (k - 2,), generator=g).tolist() + [102] for k in lengths]}
    rows.update(attention_mask=[[1] * k for k in lengths], label=[i % 2 for i in range(n)], row=list(range(n)),
                labelled=[1] * n)
    data = datasets.Dataset.from_dict(rows)
    batches = [task_stage_collate([data[i] for i in range(s, min(s + batch, n))]) for s in range(0, n, batch)]
    return data, [{k: v.to(device) for k, v in b.items()} for b in batches], lengths


TASK_GROUPS = 4  # --length_groups in the task stage's grouped variants


def bench_task_stage(cfg: dict, device: torch.device, clock: Clock) -> dict:
    """One KD epoch of ``glue-eval --teacher`` (``DistillationTrainer.distillation_loss``, backward, AdamW step per
    batch) with the teacher's outputs cached against a teacher forward per batch (``--no_teacher_cache``), each
    also with ``--length_groups 4`` (the batch run as up to 4 groups of similar length).

    Teacher: BertForSequenceClassification of ``SHAPE``, 12 layers, random; student: 4 layers of the same width.
    Examples of 32..128 tokens (padded per batch). Two objectives: the prediction stage ``kl + hard_ce`` (logits
    cached) and the intermediate stage ``hid_mse + att_mse`` over teacher layers 3,6,9,12 (representations
    cached). The cache's one-off build (one teacher pass) is reported beside the epoch times.
    Run it with ``python -m bench.speed --task-stage`` (or ``--only task_stage``).
    """
    from glue_eval.arguments import GlueTrainingArguments

    n, batch = (32, 8) if cfg["batch"] <= 4 else (64, 16)
    teacher, student = task_stage_models(device)
    data, batches, lengths = task_stage_data(n, batch, device)
    out = {"examples": n, "batch": batch, "tokens": sum(lengths), "length_groups": TASK_GROUPS,
           "padded_positions": sum(b["attention_mask"].numel() for b in batches), "objectives": {}}
    tmp = tempfile.mkdtemp(prefix="bench-taskstage-")
    try:
        args = {g: GlueTrainingArguments(output_dir=tmp, use_cpu=device.type == "cpu", report_to=[],
                                         length_groups=g) for g in (1, TASK_GROUPS)}
        for kind, weights in (("prediction", {"kl": 1.0, "hard_ce": 1.0}),
                              ("intermediate", {"hid_mse": 1.0, "att_mse": 1.0})):
            log(f"task stage, {kind} terms: {n} examples, batch {batch}")
            out["objectives"][kind] = task_stage_epochs(weights, (teacher, student), (data, batches, lengths), args,
                                                       cfg, device, clock)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def task_stage_epochs(weights: dict, models, data, args: dict, cfg: dict, device: torch.device, clock: Clock) -> dict:
    """The four epoch variants of one objective (cached or not, one forward or length groups), interleaved."""
    from glue_eval.distillation import stage_objectives
    from glue_eval.teacher_cache import TeacherCache, plan_for
    from glue_eval.trainer import DistillationTrainer

    from glue_eval.arguments import GlueArguments

    (teacher, student), (dataset, batches, lengths) = models, data
    from distill.models.frozen import prepare_teacher

    soft, hard = stage_objectives(weights, GlueArguments(temperature=1.0, student_layers="3,6,9,12"), student, teacher)
    prepare_teacher(teacher, soft.requests()["teacher"].attention_layers)  # as the trainers will (an earlier
    t0 = clock.now()                                                        # objective's left it sdpa)
    size = len(batches[0]["input_ids"])
    cache = TeacherCache.build(teacher, dataset, task_stage_collate, plan_for([soft]), batch_size=size, device=device)
    build_s = clock.now() - t0
    trainers = {f"{name}{'' if g == 1 else '_groups'}": DistillationTrainer(
        model=student, args=args[g], teacher=teacher, soft=soft, hard=hard, teacher_cache=c,
        data_collator=task_stage_collate) for name, c in (("cached", cache), ("teacher_forward", None)) for g in args}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def epoch(trainer):
        def run():
            for b in batches:
                loss = trainer.distillation_loss(student, dict(b))[0]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    student.train()
    times = interleaved({k: epoch(t) for k, t in trainers.items()}, cfg["repeats"], cfg["warmup"], clock)
    speedup = paired_ratio(times, "teacher_forward", "cached")
    groups = {k: paired_ratio(times, k, f"{k}_groups") for k in ("teacher_forward", "cached")}
    log(f"  cached epoch {speedup['value']:.2f}x faster; length groups {groups['teacher_forward']['value']:.2f}x "
        f"(teacher forward), {groups['cached']['value']:.2f}x (cached); cache built in {build_s:.2f}s")
    return {"weights": weights, "cache_build_s": build_s, "representations_cached": cache.has_representations,
            "variants": {k: summary(t, sum(lengths)) for k, t in times.items()},
            "epoch_speedup": speedup, "length_groups_speedup": groups}


# --------------------------------------------------------------------------------------- report


def render(report: dict) -> str:
    parts = []
    d = report.get("distill")
    if d:
        parts.append(f"### Distillation step (batch {d['batch']} x {d['seq']}, {d['masked_positions']} masked "
                     f"positions; median of {report['config']['repeats']})\n")
        rows, shown = [], counted(v for e in d["precisions"].values() for v in e["variants"].values())
        for prec, entry in d["precisions"].items():
            base = entry["variants"]["engine_masked"]["median_s"]
            for name, v in entry["variants"].items():
                ph = v.get("phases_median_s", {})
                rows.append([prec, name, f"{v['median_s']:.3f}", f"{v['tokens_per_s']:,.0f}",
                             f"{v['median_s'] / base:.2f}",
                             " / ".join(f"{ph[k]:.2f}" for k in ("forward_loss", "backward", "optimizer") if k in ph),
                             f"{v['cpu_median_s']:.2f}", *utilisation_cells(v, shown)])
        parts.append(fmt_table(["precision", "variant", "step s (median)", "tokens/s", "time / engine_masked",
                                "forward+loss / backward / optimizer s", "CPU s",
                                *(UTILISATION_HEADERS if shown else [])], rows))
        parts += utilisation_note([e.get("matmul_rates", {}) for e in d["precisions"].values()])
        keys = list(dict.fromkeys(k for e in d["precisions"].values() for k in e["ratios"]))
        rows = [[prec, *(f"{e['ratios'][k]:.2f}" if k in e["ratios"] else "-" for k in keys)]
                for prec, e in d["precisions"].items()]
        parts.append("\n" + fmt_table(["precision", *keys], rows))
    b = report.get("breakdown")
    if b:
        parts.append(f"\n### Where a step's time goes ({b['precision']}, batch {b['batch']} x {SEQ}; "
                     "pieces timed apart, median s and share)\n")
        kinds = list(b["kinds"])
        rows = [[piece, *(f"{b['kinds'][k]['pieces_median_s'][piece]:.3f} ({b['kinds'][k]['share'][piece]:.0%})"
                          for k in kinds)] for piece in PIECES]
        rows.append(["sum", *(f"{b['kinds'][k]['sum_s']:.3f}" for k in kinds)])
        parts.append(fmt_table(["piece", *kinds], rows))
    m = report.get("demo")
    if m:
        parts.append(f"\n### The demo recipe's step (batch {m['batch']} x {m['seq']}, real MiniLM teacher, student "
                     f"layers {','.join(map(str, m['student_layers']))}; auto runs as {m['auto_resolves_to']} here)\n")
        shown = counted(m["variants"].values())
        rows = [[name, f"{v['median_s']:.3f}", f"{v['tokens_per_s']:,.0f}",
                 f"{m['ratios'].get(f'fp32_over_{name}', 1.0):.2f}", *utilisation_cells(v, shown),
                 m["descriptions"][name]] for name, v in m["variants"].items()]
        parts.append(fmt_table(["precision", "step s (median)", "tokens/s", "speed-up over fp32",
                                *(UTILISATION_HEADERS if shown else []), "what ran"], rows))
        parts += utilisation_note([m.get("matmul_rates", {})])
    p = report.get("prep")
    if p:
        parts.append(f"\n### Data preparation ({p['paragraphs']:,} Wikipedia paragraphs, "
                     f"{p['variants']['pipeline']['tokens']:,} tokens; MediaWiki cleaning alone "
                     f"{p['mediawiki_cleaning_s']:.1f} s)\n")
        rows = []
        for name, v in p["variants"].items():
            peak = v["peak_above_base_mb"]
            rows.append([name, f"{v['median_s']:.3f}", f"{v['tokens_per_s']:,.0f}",
                         "n/a" if peak is None else f"{peak:.0f}", len(v["runs_s"])])
        parts.append(fmt_table(["variant", "seconds (median)", "tokens/s", "peak MB above base", "runs"], rows))
        parts.append("\n" + fmt_table(list(p["ratios"]), [[f"{x:.2f}" for x in p["ratios"].values()]]))
    i = report.get("inference")
    if i:
        parts.append(f"\n### Inference (BertModel, seq {i['seq']}, eval, no_grad)\n")
        rows = []
        for batch, entry in i["batches"].items():
            for name, v in entry["variants"].items():
                speedup = entry["ratios"].get(f"{name}_speedup", 1.0)
                rows.append([batch, name, f"{v['median_s'] * 1000:.1f}", f"{v['tokens_per_s']:,.0f}",
                             f"{speedup:.2f}"])
        parts.append(fmt_table(["batch", "model", "ms (median)", "tokens/s", "speed-up over teacher"], rows))
    parts.append(render_task_stage(report.get("task_stage")))
    parts.append(render_levers(report))
    return "\n".join(parts)


def render_task_stage(t: dict | None) -> str:
    """The task stage's epochs: teacher cached or run per batch, one forward or length groups."""
    if not t:
        return ""
    real = t["tokens"] / t.get("padded_positions", t["tokens"])
    out = [f"\n### Task stage (glue-eval --teacher): one epoch of {t['examples']} examples, batch {t['batch']}, "
           f"real tokens {real:.0%} of the padded positions; --length_groups {t.get('length_groups', '-')}\n"]
    rows = [[kind, name, f"{v['median_s']:.3f}", f"{v['tokens_per_s']:,.0f}"]
            for kind, o in t["objectives"].items() for name, v in o["variants"].items()]
    out.append(fmt_table(["terms", "variant", "epoch s (median)", "tokens/s"], rows))
    rows = [[kind, f"{o['epoch_speedup']['value']:.2f}",
             *(f"{o['length_groups_speedup'][k]['value']:.2f}" if "length_groups_speedup" in o else "-"
               for k in ("teacher_forward", "cached"))] for kind, o in t["objectives"].items()]
    out.append("\n" + fmt_table(["terms", "cache vs teacher forward", "length groups (teacher forward)",
                                 "length groups (cached)"], rows))
    return "\n".join(out)


def flag_value(command: str, flag: str, default: str) -> str:
    """The value ``command`` gives ``flag`` (``--flag V`` or ``--flag=V``), else ``default``."""
    import shlex

    words = shlex.split(command)
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return default


def page(report: dict) -> str:
    """The whole speed page from one report: how it was made, on what, the named ratios against their targets,
    then every section's tables (:func:`render`)."""
    m, cfg = report["machine"], report["config"]
    ratios = report.get("ratios") or named_ratios(report)
    head = ["# Speed report", "",
            f"Generated by `{report['command']}` on {report['date']} ({report['mode']} mode, "
            f"{report['seconds']:.0f} s); regenerate the page from its JSON with `python -m bench.speed --render "
            f"{flag_value(report['command'], '--out', 'docs/speed.json')} --markdown "
            f"{flag_value(report['command'], '--markdown', 'docs/speed.md')}`. Every ratio is the median over "
            "interleaved rounds of one run (A B, B A, ...) on one machine, so a before/after comes from the same load.",
            "",
            f"- Machine: {m['description']}; torch {m['torch']}, transformers {m['transformers']}",
            f"- Threads: {cfg['threads']} ({cfg['threads_choice']}); load average at start "
            f"{m.get('load_average_at_start', '?')}, at end {m.get('load_average_at_end', '?')} (1, 5, 15 min)",
            f"- Models: {report['teacher']} teacher, {report['student']}; objective {report['objective']}",
            *[f"- Rerun: sections {', '.join(r['sections'])} by `{r['command']}` on {r['date']} ({r['seconds']:.0f} s; "
              f"load average {r['load_average_at_start']} -> {r['load_average_at_end']}); their figures replace "
              "the first run's" for r in report.get("reruns", [])], "",
            "## Named ratios (> 1: ours faster, except distill_step_over_floor)", "", ""]
    rows = [[name, f"{ratios[name]:.2f}", " ".join(map(str, TARGETS.get(name, ()))) or "-",
             _met(ratios[name], TARGETS.get(name))] for name in RATIO_NAMES if name in ratios]
    return "\n".join(head) + fmt_table(["figure", "value", "target", "met"], rows) + "\n\n## Sections\n" + \
        render(report) + "\n"


def _met(value: float, target) -> str:
    if not target:
        return "-"
    op, bound = target
    return "yes" if (value >= bound if op == ">=" else value <= bound) else "no"


def named_ratios(report: dict) -> dict:
    out = {}
    d = report.get("distill")
    if d and d["precisions"]:
        prec = report["config"]["headline_precision"]
        entry = d["precisions"].get(prec) or next(iter(d["precisions"].values()))
        out["distill_step_vs_plain_masked"] = entry["ratios"]["plain_over_engine_masked"]
        out["distill_step_vs_plain_full"] = entry["ratios"]["plain_over_engine_full"]
        out["distill_step_over_floor"] = entry["ratios"]["engine_over_floor_masked"]
    if report.get("prep"):
        r = report["prep"]["ratios"]
        # "in any environment": the figure is the worse of TOKENIZERS_PARALLELISM unset and =false
        out["prep_vs_loop"] = min(r["pipeline_over_loop_tokens_per_s"],
                                  r["pipeline_over_loop_tokens_per_s_tokenizers_parallelism_false"])
        out["prep_vs_loop_parallelism_unset"] = r["pipeline_over_loop_tokens_per_s"]
        out["prep_vs_loop_parallelism_false"] = r["pipeline_over_loop_tokens_per_s_tokenizers_parallelism_false"]
    if report.get("demo"):
        out["demo_step_auto_vs_fp32"] = report["demo"]["ratios"]["fp32_over_auto"]
        out["demo_step_bf16_vs_fp32"] = report["demo"]["ratios"]["fp32_over_bf16"]
    for kind, o in (report.get("task_stage") or {}).get("objectives", {}).items():
        if "length_groups_speedup" in o:
            out[f"task_{kind}_length_groups_vs_one_forward"] = o["length_groups_speedup"]["teacher_forward"]["value"]
    if report.get("inference"):
        i = report["inference"]
        out["student4_vs_teacher_inference"] = i["batches"][str(i["throughput_batch"])]["ratios"]["student4_speedup"]
    return {**out, **lever_ratios(report)}


def lever_ratios(report: dict) -> dict:
    """The named figures of bench/levers.py's sections (each > 1: the lever makes the step faster)."""
    out = {}
    if report.get("baseline"):
        r = report["baseline"]["ratios"]
        if "baseline_over_shipped" in r:  # reports before it had the engines alone under this name
            out["demo_step_vs_baseline"] = r["baseline_over_shipped"]
        out["demo_step_engine_vs_baseline"] = r["baseline_over_current"]
        out["demo_step_malloc_tuned_vs_default"] = r["default_over_malloc_tuned"]
    if report.get("teacher12"):
        r = report["teacher12"]["ratios"]
        out["teacher12_step_vs_autocast_eager"] = r["autocast_eager_over_engine"]
        if "autocast_eager_over_cast" in r:  # fp32 machines cast nothing
            out["teacher12_cast_vs_autocast"] = r["autocast_eager_over_cast"]
        out["teacher12_eager_mapped_vs_all_eager"] = r["autocast_eager_over_eager_mapped"]
        out["teacher_depth_cut_vs_whole"] = r["depth_whole_over_cut"]
    if report.get("compile"):
        r = report["compile"]["ratios"]
        out["demo_step_compiled_vs_eager"] = r["step_eager_over_compiled"]
        out["demo_teacher_compiled_vs_eager"] = r["teacher_eager_over_compiled"]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 4, fp32 only (< 5 min on 2 cores)")
    parser.add_argument("--out", help="write the results as JSON here (e.g. docs/speed.json)")
    parser.add_argument("--markdown", help="write the whole page here (e.g. docs/speed.md)")
    parser.add_argument("--render", metavar="JSON", help="run nothing: write --markdown from this report")
    parser.add_argument("--update", metavar="JSON",
                        help="run the --only sections again on this machine and replace them in this report (the "
                             "report records each rerun: sections, command, date, load); written back to JSON "
                             "unless --out names another file")
    parser.add_argument("--only", default="distill,demo,prep,inference,teacher12,baseline",
                        help="comma-separated sections to run: distill, demo, breakdown, prep, inference, teacher12, "
                             "baseline, compile (bench/levers.py says what the last three time)")
    parser.add_argument("--baseline",
                        help="the commit whose engine the 'baseline' section times against this tree's (default: "
                             f"{BEFORE_ISSUE_24}, the engine before issue 24's levers, where this checkout has it); "
                             "'none' skips the section")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--precisions", help="comma-separated, e.g. fp32,bf16 (CUDA: also 'fp16 O1','fp16 O2')")
    parser.add_argument("--batch", type=int, help="distillation batch size (default 4 quick, 8 full)")
    parser.add_argument("--repeats", type=int, help="timed repetitions per variant")
    parser.add_argument("--smoke", action="store_true",
                        help="check every code path on tiny models in seconds (fp16 O1/O2 allowed on a CPU); "
                             "the figures mean nothing")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads: a number, or auto (default): torch's own choice on an idle "
                             "machine, 1 when the load average says other processes hold the cores (2 OpenMP "
                             "threads fighting other processes for 2 cores ran 2x slower than 1 thread, and "
                             "erratically)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one engine step")
    parser.add_argument("--task-stage", action="store_true",
                        help="also time a glue-eval KD epoch, teacher cached vs not")
    parser.add_argument("--prep-worker", help=argparse.SUPPRESS)
    parser.add_argument("--text-file", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--max-lines", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def update(args, cfg: dict, device, precisions: tuple, clock: Clock, command: str) -> int:
    """--update JSON: the --only sections run again and replace theirs in the saved report, the rerun recorded."""
    try:
        report = json.loads(Path(args.update).read_text(encoding="utf-8"))
        made = (report["mode"], report["machine"]["description"], report["config"]["threads"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: --update {args.update}: not a bench.speed report ({type(err).__name__}: {err}); give the JSON "
              "that --out wrote", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if made != (mode, machine()["description"], cfg["threads"]):
        print(f"error: --update {args.update}: that report is a {made[0]} run on {made[1]} with {made[2]} threads, "
              f"this one a {mode} run on {machine()['description']} with {cfg['threads']}: rerun the whole bench "
              "instead", file=sys.stderr)
        return 2
    started, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    run_sections(report, args, cfg, device, precisions, clock)
    report.setdefault("reruns", []).append({
        "sections": sorted(x.strip() for x in args.only.split(",")), "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - started, 1), "load_average_at_start": load,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]})
    report["ratios"] = named_ratios(report)
    report["targets"] = {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items() if k in report["ratios"]}
    write_json(args.out or args.update, report)
    if args.markdown:
        write_text(args.markdown, page(report))
    for name in RATIO_NAMES:
        if name in report["ratios"]:
            print(f"{name}: {report['ratios'][name]:.2f}")
    return 0


def run_settings(args: argparse.Namespace, threads_note: str) -> tuple[dict, torch.device, tuple]:
    """``(cfg, device, precisions)`` of a run: the quick or full preset, --smoke's tiny shapes, the flags on top."""
    cfg = dict(QUICK if args.quick or args.smoke else FULL)
    if args.smoke:
        SHAPE.update(SMOKE["shape"])
        SMOKE["allow_cpu_fp16"] = True
        cfg.update(repeats=1, prep_repeats=1, infer_repeats=1, infer_repeats_batch1=1, breakdown_repeats=1,
                   infer_batch=2, legacy_paragraphs=20, demo_repeats=1, demo_batch=2, matmul_n=128)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.batch:
        cfg["batch"] = args.batch
    if args.repeats:
        cfg["repeats"] = cfg["prep_repeats"] = cfg["infer_repeats"] = cfg["demo_repeats"] = args.repeats
        cfg["infer_repeats_batch1"] = 3 * args.repeats
    if args.precisions:
        precisions = tuple(p.strip() for p in args.precisions.split(","))
    elif device.type == "cuda":
        precisions = CUDA_PRECISIONS
    else:
        precisions = cfg["precisions_cpu"]
    cfg["headline_precision"] = "fp32"
    cfg["threads"] = torch.get_num_threads()
    cfg["threads_choice"] = threads_note
    log(f"torch threads: {cfg['threads']} ({threads_note})")
    cfg["device"] = str(device)
    return cfg, device, precisions


def run_sections(report: dict, args, cfg: dict, device: torch.device, precisions: tuple, clock: Clock) -> None:
    """Each section ``--only`` (and ``--task-stage``) asks for, into ``report`` under its name."""
    sections = {s.strip() for s in args.only.split(",")}
    if "distill" in sections:
        report["distill"] = bench_distill(cfg, device, precisions, clock)
    if "breakdown" in sections or ("distill" in sections and cfg["breakdown_repeats"]):
        log(f"step breakdown, {precisions[0]}")
        report["breakdown"] = {"precision": precisions[0], "batch": cfg["batch"],
                               "kinds": breakdown(cfg, device, precisions[0], max(cfg["breakdown_repeats"], 1),
                                                  clock)}
    if "demo" in sections:
        report["demo"] = bench_demo(cfg, device, clock)
    if "prep" in sections:
        report["prep"] = bench_prep(cfg)
    if "inference" in sections:
        report["inference"] = bench_inference(cfg, device, clock)
    if args.task_stage or "task_stage" in sections:
        report["task_stage"] = bench_task_stage(cfg, device, clock)
    if "teacher12" in sections:
        report["teacher12"] = bench_teacher12(cfg, device, clock)
    for name in ("baseline", "compile"):
        if name in sections and not (name == "baseline" and args.baseline_commit is None):
            with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
                report[name] = (bench_baseline(cfg, device, clock, args.baseline, Path(work)) if name == "baseline"
                                else bench_compile(cfg, device, clock, Path(work)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prep_worker:
        print(json.dumps(prep_worker(args.prep_worker, args.text_file, args.cache_dir, args.max_lines)))
        return 0
    if args.render:
        if not args.markdown:
            print("error: --render JSON writes the page --markdown PATH names: give both", file=sys.stderr)
            return 2
        write_text(args.markdown, page(json.loads(Path(args.render).read_text(encoding="utf-8"))))
        return 0

    sections = {x.strip() for x in args.only.split(",")}
    try:  # a --baseline that is no commit here fails now, before minutes of other sections
        args.baseline_commit = resolve_commit(args.baseline) if "baseline" in sections and args.baseline != "none" \
            else None
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg, device, precisions = run_settings(args, set_threads(args.threads))
    clock = Clock(device)
    started = time.perf_counter()
    command = command_line("bench.speed", argv if argv is not None else sys.argv[1:])
    if args.update:
        return update(args, cfg, device, precisions, clock, command)
    report = {"mode": "smoke" if args.smoke else "quick" if args.quick else "full", "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "config": {**cfg, "precisions": list(precisions)},
              "objective": "5*ce(T=2) + 2*mlm + 1*cos", "teacher": "BertForMaskedLM 12 x 768, random weights",
              "student": f"4 layers from teacher layers {','.join(map(str, STUDENT_LAYERS))} (build_student)"}
    run_sections(report, args, cfg, device, precisions, clock)
    try:
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ratios"] = named_ratios(report)
    report["targets"] = {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items() if k in report["ratios"]}

    print(render(report))
    if args.markdown:
        write_text(args.markdown, page(report))
    if args.profile:
        print(f"\n### Profile of one engine_masked step ({precisions[0]})\n")
        print(profile_engine(cfg, device, precisions[0]))
    if args.out:
        write_json(args.out, report)
        log(f"wrote {args.out}")
    print(f"\n({report['mode']} mode, {report['seconds']:.0f} s)")
    for name in RATIO_NAMES:
        if name in report["ratios"]:
            print(f"{name}: {report['ratios'][name]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
