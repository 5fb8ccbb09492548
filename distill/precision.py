"""Mixed precision: apex's opt levels done with native torch (``torch.autocast`` + ``torch.amp.GradScaler``).

Modes (``precision`` / ``fp16_opt_level``):

* ``fp32`` (apex O0): nothing.
* ``bf16``: autocast bf16, no loss scaling. Fast on Ampere+ GPUs, and on CPUs
  with ``avx512_bf16`` or ``amx_bf16`` only (elsewhere bf16 is slower than fp32).
* ``fp16`` O1: autocast fp16, fp32 weights, dynamic loss scaling.
* ``fp16`` O2: weights in fp16 except normalisation layers, fp32 master weights
  held by the optimiser, dynamic loss scaling; forward under autocast fp16 so fp32
  norms and fp16 activations mix. The master optimiser's gradients are fp32, so
  ``torch.amp.GradScaler`` (init 2**16, backoff 0.5, growth 2 every 2000 clean
  steps: apex's dynamic scaler) does the unscale / inf check / skip / rescale.
* ``fp16`` O3: pure fp16 weights, no masters, no loss scaling (apex's O3 default
  of a static scale 1). It does not train; refused unless ``force_o3=True``.

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

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import UsageError
from .hardware import CPU_BF16_FLAGS, choose_precision, read_cpu_flags

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
OPT_LEVELS = ("O1", "O2", "O3")
BACKENDS = ("native", "apex")

# Module classes kept in fp32 under O2 ("LayerNorm and friends"); any class whose name ends in "Norm"
# (T5LayerNorm, LlamaRMSNorm, ...) counts too.
_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers, whose weights O2 keeps in fp32."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


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


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step did.

    skipped: the gradients overflowed (inf/nan) under loss scaling, so no update was made.
    grad_norm: total 2-norm of the unscaled gradients before clipping (inf/nan when skipped).
    scale: the loss scale after this step's update (the one the next backward uses); 1.0 when unscaled.
    """

    skipped: bool
    grad_norm: float
    scale: float


class Precision:
    """One object per run that owns autocast, loss scaling and (O2) the fp32 master weights.

    Build it with :meth:`from_config`. ``precision`` is the mode actually used (after
    any CPU fallback), ``opt_level`` is "O1"/"O2"/"O3" for fp16 and None otherwise,
    ``notes`` are the messages logged about the choice, ``description`` is one line
    for logs and the model card.
    """

    def __init__(self, precision: str, opt_level: str | None, device: torch.device, *, backend: str = "native",
                 init_scale: float = 2.0**16, growth_interval: int = 2000, notes: list[str] | None = None,
                 requested: str | None = None):
        self.precision = precision
        self.opt_level = opt_level if precision == "fp16" else None
        self.device = torch.device(device)
        self.backend = backend
        self.notes = list(notes or [])
        self.requested = requested or self.mode
        self.auto_reason: str | None = None  # set when precision "auto" chose this mode: the line the run prints
        self.skipped_steps = 0
        self.scaler = None
        if precision == "fp16" and self.opt_level in ("O1", "O2") and backend == "native":
            # apex's dynamic scaler: init 2**16, x0.5 on overflow, x2 after growth_interval clean steps
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale, growth_factor=2.0,
                                               backoff_factor=0.5, growth_interval=growth_interval)
        self._fp32_copy = WeakIdKeyDictionary()  # O2: fp16-cast param -> its fp32 value before prepare()
        self._optimizer = None
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # O2: (fp16 model param, fp32 master)
        self._check_pairs = False  # O2: verify model == master.half() once before the next step
        self._pending_masters = None  # O2: masters from load_state_dict() before make_optimizer()
        self._apex_models: list[nn.Module] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        precision: str,
        fp16_opt_level: str = "O2",
        *,
        device: torch.device | str,
        force_o3: bool = False,
        amp_backend: str = "native",
        allow_cpu_fp16: bool = False,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        cpu_flags: frozenset[str] | None = None,
    ) -> Precision:
        """Validate the config fields and build the Precision for ``device``.

        Raises UsageError for unknown values, O3 without ``force_o3``, fp16 on a CPU
        without bf16 instructions, and ``amp_backend="apex"`` without ``apex.amp``.
        ``cpu_flags``: the CPU's feature flags; None reads /proc/cpuinfo (tests inject a set).
        """
        device = torch.device(device)
        # "auto": the machine decides (distill.hardware); explicit choices pass through unchanged
        precision, fp16_opt_level, auto_reason = choose_precision(precision, fp16_opt_level, device.type, cpu_flags)
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} or auto "
                             "(fp32 is apex's O0; fp16 takes fp16_opt_level O1, O2 or O3)")
        level = str(fp16_opt_level).upper()
        if level not in OPT_LEVELS:
            hint = ": O0 is precision fp32" if level == "O0" else ""
            raise UsageError(f"fp16_opt_level {fp16_opt_level!r} is not one of {', '.join(OPT_LEVELS)}{hint}")
        if amp_backend not in BACKENDS:
            raise UsageError(f"amp_backend {amp_backend!r} is not one of {', '.join(BACKENDS)}")
        device = torch.device(device)
        requested = f"fp16 {level}" if precision == "fp16" else precision
        if precision == "fp16" and level == "O3" and not force_o3:
            raise UsageError(
                "fp16_opt_level O3 (pure fp16: fp16 weights and optimiser state, no master weights, no loss "
                "scaling) does not train: the seed report's O3 runs failed. Use O2 (fp16 weights with fp32 "
                "norms and fp32 master weights), or set force_o3=True to run it anyway"
            )
        if amp_backend == "apex":
            _check_apex(precision, device)
        if cpu_flags is None and device.type == "cpu":
            cpu_flags = read_cpu_flags()
        effective, notes = resolve_precision(precision, device.type, cpu_flags, allow_cpu_fp16)
        if effective == "fp16" and level == "O3":
            notes.append("fp16 O3 forced: pure fp16 weights and optimiser state without master weights or loss "
                         "scaling; expect the loss not to go down (O2 is the fp16 mode that trains)")
        if effective == "bf16" and device.type == "cuda" and torch.cuda.is_available() \
                and not torch.cuda.is_bf16_supported():
            notes.append("this GPU has no native bf16 (pre-Ampere): use --precision fp16 (O2) for speed")
        if effective != precision:  # fell back to bf16: O3 and apex no longer apply
            amp_backend = "native"
        prec = cls(effective, level, device, backend=amp_backend, init_scale=init_scale,
                   growth_interval=growth_interval, notes=notes, requested=requested)
        prec.auto_reason = auto_reason
        for note in prec.notes:
            log.warning("precision: %s", note)
        return prec

    @property
    def mode(self) -> str:
        return f"fp16 {self.opt_level}" if self.precision == "fp16" else self.precision

    @property
    def description(self) -> str:
        """One line for logs and the model card, e.g. ``fp16 O2 (native torch.amp; ...)``."""
        if self.backend == "apex":
            text = f"fp16 {self.opt_level} (NVIDIA apex.amp, dynamic loss scale)"
        else:
            text = {
                "fp32": "fp32 (O0: no autocast, no loss scaling)",
                "bf16": "bf16 (native torch.autocast bf16; fp32 weights, no loss scaling)",
                "fp16 O1": "fp16 O1 (native torch.amp; autocast fp16, fp32 weights, dynamic loss scale)",
                "fp16 O2": "fp16 O2 (native torch.amp; fp16 weights, fp32 norms and master weights, "
                           "dynamic loss scale)",
                "fp16 O3": "fp16 O3 (forced; pure fp16 weights, no master weights, no loss scaling)",
            }[self.mode]
        if self.requested != self.mode:
            text += f" [asked for {self.requested}; fp16 is a CUDA mode, so bf16 on this CPU]"
        return text

    @property
    def scales_loss(self) -> bool:
        """True when backward() scales the loss (fp16 O1/O2): overflows are then skipped steps, not errors."""
        return self.scaler is not None or self.backend == "apex"

    @property
    def loss_scale(self) -> float:
        """The current loss scale (1.0 when the mode does not scale)."""
        if self.scaler is not None:
            return float(self.scaler.get_scale())
        if self.backend == "apex":
            return _apex_loss_scale()
        return 1.0

    # ------------------------------------------------------------------ model and optimiser
    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast ``model`` in place for O2 (fp16 except norms) or O3 (all fp16); a no-op otherwise.

        Call it on every trained module (student, learned projections) after moving
        it to the device and before :meth:`make_optimizer`; wrapping in DDP may come
        after. Parameter objects are kept (``p.data`` is replaced), so tied weights
        stay tied. Under O2 the fp32 values of the cast trainable parameters are kept
        to become the exact master weights. Returns ``model``.
        """
        if self.backend == "apex":
            self._apex_models.append(model)  # apex casts in amp.initialize (make_optimizer)
            return model
        if self.mode not in ("fp16 O2", "fp16 O3"):
            return model
        keep_fp32 = set()
        if self.opt_level == "O2":
            for module in model.modules():
                if is_norm(module):
                    keep_fp32.update(id(t) for t in module.parameters())
                    keep_fp32.update(id(t) for t in module.buffers())
        with torch.no_grad():
            for module in model.modules():
                for param in module.parameters(recurse=False):
                    if id(param) in keep_fp32 or not param.is_floating_point() or param.dtype == torch.float16:
                        continue
                    if self.opt_level == "O2" and param.requires_grad:
                        self._fp32_copy[param] = param.detach().clone()
                    param.grad = None
                    param.data = param.data.to(torch.float16)
                for name, buf in module.named_buffers(recurse=False):
                    if id(buf) not in keep_fp32 and buf.is_floating_point() and buf.dtype != torch.float16:
                        setattr(module, name, buf.to(torch.float16))
        return model

    def make_optimizer(self, params_or_groups, optimizer_cls=torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
        """Build ``optimizer_cls(params_or_groups, **kwargs)``; under O2 over fp32 master weights.

        ``params_or_groups`` is what torch optimisers take: parameters, or dicts
        ``{"params": [...], **group_options}`` (e.g. the student and a projection with
        their own lr). Under O2 each fp16 parameter is replaced in its group by an fp32
        master (its exact pre-``prepare`` value); fp32 parameters (norms, unprepared
        modules) are their own masters. With torch.distributed initialised, masters are
        broadcast from rank 0, so DDP may wrap the model before or after this call.
        """
        if self._optimizer is not None:
            raise UsageError("make_optimizer was called twice on one Precision: build one optimiser per run")
        if self.backend == "apex":
            return self._apex_make_optimizer(params_or_groups, optimizer_cls, **kwargs)
        if self.mode != "fp16 O2":
            self._optimizer = optimizer_cls(params_or_groups, **kwargs)
            return self._optimizer
        groups = list(params_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        master_groups = []
        with torch.no_grad():
            for group in groups:
                params = group["params"]
                params = [params] if isinstance(params, torch.Tensor) else list(params)
                masters = []
                for param in params:
                    if param.dtype != torch.float16:
                        masters.append(param)
                        continue
                    fp32 = self._fp32_copy.pop(param, None)
                    if fp32 is None or not torch.equal(fp32.to(param.device, torch.float16), param):
                        fp32 = param.detach().float()  # changed since prepare() (e.g. a DDP broadcast)
                    master = nn.Parameter(fp32.to(param.device, torch.float32), requires_grad=param.requires_grad)
                    self._pairs.append((param, master))
                    masters.append(master)
                master_groups.append({**group, "params": masters})
        if not self._pairs:
            raise UsageError("fp16 O2: make_optimizer found no fp16 parameters: call precision.prepare(model) "
                             "before building the optimiser")
        self._fp32_copy = WeakIdKeyDictionary()  # copies not claimed by the optimiser are not needed
        self._optimizer = optimizer_cls(master_groups, **kwargs)
        if self._pending_masters is not None:
            self._load_masters(self._pending_masters)
            self._pending_masters = None
        self._broadcast_masters()
        self._copy_masters_to_model()
        self._check_pairs = True
        return self._optimizer

    # ------------------------------------------------------------------ per step
    def autocast(self):
        """Context manager for the forward pass and loss (nullcontext for fp32 and apex)."""
        if self.precision == "fp32" or self.backend == "apex":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the loss scale under fp16 O1/O2.

        Call once per micro-batch (divide the loss by the number of micro-batches
        yourself); the scale only changes in :meth:`step`, so accumulated gradients
        share one scale.
        """
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        elif self.backend == "apex":
            from apex import amp

            with amp.scale_loss(loss, self._optimizer) as scaled:
                scaled.backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> StepResult:
        """Finish one optimiser step and zero all gradients.

        fp16 O1/O2: (O2: copy the fp16 model gradients into the fp32 masters' .grad,)
        unscale, check for inf/nan, clip the total norm to ``max_grad_norm``, step, or
        on overflow skip the step and halve the scale (counted in ``skipped_steps``);
        update the scale; (O2: copy masters into the fp16 model weights). Other modes:
        clip and step. ``max_grad_norm`` None or <= 0 means no clipping.
        """
        if optimizer is not self._optimizer and self._optimizer is not None:
            raise UsageError("Precision.step got an optimiser that make_optimizer did not build")
        if self.mode == "fp16 O2" and self.backend == "native" and self._optimizer is None:
            raise UsageError("fp16 O2 needs its optimiser built by precision.make_optimizer (fp32 master weights)")
        if self.backend == "apex":
            return self._apex_step(optimizer, max_grad_norm)
        if self._check_pairs:
            self._resync_changed_masters()
        with torch.no_grad():
            for param, master in self._pairs:
                master.grad = None if param.grad is None else param.grad.float()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:  # nothing to apply (GradScaler would refuse a step with no inf check)
            self._zero_grads(optimizer)
            return StepResult(skipped=False, grad_norm=0.0, scale=self.loss_scale)
        if self.scaler is not None:
            if getattr(self.scaler, "_scale", None) is None:
                self.scaler.scale(torch.zeros((), device=params[0].device))  # no backward() yet: init its scale
            self.scaler.unscale_(optimizer)
        clip = float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(optimizer)  # skips optimizer.step() when unscale_ found inf/nan
            self.scaler.update()
            scale = self.scaler.get_scale()
            skipped = scale < scale_before  # update() only lowers the scale after an overflow
        else:
            optimizer.step()
            skipped, scale = False, 1.0
        if skipped:
            self.skipped_steps += 1
            log.info("precision: gradient overflow, step skipped; loss scale lowered to %g", scale)
        else:
            self._copy_masters_to_model()
        self._zero_grads(optimizer)
        return StepResult(skipped=skipped, grad_norm=grad_norm, scale=scale)

    def _zero_grads(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        for param, _ in self._pairs:
            param.grad = None

    # ------------------------------------------------------------------ checkpoints and export
    def state_dict(self) -> dict:
        """Scaler state, skipped-step count and (O2) the fp32 master weights, for exact resume.

        Save it next to the model's and optimiser's state dicts; the optimiser's holds
        the master weights' Adam moments but not their values.
        """
        state = {"mode": self.mode, "skipped_steps": self.skipped_steps,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {}}
        if self.mode == "fp16 O2" and self.backend == "native":
            masters = self._pending_masters if self._optimizer is None else [m.detach() for _, m in self._pairs]
            state["masters"] = [m.clone() for m in masters] if masters is not None else None
        if self.backend == "apex":
            from apex import amp

            state["apex"] = amp.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; under O2 the model's fp16 weights become the loaded masters cast to fp16.

        Call after the model's and optimiser's ``load_state_dict`` (or before
        ``make_optimizer``: the masters are then applied when it builds them).
        """
        has_masters = state.get("masters") is not None
        if (self.mode == "fp16 O2" and self.backend == "native") != has_masters:
            raise UsageError(
                f"the checkpoint's precision state is from {state.get('mode')!r} and this run is {self.mode!r}: "
                "only fp16 O2 keeps fp32 master weights, so resume with the precision the run was started with "
                "(or start a new run from the saved model weights)"
            )
        if state.get("mode") != self.mode:
            log.warning("precision: resuming a %s checkpoint as %s", state.get("mode"), self.mode)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.backend == "apex" and state.get("apex") is not None:
            from apex import amp

            amp.load_state_dict(state["apex"])
        if has_masters:
            if self._optimizer is None:
                self._pending_masters = [m.clone() for m in state["masters"]]
            else:
                self._load_masters(state["masters"])
                self._copy_masters_to_model()
                self._check_pairs = True

    def fp32_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict with every weight in fp32, O2 weights taken from their masters.

        For exporting a trained student (``save_pretrained(dir, state_dict=...)`` on an
        fp32 copy of the config): under O2 the fp16 model weights are a rounded copy.
        """
        master_of = {id(p): m for p, m in self._pairs}
        out = {}
        for name, value in model.state_dict(keep_vars=True).items():
            value = master_of.get(id(value), value)
            value = value.detach()
            out[name] = value.float() if value.is_floating_point() else value.clone()
        return out

    def export_model(self, model: nn.Module) -> nn.Module:
        """A model with fp32 weights for ``save_pretrained``: ``model`` itself when it already holds fp32
        weights, else an fp32 copy (O2: the master weights; O3: the fp16 weights widened)."""
        floating = [t for t in model.state_dict().values() if t.is_floating_point()]
        if all(t.dtype == torch.float32 for t in floating):
            return model
        state = self.fp32_state_dict(model)
        export = copy.deepcopy(model).float()
        export.load_state_dict(state)
        return export

    # ------------------------------------------------------------------ O2 helpers
    def _copy_masters_to_model(self) -> None:
        with torch.no_grad():
            for param, master in self._pairs:
                param.copy_(master)

    def _resync_changed_masters(self) -> None:
        """Before the first step after masters were set: a model weight changed behind the optimiser's back
        (e.g. ``model.load_state_dict`` after make_optimizer) wins over its stale master, loudly."""
        self._check_pairs = False
        changed = 0
        with torch.no_grad():
            differs = [(master.to(torch.float16) != param).any() for param, master in self._pairs]
            if not differs or not bool(torch.stack(differs).any()):  # one device sync, once
                return
            for (param, master), flag in zip(self._pairs, differs):
                if flag:
                    master.copy_(param.float())
                    changed += 1
        if changed:
            log.warning("precision: %d fp16 weights were changed after the optimiser was built (without "
                        "precision.load_state_dict); their fp32 masters were reset from the fp16 weights", changed)

    def _load_masters(self, masters) -> None:
        if len(masters) != len(self._pairs):
            raise UsageError(f"the checkpoint holds {len(masters)} fp32 master weights and this run's optimiser "
                             f"has {len(self._pairs)}: the model or the parameter groups differ from the saved run")
        with torch.no_grad():
            for (param, master), saved in zip(self._pairs, masters):
                if saved.shape != master.shape:
                    raise UsageError(f"a saved master weight has shape {tuple(saved.shape)} where this run's "
                                     f"has {tuple(master.shape)}: the model differs from the saved run")
                master.copy_(saved)

    def _broadcast_masters(self) -> None:
        # DDP syncs the fp16 model weights from rank 0, not the masters the optimiser holds: do that here
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for _, master in self._pairs:
                    dist.broadcast(master.data, src=0)

    # ------------------------------------------------------------------ apex (legacy, never a dependency)
    def _apex_make_optimizer(self, params_or_groups, optimizer_cls, **kwargs):
        from apex import amp

        if not self._apex_models:
            raise UsageError("amp_backend apex: call precision.prepare(model) before make_optimizer")
        optimizer = optimizer_cls(params_or_groups, **kwargs)
        models = self._apex_models if len(self._apex_models) > 1 else self._apex_models[0]
        # apex casts the models in place (same objects); it must run before DDP wraps them
        _, optimizer = amp.initialize(models, optimizer, opt_level=self.opt_level, loss_scale="dynamic", verbosity=0)
        self._optimizer = optimizer
        return optimizer

    def _apex_step(self, optimizer, max_grad_norm) -> StepResult:
        from apex import amp

        scale_before = _apex_loss_scale()
        params = list(amp.master_params(optimizer))
        clip = float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip))
        optimizer.step()  # apex patches step() to skip after an overflow
        optimizer.zero_grad(set_to_none=True)
        scale = _apex_loss_scale()
        skipped = scale < scale_before
        self.skipped_steps += int(skipped)
        return StepResult(skipped=skipped, grad_norm=grad_norm, scale=scale)


def _check_apex(precision: str, device: torch.device) -> None:
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
        raise UsageError(f"amp_backend apex runs on CUDA only (device is {device.type!r}): use amp_backend native")


def _apex_loss_scale() -> float:
    from apex import amp

    scalers = getattr(amp._amp_state, "loss_scalers", None) or []  # apex keeps no public getter
    return float(scalers[0].loss_scale()) if scalers else 1.0


__all__ = ["Precision", "StepResult", "resolve_precision", "read_cpu_flags", "is_norm",
           "PRECISIONS", "OPT_LEVELS", "BACKENDS", "CPU_BF16_FLAGS"]
