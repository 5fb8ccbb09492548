"""The speed levers of issue 24, each timed against the step without it, in interleaved rounds.

Sections of ``python -m bench.speed`` (``--only baseline,teacher12,compile``):

- ``baseline``: the demo recipe's step (``distill-train`` with no arguments: all-MiniLM-L6-v2 into layers 2,4,6,
  cos + hid_mse + att_mse, precision auto) in this tree's engine against the engine of an older commit
  (``--baseline REV``; by default :data:`BEFORE_ISSUE_24`, the engine as it stood before the levers). REV's
  files come from ``git archive`` into a temporary folder; each engine runs in a worker process of its own
  (:mod:`bench.engine_worker`), built by its own ``build_run``/``optimisation``, on the same batch, the same
  threads, stepped alternately (A B, B A, ...). A third worker runs this tree with glibc's allocator tuned
  (:data:`MALLOC_TUNED`, what distill-train applies itself on a CPU). ``demo_step_vs_baseline`` = REV's step
  time / this tree's as each runs by default (on a CPU: this tree's allocator tuned, REV's not);
  ``demo_step_engine_vs_baseline`` = the same with glibc's defaults on both sides (the engine alone);
  ``demo_step_malloc_tuned_vs_default`` = default / tuned (> 1: the tuning helps).
- ``teacher12``: a 12-layer, 768-wide BertModel teacher (random weights) into 4 layers (1,5,8,12),
  ``hid_mse + att_mse``, at precision auto, in this process. Variants: ``autocast_eager`` (the teacher as
  loaded: every layer eager, fp32 weights that autocast re-casts at every forward), ``cast`` (linear weights
  cast once), ``eager_mapped`` (eager attention on layers 1,5,8,12 only), ``engine`` (both: what distill-train
  now does). ``teacher12_step_vs_autocast_eager`` = autocast_eager / engine. The depth cut is timed apart
  (``depth_*``): a map onto teacher layers 1-4, the teacher stopped after layer 4 against run whole. Also
  the bf16 teacher's effect on the loss: the objective on the same student features against the teacher's
  features computed in fp32 (``bf16_teacher_loss_relative_difference``).
- ``compile``: the demo recipe in two workers of this tree, ``compile`` off and on (both with the allocator
  distill-train runs with): the step and the teacher's forward alone, and the first step's time (the compilation).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from bench.common import (ROOT, SEQ, UTILISATION_HEADERS, Clock, add_utilisation, counted, fmt_table, interleaved, log,
                          make_batch, paired_ratio, summary, teacher_config, utilisation_cells, utilisation_note)
from distill.common.hardware import MALLOC_ENV

BEFORE_ISSUE_24 = "96f599d"  # the last commit before the levers: the engine they are measured against
WORKER = Path(__file__).resolve().parent / "engine_worker.py"
# glibc's allocator kept from handing memory back: large blocks stay in the heap (mmap threshold at glibc's
# 32 MiB maximum instead of its sliding default), the top of the heap is not trimmed under 1 GiB, 256 MiB of
# slack per extension: fewer page faults per step. Read by glibc at process start, so only a worker gets it.
MALLOC_TUNED = dict(MALLOC_ENV)  # the values distill-train applies itself on a CPU (--malloc_tuning)
TEACHER12_LAYERS = [1, 5, 8, 12]
TEACHER12_WEIGHTS = {"hid_mse": 1.0, "att_mse": 1.0}


class BenchError(Exception):
    """A bench input that cannot be used: one line naming it and the fix."""


# --------------------------------------------------------------------------------------- engines in workers


def resolve_commit(rev: str | None) -> str | None:
    """The full id of commit ``rev``; None (the default, :data:`BEFORE_ISSUE_24`) resolves to it where this
    checkout holds it and to None (the section skipped) where it does not (a shallow clone, an unpacked archive).
    A ``rev`` given that is not a commit here is a :class:`BenchError`."""
    wanted = BEFORE_ISSUE_24 if rev is None else rev
    try:
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"], cwd=ROOT,
                               capture_output=True, text=True)
    except OSError:
        found = None
    if found is not None and found.returncode == 0:
        return found.stdout.strip()
    if rev is None:
        log(f"baseline section skipped: commit {BEFORE_ISSUE_24} (before issue 24) is not in this checkout")
        return None
    raise BenchError(f"--baseline {rev!r} is not a commit of this repository: give a commit id, tag or branch "
                     "(git log --oneline), or --baseline none")


def checkout(commit: str, dest: Path) -> str:
    """The tracked files of ``commit`` written under ``dest`` (``git archive``: the repository is not touched)."""
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=ROOT, stdout=subprocess.PIPE)
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(dest, filter="data")
    if archive.wait() != 0:
        raise BenchError(f"git archive {commit} failed")
    return commit


class EngineWorker:
    """One engine in a worker process (:mod:`bench.engine_worker`) started in ``tree``; ``variant(name)`` is a
    zero-argument function for :func:`bench.common.interleaved` that runs one ``step`` or ``teacher`` there."""

    def __init__(self, tree: Path, batch_file: str, threads: int, overrides: dict, env: dict | None = None,
                 label: str = "engine"):
        self.label = label
        code = f"import runpy; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
        self.proc = subprocess.Popen([sys.executable, "-c", code, batch_file, str(threads), json.dumps(overrides)],
                                     cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.ready = self._read()
        if Path(self.ready["distill"]).resolve().parent != Path(tree).resolve():
            self.close()
            raise BenchError(f"the {label} worker imported distill from {self.ready['distill']}, not from its tree")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the {self.label} worker ended with exit {self.proc.wait()} (its messages are above)")
        return json.loads(line)

    def variant(self, name: str):
        def run():
            self.proc.stdin.write(name + "\n")
            self.proc.stdin.flush()
            answer = self._read()
            return {"worker_wall_s": answer["wall"]}
        return run

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _demo_batch(cfg: dict, work: Path) -> tuple[str, int]:
    batch = make_batch(cfg.get("demo_batch", 16), 30522)  # the MiniLM teacher's (bert-base-uncased) vocabulary
    path = work / "batch.pt"
    torch.save(batch, path)
    return str(path), int(batch["attention_mask"].sum())


def _workers(specs: dict, batch_file: str, device: torch.device) -> dict[str, EngineWorker]:
    """``{name: (tree, overrides, env)}`` -> started workers (all closed again if one fails to start)."""
    workers: dict[str, EngineWorker] = {}
    try:
        for name, (tree, overrides, env) in specs.items():
            log(f"  starting the {name} engine ({tree.name if tree != ROOT else 'this tree'})")
            workers[name] = EngineWorker(tree, batch_file, torch.get_num_threads(),
                                         {"device": device.type, **overrides}, env, name)
    except BaseException:
        for worker in workers.values():
            worker.close()
        raise
    return workers


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def bench_baseline(cfg: dict, device: torch.device, clock: Clock, rev: str | None, work: Path) -> dict:
    """The demo recipe's step: this tree's engine against ``rev``'s (None: :data:`BEFORE_ISSUE_24`), and this
    tree's with glibc's malloc tuned."""
    batch_file, tokens = _demo_batch(cfg, work)
    commit = checkout(resolve_commit(rev), work / "baseline")
    workers = _workers({"current": (ROOT, {}, None), "baseline": (work / "baseline", {}, None),
                        "current_malloc_tuned": (ROOT, {}, MALLOC_TUNED)}, batch_file, device)
    try:
        log(f"demo step, this engine against {commit[:10]}'s, batch {cfg.get('demo_batch', 16)} x {SEQ}")
        times = interleaved({n: w.variant("step") for n, w in workers.items()}, cfg["demo_repeats"], 1, clock)
    finally:
        for worker in workers.values():
            worker.close()
    ready = {n: w.ready for n, w in workers.items()}
    details = {"baseline_over_current": paired_ratio(times, "baseline", "current"),
               "default_over_malloc_tuned": paired_ratio(times, "current", "current_malloc_tuned")}
    # as each engine runs by default: distill-train now tunes the allocator itself on a CPU, REV did not
    details["baseline_over_shipped"] = (paired_ratio(times, "baseline", "current_malloc_tuned")
                                        if device.type == "cpu" else details["baseline_over_current"])
    return {"baseline": rev or BEFORE_ISSUE_24, "baseline_commit": commit, "batch": cfg.get("demo_batch", 16), "seq": SEQ,
            "precision": ready["current"]["precision"], "threads": ready["current"]["threads"],
            "malloc_tuned": MALLOC_TUNED,
            "first_loss": {n: r["first_loss"] for n, r in ready.items()},
            "first_loss_relative_difference": _relative(ready["current"]["first_loss"],
                                                        ready["baseline"]["first_loss"]),
            "variants": {n: summary(t, tokens) for n, t in times.items()}, "ratio_details": details,
            "ratios": {k: v["value"] for k, v in details.items()}}


def bench_compile(cfg: dict, device: torch.device, clock: Clock, work: Path) -> dict:
    """The demo recipe with ``compile`` off and on: step, teacher forward, and the first (compiling) step."""
    batch_file, tokens = _demo_batch(cfg, work)
    shipped = MALLOC_TUNED if device.type == "cpu" else None  # the allocator distill-train runs with here
    workers = _workers({"eager": (ROOT, {"compile": False}, shipped), "compiled": (ROOT, {"compile": True}, shipped)},
                       batch_file, device)
    try:
        log("demo step and teacher forward, compile off and on")
        variants = {f"{kind}_{n}": w.variant(kind) for kind in ("step", "teacher") for n, w in workers.items()}
        times = interleaved(variants, cfg["demo_repeats"], 1, clock)
    finally:
        for worker in workers.values():
            worker.close()
    details = {"step_eager_over_compiled": paired_ratio(times, "step_eager", "step_compiled"),
               "teacher_eager_over_compiled": paired_ratio(times, "teacher_eager", "teacher_compiled")}
    return {"batch": cfg.get("demo_batch", 16), "seq": SEQ, "first_step_s": {n: w.ready["first_step_s"]
                                                                            for n, w in workers.items()},
            "variants": {n: summary(t, tokens) for n, t in times.items()}, "ratio_details": details,
            "ratios": {k: v["value"] for k, v in details.items()}}


# --------------------------------------------------------------------------------------- the teacher levers


def _teacher12_models(device: torch.device):
    """The 12 x 768 teacher (every layer eager, fp32), and a 4-layer student from layers 1,5,8,12."""
    from transformers import BertModel

    from distill.models.student import build_student

    torch.manual_seed(0)
    config = teacher_config(architectures=["BertModel"])
    config._attn_implementation = "eager"
    teacher = BertModel(config).to(device).eval()
    teacher.requires_grad_(False)
    student, _ = build_student(teacher, TEACHER12_LAYERS)
    return teacher, student


def _teachers(teacher, attention: tuple, dtype) -> dict:
    """The teacher as each variant runs it: as loaded, linears cast, eager only on the mapped layers, both."""
    from distill.models.frozen import cast_linears, eager_only_on, prepare_teacher

    out = {"autocast_eager": teacher}
    if dtype is not None:
        out["cast"] = copy.deepcopy(teacher)
        cast_linears(out["cast"], dtype)
    out["eager_mapped"] = copy.deepcopy(teacher)
    eager_only_on(out["eager_mapped"], attention)
    out["engine"] = copy.deepcopy(teacher)
    prepare_teacher(out["engine"], attention, dtype)
    return out


def _trainee(student0, device):
    """A copy of ``student0`` to train, its Precision (auto) and fused AdamW: one per student, shared by the
    variants that time it (as bench.speed's distillation section shares one), so memory holds two students."""
    from distill.train.precision import Precision

    prec = Precision.from_config("auto", device=device)
    student = prec.prepare(copy.deepcopy(student0).to(device).train())
    optimizer = prec.make_optimizer([p for p in student.parameters() if p.requires_grad], torch.optim.AdamW,
                                    lr=1e-6)
    return student, prec, optimizer


def _stepper(trainee, objective, teacher, batch: dict, whole: bool = False):
    """One optimiser step of the trainee against ``teacher``, as a function; ``whole``: the teacher runs every
    layer whatever the objective's depth (what the engine did before the cut)."""
    from distill.models.loading import extract
    from distill.train.step import StudentStep

    student, prec, optimizer = trainee
    step_module = StudentStep(student, objective, teacher)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def forward():
        if not whole:
            return step_module(batch)[0]
        with torch.no_grad():
            t = extract(teacher, ids, mask, **{**objective.extract_kwargs(batch, "teacher"), "depth": None})
        return objective(extract(student, ids, mask, **objective.extract_kwargs(batch, "student")), t, batch)[0]

    def step():
        with prec.autocast():
            loss = forward()
        prec.backward(loss)
        prec.step(optimizer, 5.0)
    return step


def bench_teacher12(cfg: dict, device: torch.device, clock: Clock) -> dict:
    """Each teacher lever alone and together on the 12-layer teacher; the depth cut on a map onto layers 1-4."""
    from distill.models.student import build_student
    from distill.objective.plan import Objective
    from distill.train.precision import Precision

    teacher, student0 = _teacher12_models(device)
    objective = Objective.from_config(TEACHER12_WEIGHTS, student_config=student0.config,
                                      teacher_config=teacher.config, student_layers=TEACHER12_LAYERS).to(device)
    dtype = Precision.from_config("auto", device=device).autocast_dtype
    batch = {k: v.to(device) for k, v in make_batch(cfg["batch"], teacher.config.vocab_size).items()}
    tokens = int(batch["attention_mask"].sum())
    teachers = _teachers(teacher, objective.requests()["teacher"].attention_layers, dtype)
    trainee = _trainee(student0, device)
    variants = {name: _stepper(trainee, objective, t, batch) for name, t in teachers.items()}
    low_student, _ = build_student(teacher, [1, 2, 3, 4])
    low = Objective.from_config({"hid_mse": 1.0}, student_config=low_student.config, teacher_config=teacher.config,
                                student_layers=[1, 2, 3, 4]).to(device)
    low_trainee = _trainee(low_student, device)
    variants["depth_whole"] = _stepper(low_trainee, low, teachers["engine"], batch, whole=True)
    variants["depth_cut"] = _stepper(low_trainee, low, teachers["engine"], batch)
    log(f"teacher levers, 12 x {teacher.config.hidden_size} teacher into layers 1,5,8,12, batch {cfg['batch']} x "
        f"{SEQ}, {'fp32' if dtype is None else str(dtype).removeprefix('torch.')}")
    times = interleaved(variants, cfg["repeats"], cfg["warmup"], clock)
    pairs = {"autocast_eager_over_engine": ("autocast_eager", "engine"),
             "autocast_eager_over_cast": ("autocast_eager", "cast"),
             "autocast_eager_over_eager_mapped": ("autocast_eager", "eager_mapped"),
             "depth_whole_over_cut": ("depth_whole", "depth_cut")}
    details = {k: paired_ratio(times, a, b) for k, (a, b) in pairs.items() if a in times and b in times}
    out = {"batch": cfg["batch"], "seq": SEQ, "layers": TEACHER12_LAYERS, "weights": TEACHER12_WEIGHTS,
           "compute_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
           "loss": teacher_loss_change(objective, student0, teachers, batch, device, dtype),
           "variants": {n: summary(t, tokens) for n, t in times.items()}, "ratio_details": details,
           "ratios": {k: v["value"] for k, v in details.items()}}
    add_utilisation(out, variants, {n: dtype or torch.float32 for n in variants}, device, cfg.get("matmul_n"))
    return out


def teacher_loss_change(objective, student0, teachers: dict, batch: dict, device, dtype) -> dict:
    """The objective on one student's features against the teacher's features in fp32, autocast over fp32
    weights, and the engine's teacher: the relative differences a reduced-precision teacher makes."""
    from distill.models.loading import extract

    ids, mask = batch["input_ids"], batch["attention_mask"]
    student = copy.deepcopy(student0).to(device).eval()
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.no_grad():
        with autocast:
            s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
        values = {}
        for name, teacher, on in (("fp32", teachers["autocast_eager"], False),
                                  ("autocast_eager", teachers["autocast_eager"], True),
                                  ("engine", teachers["engine"], True)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=on and dtype is not None):
                t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
            values[name] = float(objective(s, t, batch)[0])
    return {"values": values,
            "autocast_eager_vs_fp32_teacher": _relative(values["autocast_eager"], values["fp32"]),
            "engine_vs_fp32_teacher": _relative(values["engine"], values["fp32"]),
            "engine_vs_autocast_eager": _relative(values["engine"], values["autocast_eager"])}


# --------------------------------------------------------------------------------------- report


def render_levers(report: dict) -> str:
    """Markdown tables of the three sections that ran (median step times and the paired ratios)."""
    parts = []
    titles = {"baseline": "The demo recipe's step: this engine against {baseline_commit:.10}'s (separate workers)",
              "teacher12": "Teacher levers: 12 x 768 teacher into layers 1,5,8,12, hid_mse + att_mse, "
                           "compute dtype {compute_dtype}",
              "compile": "torch.compile: the demo recipe's step and teacher forward"}
    for name, title in titles.items():
        section = report.get(name)
        if not section:
            continue
        parts.append(f"\n### {title.format(**section)} (batch {section['batch']} x {section['seq']})\n")
        shown = counted(section["variants"].values())
        head = ["variant", "step s (median)", "tokens/s", *(UTILISATION_HEADERS if shown else [])]
        rows = [[n, f"{v['median_s']:.3f}", f"{v['tokens_per_s']:,.0f}", *utilisation_cells(v, shown)]
                for n, v in section["variants"].items()]
        parts.append(fmt_table(head, rows))
        parts += utilisation_note([section.get("matmul_rates", {})])
        rows = [f"| {k} | {v:.2f} |" for k, v in section["ratios"].items()]
        parts.append("\n" + "\n".join(["| ratio (> 1: the second is faster) | value |", "|---|---|", *rows]))
    if report.get("teacher12"):
        loss = report["teacher12"]["loss"]
        parts.append(f"\nLoss on one batch, same student: against the fp32 teacher {loss['values']['fp32']:.6g}; "
                     f"autocast teacher relative difference {loss['autocast_eager_vs_fp32_teacher']:.2e}, the "
                     f"engine's teacher {loss['engine_vs_fp32_teacher']:.2e} (engine vs autocast "
                     f"{loss['engine_vs_autocast_eager']:.2e}).")
    if report.get("baseline"):
        b = report["baseline"]
        parts.append(f"\nFirst step's loss (same weights, same batch): relative difference "
                     f"{b['first_loss_relative_difference']:.2e} between the two engines; {b['precision']}, "
                     f"{b['threads']} thread(s) in each worker. glibc tuning: {b['malloc_tuned']}.")
    if report.get("compile"):
        first = report["compile"]["first_step_s"]
        parts.append(f"\nFirst step (compiles): {first['compiled']:.1f} s compiled, {first['eager']:.1f} s eager.")
    return "\n".join(parts)
