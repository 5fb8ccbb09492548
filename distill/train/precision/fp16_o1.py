"""fp16 O1: autocast fp16 over fp32 weights, with dynamic loss scaling (``torch.amp.GradScaler``).

The scaler is apex's dynamic one: init 2**16, x0.5 on an overflow (the step is then
skipped), x2 after ``growth_interval`` clean steps. O2 adds fp16 weights and fp32
masters on top of this (:mod:`distill.train.precision.fp16_o2`).
"""

from __future__ import annotations

import torch

from distill.train.precision.base import Precision


class Fp16O1(Precision):
    modes = (("native", "fp16 O1"),)
    summary = "fp16 O1 (native torch.amp; autocast fp16, fp32 weights, dynamic loss scale)"
    autocast_dtype = torch.float16

    def __init__(self, precision, opt_level, device, *, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 **kwargs):
        super().__init__(precision, opt_level, device, **kwargs)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale, growth_factor=2.0,
                                           backoff_factor=0.5, growth_interval=growth_interval)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _unscale(self, optimizer, params) -> None:
        if getattr(self.scaler, "_scale", None) is None:
            self.scaler.scale(torch.zeros((), device=params[0].device))  # no backward() yet: init its scale
        self.scaler.unscale_(optimizer)

    def _apply_step(self, optimizer) -> tuple[bool, float]:
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # skips optimizer.step() when unscale_ found inf/nan
        self.scaler.update()
        scale = self.scaler.get_scale()
        return scale < scale_before, scale  # update() only lowers the scale after an overflow

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
