"""fp16 O3: pure fp16 weights (norms too), no master weights, no loss scaling (apex's O3: a static scale of 1).

It does not train (the seed report's O3 runs failed), so ``from_config`` refuses it
unless ``force_o3=True``, and then logs a warning.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.train.precision.base import Precision, cast_to_fp16


class Fp16O3(Precision):
    modes = (("native", "fp16 O3"),)
    summary = "fp16 O3 (forced; pure fp16 weights, no master weights, no loss scaling)"
    autocast_dtype = torch.float16

    def prepare(self, model: nn.Module) -> nn.Module:
        cast_to_fp16(model, keep_norms=False)
        return model
