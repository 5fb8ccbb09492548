"""What the benches share: timing in interleaved rounds, the machine record and the thread choice, the command
line a report records, the atomic JSON write, and the BERT-base workload (teacher shape, masked packed batch).

Every bench runs as a module from the repository root (``python -m bench.speed``), so ``bench`` and ``distill``
import as packages: no bench edits ``sys.path``.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
# BERT-base. speed's --smoke shrinks the width in place (not the layer count: students take layers 1,5,8,12).
SHAPE = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- timing


class Clock:
    """Wall time of a callable, synchronising the device first and last."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def __call__(self, fn) -> tuple[float, float, dict | None]:
        """(wall seconds, process CPU seconds, the phase times ``fn`` returned, if any)."""
        t0, c0 = self.now(), time.process_time()
        phases = fn()
        return self.now() - t0, time.process_time() - c0, phases


def interleaved(variants: dict, repeats: int, warmup: int, clock: Clock) -> dict[str, list[tuple]]:
    """One untimed run of the first variant and ``warmup`` untimed rounds of all, then ``repeats``
    timed rounds, each running every variant once, in reversed order every other round
    (A B C, C B A, ...) so slow drifts in the load hit all variants alike. Returns clock()
    results per variant, in round order."""
    next(iter(variants.values()))()
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    runs = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(clock(variants[name]))
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {runs[n][-1][0]:.2f}s" for n in names))
    return runs


def paired_ratio(runs: dict, num: str, den: str) -> dict:
    """``num / den`` as the median over rounds of the within-round ratio (the two ran back to back,
    so load that changes between rounds cancels), with the ratio of the medians beside it."""
    per_round = [a[0] / b[0] for a, b in zip(runs[num], runs[den])]
    med = statistics.median(r[0] for r in runs[num]) / statistics.median(r[0] for r in runs[den])
    cpu = statistics.median(r[1] for r in runs[num]) / max(statistics.median(r[1] for r in runs[den]), 1e-12)
    return {"value": statistics.median(per_round), "ratio_of_medians": med, "cpu_time_ratio_of_medians": cpu,
            "per_round": [round(x, 3) for x in per_round]}


def summary(runs: list, tokens: int | None = None) -> dict:
    """Median (the figure), min, max and every run's wall time; CPU time and phases when recorded."""
    walls = [r[0] if isinstance(r, tuple) else r for r in runs]
    med = statistics.median(walls)
    out = {"median_s": med, "min_s": min(walls), "max_s": max(walls), "runs_s": [round(x, 4) for x in walls]}
    if runs and isinstance(runs[0], tuple):
        out["cpu_median_s"] = statistics.median(r[1] for r in runs)
        if runs[0][2]:
            out["phases_median_s"] = {k: statistics.median(r[2][k] for r in runs) for k in runs[0][2]}
    if tokens is not None:
        out["tokens"] = tokens
        out["tokens_per_s"] = tokens / med
    return out


def vm_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``); 0 where it is absent."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------------------- model FLOPs utilisation


def _sdpa_for_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_for_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def counted_flops(fn) -> int:
    """The floating-point operations of one call of ``fn`` as torch's FlopCounterMode counts them: matmuls and
    attention, forward and backward (elementwise work is not counted: the usual "model FLOPs"). The CPU's fused
    attention kernel, which torch's table lacks, is counted by the same formula as the CUDA ones."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_for_cpu
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_for_cpu_backward
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> dict:
    """This device's own dense matmul rate in ``dtype``: FLOP/s of ``n x n @ n x n``, the best of ``repeats``. The
    ceiling a step's model FLOPs utilisation is read against, measured here instead of taken from a data sheet
    (on a CPU no sheet applies; on a GPU it is what the library reaches, below the sheet's peak)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    clock, best = Clock(device), float("inf")
    a @ b  # warm-up
    for _ in range(repeats):
        t0 = clock.now()
        a @ b
        best = min(best, clock.now() - t0)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n ** 3 / best}


def add_utilisation(entry: dict, variants: dict, dtypes: dict, device: torch.device, n: int | None) -> None:
    """Each timed variant's model FLOPs a step (one more step, counted), the FLOP/s its median step reaches, and
    that rate over this device's own matmul rate in the variant's compute dtype (``dtypes[name]``; matrices
    ``n`` square): its model FLOPs utilisation (MFU). ``entry["matmul_rates"]``: the rates, by dtype."""
    rates = entry.setdefault("matmul_rates", {})
    for name, step in variants.items():
        dtype = str(dtypes[name]).removeprefix("torch.")
        if dtype not in rates:
            rates[dtype] = matmul_rate(device, dtypes[name], n)
        v = entry["variants"][name]
        v["flops"] = counted_flops(step)
        v["flops_per_s"] = v["flops"] / v["median_s"]
        v["mfu"] = v["flops_per_s"] / rates[dtype]["flops_per_s"]
        v["mfu_dtype"] = dtype


UTILISATION_HEADERS = ["model GFLOP / step", "GFLOP/s", "MFU"]


def counted(variants) -> bool:
    """Whether a section's variants carry model FLOPs (reports made before they were counted do not: their tables
    keep their columns)."""
    return any("flops" in v for v in variants)


def utilisation_cells(v: dict, shown: bool = True) -> list[str]:
    """A variant's model GFLOP a step, GFLOP/s and MFU (none when the table has no such columns)."""
    if not shown:
        return []
    if "flops" not in v:
        return ["-", "-", "-"]
    return [f"{v['flops'] / 1e9:,.1f}", f"{v['flops_per_s'] / 1e9:,.1f}", f"{v['mfu']:.0%}"]


def utilisation_note(rate_maps: list[dict]) -> list[str]:
    """The line under a table with MFU columns, what MFU is read against (none when nothing was counted)."""
    rates = {k: r for m in rate_maps for k, r in m.items()}
    if not rates:
        return []
    return ["\nMFU: the step's model FLOPs (matmuls and attention, forward and backward, as torch.utils.flop_counter "
            "counts them) per second, over this device's own dense matmul rate in the step's compute dtype, measured "
            "in the same run: " + "; ".join(f"{k} {r['flops_per_s'] / 1e9:,.0f} GFLOP/s ({r['n']}^3)"
                                            for k, r in sorted(rates.items())) + "."]


def fmt_table(headers, rows) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- machine and threads


def machine() -> dict:
    """Versions, and the machine as distill.common.hardware reads it (CPU model, speed flags, cores, GPUs)."""
    from distill import __version__
    from distill.common.hardware import describe_machine, machine_description

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        import datasets
        import tokenizers
        import transformers

        info.update(transformers=transformers.__version__, datasets=datasets.__version__,
                    tokenizers=tokenizers.__version__)
    except ImportError:
        pass
    info["distill"] = __version__
    info.update(machine_description())
    info["description"] = describe_machine(info)
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def set_threads(spec: str) -> str:
    """Apply ``--threads``; returns why that number was chosen."""
    if spec != "auto":
        torch.set_num_threads(int(spec))
        return "set by --threads"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "torch default (load average unknown)"
    cores = os.cpu_count() or 1
    if load >= 0.5 * cores:
        torch.set_num_threads(1)
        return (f"auto: 1 thread, since the 1-minute load average was {load:.1f} on {cores} cores "
                "(other processes hold the cores; more OpenMP threads would wait on each other)")
    return f"auto: torch default, the machine looked idle (load average {load:.1f} on {cores} cores)"


# --------------------------------------------------------------------------------------- what a report records


# flags whose value a report shows by the file's name alone (it reruns from the folder that should hold the file),
# and those whose value is a scratch folder of the run (shown as SCRATCH_DIR)
NAMED_FLAGS = ("--out", "--markdown")
SCRATCH_FLAGS = ("--work", "--work_dir")


def under_root(path: Path, roots) -> str | None:
    """``path`` as ``LABEL/rest`` for the first ``(folder, LABEL)`` of ``roots`` that holds it (an empty label:
    ``rest`` alone); None when none does. The one way a committed report hides a machine's folders."""
    for root, label in roots:
        root = Path(root).expanduser().resolve()
        if root != Path(root.anchor) and path.is_relative_to(root):
            rest = path.relative_to(root)
            return str(Path(label) / rest) if label else str(rest)
    return None


def shown_argument(flag: str, value: str) -> str:
    """A path-valued argument as a committed report shows it: relative to the repository when inside it; else by
    name (:data:`NAMED_FLAGS`), as SCRATCH_DIR (:data:`SCRATCH_FLAGS`), or under ``~`` when in the home folder, else
    by name. Values that are not absolute paths stay as given."""
    if not value.startswith(("/", "~")):
        return value
    path = Path(value).expanduser().resolve()
    if flag in SCRATCH_FLAGS and not path.is_relative_to(ROOT):
        return "SCRATCH_DIR"
    roots = [(ROOT, "")] + ([] if flag in NAMED_FLAGS else [("~", "~")])
    return under_root(path, roots) or path.name


def command_line(module: str, argv: list[str]) -> str:
    """A bench's command as run, for its report: ``python -m MODULE`` and the arguments as given, paths as
    :func:`shown_argument` shows them (no directory of the machine it ran on goes into a committed report)."""
    words, flag = ["python", "-m", module], ""
    for word in argv:
        name, eq, value = word.partition("=")
        if name.startswith("--") and eq:
            word = f"{name}={shown_argument(name, value)}"
        elif not word.startswith("--"):
            word = shown_argument(flag, word)
        flag = word if word.startswith("--") and not eq else ""
        words.append(word)
    return " ".join(shlex.quote(w) for w in words)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` at ``path``, whole or not at all; the folder is made when missing."""
    from distill.common.io import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_json(path: str | os.PathLike, report: dict) -> None:
    """``report`` as indented JSON at ``path``, whole or not at all (a temporary file, then a rename); the folder is
    made when missing."""
    from distill.common.io import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)


# --------------------------------------------------------------------------------------- the BERT-base workload


def teacher_config(**overrides):
    """A ``BertForMaskedLM`` config of :data:`SHAPE` (12 layers, the 30,522-word vocabulary), ``overrides`` on top."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, num_hidden_layers=12, max_position_embeddings=512,
                        **{**SHAPE, **overrides})
    config.architectures = ["BertForMaskedLM"]
    return config


def make_batch(batch: int, vocab: int, seed: int = 0) -> dict:
    """Packed blocks ``[CLS] ... [SEP]`` (no padding) masked DistilBERT's way by ``distill.data.masking``."""
    from distill.data.masking import mask_tokens, masking_weights

    g = torch.Generator().manual_seed(seed)
    # Zipf-like token frequencies, so the count^-0.7 weights are not uniform
    ranks = torch.arange(1, vocab - 999 + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    ids = 999 + torch.multinomial(probs, batch * SEQ, replacement=True, generator=g).view(batch, SEQ)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    counts = torch.bincount(ids.flatten(), minlength=vocab)
    weights = masking_weights(counts, special_ids=[0, 100, 101, 102, 103])
    masked, labels = mask_tokens(ids, mask, weights, 103, vocab, g)
    return {"input_ids": masked, "attention_mask": mask, "mlm_labels": labels}
