"""Mixed precision: apex's opt levels done with native torch (``torch.autocast`` + ``torch.amp.GradScaler``).

One interface, :class:`Precision` (``base``), one small class per mode in a module of
its own, and :meth:`Precision.from_config` to build the one a run resolves to
(``choose``: names checked, fp16 on a CPU decided). Modes (``precision`` /
``fp16_opt_level``), class and module:

* ``fp32`` (apex O0): nothing. :class:`Fp32` (``fp32``).
* ``bf16``: autocast bf16, no loss scaling. Fast on Ampere+ GPUs, and on CPUs
  with ``avx512_bf16`` or ``amx_bf16`` only (elsewhere bf16 is slower than fp32).
  :class:`Bf16` (``bf16``).
* ``fp16`` O1: autocast fp16, fp32 weights, dynamic loss scaling. :class:`Fp16O1` (``fp16_o1``).
* ``fp16`` O2: weights in fp16 except normalisation layers, fp32 master weights
  held by the optimiser, dynamic loss scaling; forward under autocast fp16 so fp32
  norms and fp16 activations mix. The master optimiser's gradients are fp32, so
  ``torch.amp.GradScaler`` (init 2**16, backoff 0.5, growth 2 every 2000 clean
  steps: apex's dynamic scaler) does the unscale / inf check / skip / rescale.
  :class:`Fp16O2` (``fp16_o2``), its master weights :class:`MasterWeights` (``masters``).
* ``fp16`` O3: pure fp16 weights, no masters, no loss scaling (apex's O3 default
  of a static scale 1). It does not train; refused unless ``force_o3=True``.
  :class:`Fp16O3` (``fp16_o3``).
* ``amp_backend="apex"``: legacy NVIDIA ``apex.amp`` (removed from apex in 2025), only
  where it is importable and on CUDA. :class:`ApexAmp` (``apex_backend``).

fp16 is a CUDA mode: on a CPU, fp16 matmuls run a reference kernel about 75x
slower than fp32, so fp16 asked on a CPU falls back to bf16 where the CPU has bf16
instructions and is refused otherwise (``allow_cpu_fp16=True`` is for tests).

One training step, whatever the mode::

    model = prec.prepare(model)                      # O2/O3: cast weights (norms stay fp32)
    opt = prec.make_optimizer(groups, torch.optim.AdamW, lr=5e-4)
    model = DDP(model)                               # optional; before or after make_optimizer (apex: after)
    for micro_batch in micro_batches:                # the scale is fixed until step()
        with prec.autocast():
            loss = compute_loss(model, micro_batch) / len(micro_batches)
        prec.backward(loss)
    result = prec.step(opt, max_grad_norm=5.0)       # unscale, inf check, clip, step, zero grads
    if not result.skipped:
        scheduler.step()
"""

from distill.train.precision.apex_backend import ApexAmp
from distill.train.precision.base import MODES, Precision, StepResult, is_norm
from distill.train.precision.bf16 import Bf16
from distill.train.precision.choose import (
           BACKENDS,
           CPU_BF16_FLAGS,
           OPT_LEVELS,
           PRECISIONS,
           read_cpu_flags,
           resolve_precision,
)
from distill.train.precision.fp16_o1 import Fp16O1
from distill.train.precision.fp16_o2 import Fp16O2
from distill.train.precision.fp16_o3 import Fp16O3
from distill.train.precision.fp32 import Fp32
from distill.train.precision.masters import MasterWeights

__all__ = ["Precision", "StepResult", "resolve_precision", "read_cpu_flags", "is_norm",
           "PRECISIONS", "OPT_LEVELS", "BACKENDS", "CPU_BF16_FLAGS", "MODES",
           "Fp32", "Bf16", "Fp16O1", "Fp16O2", "Fp16O3", "ApexAmp", "MasterWeights"]
