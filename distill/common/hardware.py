"""The one place that reads the machine, and the decisions taken from what it finds.

Everything a run, a report or a model card says about the hardware comes from here:
the CPU's model name and feature flags (``/proc/cpuinfo``), the cores this process may
use (its CPU affinity mask, capped by ``OMP_NUM_THREADS``), and the GPU's name and
memory when CUDA is visible. No description of a machine is ever written by hand.

Decisions:

* :func:`resolve_auto_precision`: what ``precision: "auto"`` means on a device. On a
  CPU, bf16 autocast only where the CPU has native bf16 instructions
  (``avx512_bf16`` or ``amx_bf16``: oneDNN's fast bf16 kernels); elsewhere bf16 is
  emulated and was measured 14x slower than fp32 per step, so fp32. On CUDA, bf16
  where ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp16 O2.
* :func:`resolve_threads`: what ``threads: "auto"`` means (the usable cores).
* :func:`resolve_num_proc`: what ``num_proc: "auto"`` means for corpus preparation.

The functions that decide take the facts as arguments (flags, capabilities, counts),
so tests fake any machine; the ``read_*`` functions are the only ones that look.
"""

from __future__ import annotations

import os
import platform

# x86 flags that make bf16 matmuls fast on a CPU (oneDNN); without them bf16 is emulated and slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Flags worth naming in a machine description: they decide which kernels (and so which precision) are fast.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")

AUTO = "auto"


# --------------------------------------------------------------------------------------- reading the machine


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); None where unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def read_cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (x86 ``model name``; ARM ``Model``/``Hardware``), else ``platform.processor()``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def affinity_cores() -> int:
    """Cores the scheduler lets this process run on (its affinity mask; ``os.cpu_count()`` where unsupported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def omp_num_threads(environ=None) -> int | None:
    """``OMP_NUM_THREADS`` as a positive int, None when unset or not a number (OpenMP then ignores it too)."""
    raw = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    try:
        value = int(raw.split(",")[0])  # OpenMP allows a nested list "4,2": the first level is ours
    except ValueError:
        return None
    return value if value > 0 else None


def usable_cores(environ=None) -> int:
    """The cores this process may use: the affinity mask, capped by ``OMP_NUM_THREADS`` when that is set.

    Not guessed from the current load: the load of a shared machine changes from one
    second to the next, and a user who wants fewer threads says so (``threads``).
    """
    cores = affinity_cores()
    cap = omp_num_threads(environ)
    return min(cores, cap) if cap else cores


def read_gpus() -> list[dict]:
    """Name, memory (GiB) and bf16 support of every visible CUDA device; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    return gpus


def cuda_bf16_supported() -> bool | None:
    """``torch.cuda.is_bf16_supported()`` on the current device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def machine_description() -> dict:
    """What the machine is, as read from it: CPU model, the speed-relevant flags, cores, GPUs."""
    flags = read_cpu_flags()
    info = {
        "cpu": read_cpu_model(),
        "arch": platform.machine(),
        "cpu_flags": sorted(set(SPEED_FLAGS) & set(flags)) if flags is not None else None,
        "cpu_bf16": sorted(set(CPU_BF16_FLAGS) & set(flags or ())),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "omp_num_threads": omp_num_threads(),
        "gpus": read_gpus(),
    }
    return info


def describe_machine(info: dict | None = None) -> str:
    """One line for reports and model cards, e.g. ``Intel(R) Xeon(R) ... (x86_64; avx2 avx512f avx512_bf16
    amx_bf16), 2 usable cores of 2; no GPU``."""
    info = machine_description() if info is None else info
    flags = info.get("cpu_flags")
    flag_text = "flags unreadable" if flags is None else (" ".join(flags) or "none of " + "/".join(SPEED_FLAGS))
    text = (f"{info['cpu']} ({info['arch']}; {flag_text}), {info['usable_cores']} usable cores of "
            f"{info['logical_cpus']}")
    gpus = info.get("gpus") or []
    if gpus:
        names = {}
        for g in gpus:
            key = f"{g['name']} ({g['memory_gib']:g} GiB)"
            names[key] = names.get(key, 0) + 1
        text += "; " + ", ".join(f"{n} x {k}" if n > 1 else k for k, n in names.items())
    else:
        text += "; no GPU"
    return text


# --------------------------------------------------------------------------------------- decisions


def resolve_auto_precision(device_type: str, cpu_flags: frozenset[str] | None,
                           cuda_bf16_supported: bool | None) -> tuple[str, str | None, str]:
    """What ``precision: "auto"`` runs as: ``(precision, opt_level, reason)``.

    ``device_type``: ``"cpu"`` or ``"cuda"`` (anything else gets fp32). ``cpu_flags``:
    the CPU's feature flags (None: unreadable). ``cuda_bf16_supported``: the answer of
    ``torch.cuda.is_bf16_supported()`` (ignored off CUDA). ``opt_level`` is "O2" for
    fp16 and None otherwise; ``reason`` is the half-sentence printed after the choice.
    """
    if device_type == "cuda":
        if cuda_bf16_supported:
            return "bf16", None, "this GPU has native bf16"
        return "fp16", "O2", "this GPU has no native bf16 (pre-Ampere): fp16 O2 with loss scaling"
    if device_type != "cpu":
        return "fp32", None, f"no reduced precision is chosen automatically on {device_type!r}"
    if cpu_flags is None:
        return "fp32", None, ("could not read the CPU flags to find " + "/".join(CPU_BF16_FLAGS)
                              + "; bf16 may be emulated")
    found = [f for f in CPU_BF16_FLAGS if f in cpu_flags]
    if found:
        return "bf16", None, f"this CPU has {'/'.join(found)}: native bf16"
    return "fp32", None, f"this CPU has no {'/'.join(CPU_BF16_FLAGS)}; bf16 would be emulated"


def auto_precision_here(device_type: str) -> tuple[str, str | None, str]:
    """:func:`resolve_auto_precision` with the facts read from this machine."""
    return resolve_auto_precision(device_type, read_cpu_flags() if device_type == "cpu" else None,
                                  cuda_bf16_supported() if device_type == "cuda" else None)


def choose_precision(precision: str, fp16_opt_level: str, device_type: str,
                     cpu_flags: frozenset[str] | None = None) -> tuple[str, str, str | None]:
    """A config's ``(precision, fp16_opt_level)`` -> the pair to run, and the line to print when it was auto.

    Explicit choices pass through unchanged (their own checks and warnings apply later);
    ``"auto"`` goes through :func:`resolve_auto_precision` with the facts of this machine
    (``cpu_flags`` None: read them). The line reads e.g. ``precision: auto -> fp32 (this
    CPU has no avx512_bf16/amx_bf16; bf16 would be emulated)``.
    """
    if precision != AUTO:
        return precision, fp16_opt_level, None
    if device_type == "cpu" and cpu_flags is None:
        cpu_flags = read_cpu_flags()
    chosen, level, why = resolve_auto_precision(
        device_type, cpu_flags, cuda_bf16_supported() if device_type == "cuda" else None)
    mode = f"fp16 {level}" if chosen == "fp16" else chosen
    return chosen, level or fp16_opt_level, f"precision: auto -> {mode} ({why})"


def resolve_threads(spec, cores: int | None = None, processes: int = 1) -> tuple[int, str]:
    """``threads`` (``"auto"`` or a positive int) -> (torch CPU threads, why).

    ``cores``: the usable cores (None: read them); ``processes``: how many processes of
    this run share them (torchrun's ``LOCAL_WORLD_SIZE``), each getting its share.
    """
    if spec != AUTO and spec is not None:
        return int(spec), "set by threads"
    from_machine = cores is None
    cores = usable_cores() if from_machine else cores
    cap = omp_num_threads() if from_machine else None
    why = f"auto: {cores} usable cores (CPU affinity mask{', capped by OMP_NUM_THREADS' if cap else ''})"
    processes = max(1, int(processes))
    if processes > 1:
        why += f" shared by {processes} processes"
    return max(1, cores // processes), why


# Below these sizes a corpus is prepared in this process (whose tokenizer threads still use the
# cores): starting worker processes, pickling the tokenizer to them and merging their shards costs
# more than it saves on small corpora (the demo's 5k paragraphs: seconds of setup for about a
# second of work).
IN_PROCESS_ROWS = 200_000
IN_PROCESS_BYTES = 256 * 2**20


def resolve_num_proc(spec, num_rows: int | None = None, num_bytes: int | None = None,
                     cores: int | None = None) -> int:
    """``num_proc`` (``"auto"`` or a positive int) -> worker processes for ``datasets`` preparation.

    ``auto``: 1 when the corpus is small (fewer than :data:`IN_PROCESS_ROWS` text rows or
    :data:`IN_PROCESS_BYTES` bytes of files, whichever is known) or its size is unknown,
    else the usable cores. Memory stays flat either way: ``datasets`` streams batches.
    """
    if spec != AUTO and spec is not None:
        return max(1, int(spec))
    cores = usable_cores() if cores is None else cores
    if num_rows is not None:
        small = num_rows < IN_PROCESS_ROWS
    elif num_bytes is not None:
        small = num_bytes < IN_PROCESS_BYTES
    else:
        small = True
    return 1 if small else max(1, cores)


# --------------------------------------------------------------------------------------- the allocator

# glibc malloc settings for a training process on a CPU (mallopt parameter number, value): freed blocks stay with the
# process instead of going back to the kernel and being faulted in again on the next step. Measured: the demo step
# 1.05-1.13x (bench.speed's baseline section, "demo_step_malloc_tuned_vs_default"); the cost is resident memory the
# process keeps, at most about the trim threshold plus the top pad (1.25 GiB). MALLOC_*_ env names for a worker.
MALLOC_TUNING = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 1 << 30), "M_TOP_PAD": (-2, 256 << 20)}
MALLOC_ENV = {f"MALLOC_{name[2:]}_": str(value) for name, (_, value) in MALLOC_TUNING.items()}


def tune_malloc() -> str | None:
    """Apply :data:`MALLOC_TUNING` to this process's glibc allocator; a line saying so, or None where there is no
    glibc (musl, macOS, Windows) or it refused a value."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    if not all(libc.mallopt(number, value) == 1 for number, value in MALLOC_TUNING.values()):
        return None
    return ("glibc malloc tuned for training (mmap threshold 32 MiB, trim threshold 1 GiB, top pad 256 MiB: freed "
            "memory stays with the process; --malloc_tuning false keeps glibc's defaults)")
