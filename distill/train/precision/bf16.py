"""bf16: autocast bf16 over fp32 weights, no loss scaling (bf16 has fp32's exponent range, so no overflow to guard).

Fast on Ampere+ GPUs, and on CPUs with ``avx512_bf16`` or ``amx_bf16`` only (elsewhere
bf16 is emulated and slower than fp32: :func:`distill.train.precision.resolve_precision` says so).
"""

from __future__ import annotations

import torch

from distill.train.precision.base import Precision


class Bf16(Precision):
    modes = (("native", "bf16"),)
    summary = "bf16 (native torch.autocast bf16; fp32 weights, no loss scaling)"
    autocast_dtype = torch.bfloat16
