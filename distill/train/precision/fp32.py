"""fp32 (apex's O0): no autocast, no loss scaling, no casts: the base behaviour as it is."""

from __future__ import annotations

from distill.train.precision.base import Precision


class Fp32(Precision):
    modes = (("native", "fp32"),)
    summary = "fp32 (O0: no autocast, no loss scaling)"
