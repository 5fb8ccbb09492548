"""NVIDIA apex's ``amp`` as a backend (legacy; never a dependency): ``amp_backend="apex"``.

Kept in a module of its own for users on an old apex. apex removed ``apex.amp`` in
2025 (release 25.07 on), and the PyPI package named ``apex`` is an unrelated project,
so on a current install this backend is refused with the way out (``native``: the same
opt levels done with torch.autocast and torch.amp.GradScaler).
"""

from __future__ import annotations

import torch
from torch import nn

from distill.common.errors import UsageError
from distill.train.precision.base import Precision, StepResult, clip_value


class ApexAmp(Precision):
    modes = tuple(("apex", f"fp16 {level}") for level in ("O1", "O2", "O3"))
    backend = "apex"
    fused_optimizer = False  # apex's amp.initialize wraps the optimiser it is given, as it is

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._models: list[nn.Module] = []

    @classmethod
    def check_usable(cls, precision: str, device: torch.device) -> None:
        """amp_backend="apex" needs NVIDIA apex with ``apex.amp`` (removed from apex in 2025) and a GPU."""
        if precision != "fp16":
            raise UsageError(f"amp_backend apex applies to fp16 only (precision is {precision!r}): "
                             "use amp_backend native")
        try:
            from apex import amp  # noqa: F401
        except ImportError:
            raise UsageError(
                "amp_backend apex needs NVIDIA apex with apex.amp, which is not importable here: apex removed "
                "apex.amp in 2025 (release 25.07 on), and the PyPI package named 'apex' is an unrelated project. "
                "Use amp_backend native: the same opt levels done with torch.autocast and torch.amp.GradScaler"
            ) from None
        if device.type != "cuda":
            raise UsageError(f"amp_backend apex runs on CUDA only (device is {device.type!r}): "
                             "use amp_backend native")

    @property
    def summary(self) -> str:
        return f"fp16 {self.opt_level} (NVIDIA apex.amp, dynamic loss scale)"

    @property
    def scales_loss(self) -> bool:
        return True

    @property
    def loss_scale(self) -> float:
        return _apex_loss_scale()

    def prepare(self, model: nn.Module) -> nn.Module:
        self._models.append(model)  # apex casts in amp.initialize (make_optimizer)
        return model

    def _build_optimizer(self, params_or_groups, optimizer_cls, **kwargs):
        from apex import amp

        if not self._models:
            raise UsageError("amp_backend apex: call precision.prepare(model) before make_optimizer")
        optimizer = optimizer_cls(params_or_groups, **kwargs)
        models = self._models if len(self._models) > 1 else self._models[0]
        # apex casts the models in place (same objects); it must run before DDP wraps them
        _, optimizer = amp.initialize(models, optimizer, opt_level=self.opt_level, loss_scale="dynamic", verbosity=0)
        return optimizer

    def backward(self, loss: torch.Tensor) -> None:
        from apex import amp

        with amp.scale_loss(loss, self._optimizer) as scaled:
            scaled.backward()

    def step(self, optimizer, max_grad_norm=None) -> StepResult:
        from apex import amp

        self._check_optimizer(optimizer)
        # apex finds an overflow in scale_loss's exit (in backward): it lowers the scale there and patches step()
        # to skip, which its stash records; the scale read here would already be the lowered one
        skipped = bool(getattr(getattr(optimizer, "_amp_stash", None), "already_patched", False))
        params = list(amp.master_params(optimizer))
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                         clip_value(max_grad_norm)))
        optimizer.step()  # apex patches step() to skip after an overflow
        optimizer.zero_grad(set_to_none=True)
        scale = _apex_loss_scale()
        self.skipped_steps += int(skipped)
        return StepResult(skipped=skipped, grad_norm=grad_norm, scale=scale)

    def state_dict(self) -> dict:
        from apex import amp

        return {**super().state_dict(), "apex": amp.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("apex") is not None:
            from apex import amp

            amp.load_state_dict(state["apex"])


def _apex_loss_scale() -> float:
    from apex import amp

    scalers = getattr(amp._amp_state, "loss_scalers", None) or []  # apex keeps no public getter
    return float(scalers[0].loss_scale()) if scalers else 1.0
