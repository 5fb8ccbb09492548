"""Which precision a run uses: the config's names checked, and the device's say (fp16 on a CPU).

Pure decisions, no tensors: :meth:`distill.train.precision.Precision.from_config` asks these
and then builds the one class that implements the chosen mode.
"""

from __future__ import annotations

from distill.common.errors import UsageError
from distill.common.hardware import CPU_BF16_FLAGS, read_cpu_flags  # noqa: F401  (re-exported: the machine is read there)

PRECISIONS = ("fp32", "bf16", "fp16")
OPT_LEVELS = ("O1", "O2", "O3")
BACKENDS = ("native", "apex")

def check_names(precision: str, fp16_opt_level: str, amp_backend: str, force_o3: bool) -> str:
    """Refuse unknown names and O3 without ``force_o3``; return the opt level upper-cased ("O1"/"O2"/"O3")."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} or auto "
                         "(fp32 is apex's O0; fp16 takes fp16_opt_level O1, O2 or O3)")
    level = str(fp16_opt_level).upper()
    if level not in OPT_LEVELS:
        hint = ": O0 is precision fp32" if level == "O0" else ""
        raise UsageError(f"fp16_opt_level {fp16_opt_level!r} is not one of {', '.join(OPT_LEVELS)}{hint}")
    if amp_backend not in BACKENDS:
        raise UsageError(f"amp_backend {amp_backend!r} is not one of {', '.join(BACKENDS)}")
    if precision == "fp16" and level == "O3" and not force_o3:
        raise UsageError(
            "fp16_opt_level O3 (pure fp16: fp16 weights and optimiser state, no master weights, no loss "
            "scaling) does not train: the seed report's O3 runs failed. Use O2 (fp16 weights with fp32 "
            "norms and fp32 master weights), or set force_o3=True to run it anyway"
        )
    return level


def resolve_precision(
    precision: str, device_type: str, cpu_flags: frozenset[str] | None, allow_cpu_fp16: bool = False
) -> tuple[str, list[str]]:
    """The precision a run on ``device_type`` actually uses, and the notes to log about that choice.

    ``cpu_flags`` are the CPU's feature flags (None: unknown). fp16 on a CPU becomes
    bf16 where the CPU has bf16 instructions, else a UsageError; ``allow_cpu_fp16``
    keeps fp16 (tests of O1/O2 semantics on tiny tensors).
    """
    if device_type != "cpu" or precision == "fp32":
        return precision, []
    bf16_flags = sorted(set(CPU_BF16_FLAGS) & set(cpu_flags or ()))
    if precision == "bf16":
        if bf16_flags:
            return "bf16", []
        why = "could not read the CPU flags" if cpu_flags is None else "this CPU has neither"
        return "bf16", [
            f"bf16 on a CPU is fast only with {' or '.join(CPU_BF16_FLAGS)} ({why}); "
            "here it may be slower than fp32: consider --precision fp32"
        ]
    # fp16 on a CPU
    if allow_cpu_fp16:
        return "fp16", ["fp16 on a CPU was allowed explicitly (allow_cpu_fp16): fp16 matmuls on a CPU are "
                        "about 75x slower than fp32; this is for tests on tiny tensors only"]
    if bf16_flags:
        return "bf16", [
            f"fp16 was asked on a CPU, where fp16 matmuls run a reference kernel about 75x slower than fp32; "
            f"this CPU has {', '.join(bf16_flags)}, so the run uses bf16 autocast instead (no loss scaling). "
            "fp16 O1/O2 is a CUDA mode"
        ]
    what = "could not read the CPU flags to find" if cpu_flags is None else "this CPU has no"
    raise UsageError(
        f"precision fp16 on a CPU: fp16 matmuls on a CPU run a reference kernel about 75x slower than fp32, "
        f"and {what} bf16 instructions ({', '.join(CPU_BF16_FLAGS)}) to fall back on: use --precision fp32 "
        "here, or run fp16 on a CUDA GPU"
    )
