"""Mixed precision: apex's opt levels with native torch, checked on tiny CPU tensors (semantics, not speed).

fp16 on a CPU is refused by default (it crawls); these tests pass ``allow_cpu_fp16=True``
to check O1/O2 semantics. The same tests run on CUDA where a GPU is present.
"""

import copy
import io
import logging
import sys
import types

import pytest
import torch
from torch import nn

from distill.errors import UsageError
from distill.precision import Precision, StepResult, is_norm, read_cpu_flags, resolve_precision
from tests import tiny

FP16_EPS = torch.finfo(torch.float16).eps
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(precision="fp16", level="O2", device="cpu", **kw):
    kw.setdefault("allow_cpu_fp16", True)
    return Precision.from_config(precision, level, device=device, **kw)


def tiny_bert(device="cpu", seed=0):
    return tiny.build_model("bert_mlm", seed=seed).to(device).eval()  # eval: no dropout, comparable runs


def mlm_loss(model, device="cpu", seed=0):
    ids, mask = tiny.random_batch(seed=seed)
    ids, mask = ids.to(device), mask.to(device)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def masters(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def o2_pairs(model, opt):
    """(model param, optimiser param) pairs in parameter order."""
    return list(zip(model.parameters(), masters(opt)))


# ---------------------------------------------------------------- O2: dtypes and master weights
def test_o2_casts_weights_to_fp16_keeps_norms_fp32_and_masters_are_the_exact_fp32_weights():
    model = tiny_bert()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    prec = make()
    assert prec.prepare(model) is model
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            want = torch.float32 if isinstance(module, nn.LayerNorm) else torch.float16
            assert p.dtype == want, f"{name}.{pname}"
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float16
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied

    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    for (name, p), master in zip(model.named_parameters(), masters(opt)):
        assert master.dtype == torch.float32
        assert torch.equal(master, original[name]), name  # exact, not the fp16 round trip
        if p.dtype == torch.float32:
            assert master is p  # norms are their own masters
        else:
            assert master is not p and torch.equal(p, original[name].half())
    assert "fp16 O2" in prec.description and "master" in prec.description


def test_layernorm_with_fp32_weights_takes_fp16_input_under_autocast():
    # What O2 relies on: fp16 activations meet fp32 norm weights. On CUDA autocast runs layer_norm in
    # fp32 (fp32 output); on CPU it runs in fp16. Either way it must work and give fp32 weight grads.
    for device in DEVICES:
        ln = nn.LayerNorm(16).to(device)
        x = torch.randn(4, 16, device=device).half().requires_grad_()
        with torch.autocast(device, dtype=torch.float16):
            y = ln(x)
        assert y.dtype in (torch.float16, torch.float32)
        torch.testing.assert_close(y.float(), ln(x.float()), atol=5e-3, rtol=5e-3)
        y.float().pow(2).sum().backward()
        assert ln.weight.grad.dtype == torch.float32 and torch.isfinite(ln.weight.grad).all()


def test_is_norm_covers_layernorm_and_friends():
    class T5LayerNorm(nn.Module):
        pass

    assert all(is_norm(m) for m in (nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.BatchNorm1d(4), T5LayerNorm()))
    assert not any(is_norm(m) for m in (nn.Linear(4, 4), nn.Embedding(4, 4)))


@pytest.mark.parametrize("device", DEVICES)
def test_o2_step_equals_fp32_adamw_step_on_the_same_grads_to_fp16_precision(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(device)
    ref = copy.deepcopy(model)
    prec = make(device=device)
    prec.prepare(model)
    lr = 1e-2
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=lr, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.01)
    for step in range(3):
        scale = prec.loss_scale
        for p, r in zip(model.parameters(), ref.parameters()):
            g = torch.randn_like(r) * 1e-2
            r.grad = g
            p.grad = (g * scale).to(p.dtype)  # what a scaled backward leaves in the (fp16) model grads
        result = prec.step(opt, max_grad_norm=None)
        ref_opt.step()
        assert not result.skipped and result.scale == scale
        for (p, master), r in zip(o2_pairs(model, opt), ref.parameters()):
            # fp16 grads carry a relative error of eps/2; Adam's update is lr * O(1) in the grads' ratio
            torch.testing.assert_close(master, r.detach(), atol=10 * lr * FP16_EPS, rtol=0)
            assert torch.equal(p, master.to(p.dtype))  # the model holds the masters rounded to fp16
            assert p.grad is None and master.grad is None  # step() zeroes gradients
    assert opt.state[masters(opt)[0]]["step"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_o2_training_tracks_fp32_training(device):
    model, ref = tiny_bert(device), tiny_bert(device)
    prec = make(device=device)
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        with prec.autocast():
            loss = mlm_loss(model, device, seed=step)
        prec.backward(loss)
        result = prec.step(opt, max_grad_norm=1.0)
        ref_loss = mlm_loss(ref, device, seed=step)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        assert not result.skipped
        assert result.grad_norm == pytest.approx(float(ref_norm), rel=2e-2)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=5e-3)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- dynamic loss scaling
@pytest.mark.parametrize("level", ["O1", "O2"])
@pytest.mark.parametrize("overflow", ["inf_grad", "huge_loss"])
def test_overflow_skips_the_step_halves_the_scale_and_is_counted(level, overflow):
    model = tiny_bert()
    prec = make(level=level)
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    with prec.autocast():
        loss = mlm_loss(model)
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped
    before_model = [p.detach().clone() for p in model.parameters()]
    before_opt = [p.detach().clone() for p in masters(opt)]
    scale = prec.loss_scale

    with prec.autocast():
        loss = mlm_loss(model, seed=1)
    if overflow == "huge_loss":
        loss = loss * 1e30
    prec.backward(loss)
    if overflow == "inf_grad":
        model.bert.encoder.layer[0].attention.self.query.weight.grad[0, 0] = float("inf")
    result = prec.step(opt, 1.0)

    assert result.skipped and not torch.isfinite(torch.tensor(result.grad_norm))
    assert result.scale == prec.loss_scale == scale / 2
    assert prec.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before_model, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_opt, masters(opt)))
    assert all(s["step"] == 1 for s in opt.state.values())  # the optimiser did not step
    assert all(p.grad is None for p in list(model.parameters()) + masters(opt))

    with prec.autocast():
        loss = mlm_loss(model, seed=2)
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped and prec.skipped_steps == 1  # training goes on


def test_clean_steps_keep_the_scale_and_it_doubles_after_the_growth_interval():
    model = tiny_bert()
    prec = make(growth_interval=3, init_scale=2.0**10)
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    scales = []
    for step in range(4):
        with prec.autocast():
            loss = mlm_loss(model, seed=step)
        prec.backward(loss)
        scales.append(prec.step(opt, 1.0).scale)
    assert scales == [2.0**10, 2.0**10, 2.0**11, 2.0**11]
    assert prec.skipped_steps == 0


def test_gradient_accumulation_keeps_one_scale_across_micro_batches():
    model, ref = tiny_bert(), tiny_bert()
    prec = make(growth_interval=1)  # would grow at every update: accumulation must not trigger one
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    scale = prec.loss_scale
    for micro in range(3):
        with prec.autocast():
            loss = mlm_loss(model, seed=micro) / 3
        prec.backward(loss)
        (mlm_loss(ref, seed=micro) / 3).backward()
        assert prec.loss_scale == scale
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.float() / scale, r.grad, atol=2e-3, rtol=2e-2)
    result = prec.step(opt, 1.0)
    assert not result.skipped and result.scale == 2 * scale  # one update per optimiser step


def test_a_step_with_no_gradients_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    prec = make()
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    assert prec.step(opt, 1.0) == StepResult(skipped=False, grad_norm=0.0, scale=2.0**16)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


# ---------------------------------------------------------------- O1, bf16, O3
def test_o1_autocasts_matmuls_to_fp16_keeps_fp32_weights_and_scales_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    prec = make(level="O1")
    prec.prepare(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=1.0)
    assert masters(opt) == list(model.parameters())
    x = torch.randn(5, 8)
    with prec.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    prec.backward(out.float().pow(2).mean())
    ref(x).pow(2).mean().backward()
    scale = prec.loss_scale
    assert scale == 2.0**16 and prec.scales_loss
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad / scale, r.grad, atol=1e-3, rtol=1e-2)  # grads arrive scaled
    before = [p.detach().clone() for p in model.parameters()]
    assert not prec.step(opt, None).skipped
    for p, b, r in zip(model.parameters(), before, ref.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad, atol=1e-3, rtol=1e-2)  # the step used unscaled grads
    assert "O1" in prec.description


def test_bf16_autocasts_to_bf16_and_never_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    prec = Precision.from_config("bf16", device="cpu", cpu_flags=frozenset({"avx512_bf16"}))
    assert prec.scaler is None and prec.loss_scale == 1.0 and prec.opt_level is None
    assert prec.prepare(model) is model and all(p.dtype == torch.float32 for p in model.parameters())
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.randn(5, 8)
    with prec.autocast():
        out = model(x)
    assert out.dtype == torch.bfloat16
    prec.backward(out.float().pow(2).mean())
    ref(x).pow(2).mean().backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=2e-2, rtol=5e-2)  # unscaled
    ref_norm = float(torch.linalg.vector_norm(torch.stack([r.grad.norm() for r in ref.parameters()])))
    assert prec.step(opt, 1.0) == StepResult(skipped=False, grad_norm=pytest.approx(ref_norm, rel=2e-2), scale=1.0)


def test_fp32_is_plain_training():
    prec = Precision.from_config("fp32", device="cpu")
    model = nn.Linear(4, 2)
    with prec.autocast():
        assert model(torch.randn(3, 4)).dtype == torch.float32
    assert prec.loss_scale == 1.0 and not prec.scales_loss and prec.description.startswith("fp32")


def test_o3_is_refused_without_force_and_names_the_way_out():
    with pytest.raises(UsageError, match=r"O3.*does not train.*O2.*force_o3=True"):
        make(level="O3")


def test_o3_with_force_runs_pure_fp16_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="distill.precision"):
        prec = make(level="O3", force_o3=True)
    assert any("O3 forced" in r.getMessage() for r in caplog.records)
    assert any("O3 forced" in note for note in prec.notes)
    model = prec.prepare(tiny_bert())
    assert all(p.dtype == torch.float16 for p in model.parameters())  # norms too
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=1e-3)
    assert masters(opt) == list(model.parameters()) and prec.loss_scale == 1.0
    with prec.autocast():
        loss = mlm_loss(model)
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped
    assert "O3" in prec.description


# ---------------------------------------------------------------- fp16 on a CPU, device decisions
@pytest.mark.parametrize(
    "precision, device, flags, allow, want, note",
    [
        ("fp16", "cpu", {"avx2", "avx512_bf16"}, False, "bf16", "75x"),
        ("fp16", "cpu", {"amx_bf16"}, False, "bf16", "bf16 autocast instead"),
        ("fp16", "cpu", {"avx2"}, True, "fp16", "allow_cpu_fp16"),
        ("fp16", "cuda", None, False, "fp16", None),
        ("bf16", "cpu", {"avx512_bf16"}, False, "bf16", None),
        ("bf16", "cpu", {"avx2"}, False, "bf16", "slower than fp32"),
        ("bf16", "cpu", None, False, "bf16", "could not read"),
        ("fp32", "cpu", set(), False, "fp32", None),
    ],
)
def test_resolve_precision_decides_from_the_device_and_cpu_flags(precision, device, flags, allow, want, note):
    got, notes = resolve_precision(precision, device, None if flags is None else frozenset(flags), allow)
    assert got == want
    assert (note is None and notes == []) or any(note in n for n in notes)


@pytest.mark.parametrize("flags, why", [({"avx2", "avx512f"}, "no bf16 instructions"), (None, "could not read")])
def test_fp16_on_a_cpu_without_bf16_stops_with_a_clear_message(flags, why):
    with pytest.raises(UsageError, match=rf"fp16 on a CPU.*75x slower.*{why}.*--precision fp32"):
        resolve_precision("fp16", "cpu", None if flags is None else frozenset(flags))
    if flags is not None:
        with pytest.raises(UsageError, match="75x slower"):
            Precision.from_config("fp16", "O2", device="cpu", cpu_flags=frozenset(flags))


def test_fp16_asked_on_a_bf16_cpu_falls_back_to_bf16_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="distill.precision"):
        prec = Precision.from_config("fp16", "O2", device="cpu", cpu_flags=frozenset({"avx512_bf16"}))
    assert prec.precision == "bf16" and prec.scaler is None and prec.opt_level is None
    assert "asked for fp16 O2" in prec.description
    assert any("bf16 autocast instead" in r.getMessage() for r in caplog.records)
    model = prec.prepare(nn.Linear(4, 4))
    assert model.weight.dtype == torch.float32
    with prec.autocast():
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16


def test_read_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= read_cpu_flags(str(x86))
    assert "bf16" in read_cpu_flags(str(arm))
    assert read_cpu_flags(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------- bad config values, apex
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision="fp8"), r"precision 'fp8' is not one of fp32, bf16, fp16"),
        (dict(precision="fp16", fp16_opt_level="O4"), r"fp16_opt_level 'O4' is not one of O1, O2, O3"),
        (dict(precision="fp16", fp16_opt_level="O0"), r"O0 is precision fp32"),
        (dict(precision="fp16", amp_backend="deepspeed"), r"amp_backend 'deepspeed' is not one of native, apex"),
    ],
)
def test_unknown_values_are_refused_naming_the_valid_ones(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Precision.from_config(device="cpu", allow_cpu_fp16=True, **kwargs)


@pytest.mark.parametrize("fake_apex", [None, types.ModuleType("apex")])  # not installed / the unrelated PyPI apex
def test_apex_backend_without_apex_amp_is_refused_clearly(monkeypatch, fake_apex):
    monkeypatch.setitem(sys.modules, "apex", fake_apex)
    monkeypatch.delitem(sys.modules, "apex.amp", raising=False)
    with pytest.raises(UsageError, match=r"apex\.amp.*removed.*2025.*amp_backend native"):
        Precision.from_config("fp16", "O2", device="cuda", amp_backend="apex")


def test_apex_backend_when_apex_amp_exists_goes_through_amp(monkeypatch):
    # A stand-in for legacy NVIDIA apex (cannot be installed here): checks the wiring only.
    calls = []

    class Scaler:
        value = 2.0**16

        def loss_scale(self):
            return self.value

    amp = types.ModuleType("apex.amp")
    amp._amp_state = types.SimpleNamespace(loss_scalers=[Scaler()])

    def initialize(models, optimizer, opt_level, **kw):
        calls.append(("initialize", opt_level))
        return models, optimizer

    class ScaleLoss:
        def __init__(self, loss, optimizer):
            self.loss = loss

        def __enter__(self):
            calls.append("scale_loss")
            return self.loss

        def __exit__(self, *exc):
            return False

    amp.initialize, amp.scale_loss = initialize, ScaleLoss
    amp.master_params = lambda opt: (p for g in opt.param_groups for p in g["params"])
    amp.state_dict, amp.load_state_dict = (lambda: {"loss_scaler0": 1.0}), (lambda d: calls.append("load"))
    apex = types.ModuleType("apex")
    apex.amp = amp
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.amp", amp)

    with pytest.raises(UsageError, match="CUDA only"):
        Precision.from_config("fp16", "O2", device="cpu", amp_backend="apex")
    prec = Precision.from_config("fp16", "O2", device="cuda", amp_backend="apex")
    assert "apex" in prec.description and prec.scaler is None
    model = prec.prepare(nn.Linear(4, 2))
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with prec.autocast():
        loss = model(torch.randn(3, 4)).pow(2).mean()
    prec.backward(loss)
    result = prec.step(opt, 1.0)
    assert calls == [("initialize", "O2"), "scale_loss"]
    assert not result.skipped and result.scale == 2.0**16 and model.weight.grad is None
    prec.load_state_dict(prec.state_dict())
    assert calls[-1] == "load"


# ---------------------------------------------------------------- resume, groups, DDP, export
@pytest.mark.parametrize("load_before_make_optimizer", [False, True])
def test_state_dict_round_trip_gives_an_identical_next_step(load_before_make_optimizer):
    model = tiny_bert()
    prec = make(growth_interval=2, init_scale=2.0**12)
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    for step in range(3):
        with prec.autocast():
            loss = mlm_loss(model, seed=step)
        if step == 1:
            loss = loss * 1e30  # one skipped step, so the counter and scale are non-trivial
        prec.backward(loss)
        prec.step(opt, 1.0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "precision": prec.state_dict()}, buf)

    model2 = tiny_bert(seed=1)  # different weights: everything must come from the checkpoint
    prec2 = make(growth_interval=2, init_scale=2.0**12)
    prec2.prepare(model2)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    if load_before_make_optimizer:
        prec2.load_state_dict(ckpt["precision"])
    opt2 = prec2.make_optimizer(model2.parameters(), torch.optim.AdamW, lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    if not load_before_make_optimizer:
        prec2.load_state_dict(ckpt["precision"])
    assert all(torch.equal(a, b) for a, b in zip(masters(opt), masters(opt2)))
    assert all(torch.equal(p, m.to(p.dtype)) for p, m in o2_pairs(model2, opt2))
    assert (prec2.loss_scale, prec2.skipped_steps) == (prec.loss_scale, prec.skipped_steps) == (2.0**11, 1)

    results = []
    for p, m, o in ((prec, model, opt), (prec2, model2, opt2)):
        with p.autocast():
            loss = mlm_loss(m, seed=7)
        p.backward(loss)
        results.append(p.step(o, 1.0))
    assert results[0] == results[1]
    assert all(torch.equal(a, b) for a, b in zip(masters(opt), masters(opt2)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_loading_a_checkpoint_of_another_master_layout_is_refused():
    prec = make()
    with pytest.raises(UsageError, match="only fp16 O2 keeps fp32 master weights"):
        prec.load_state_dict(make(level="O1").state_dict())


def test_param_groups_of_student_and_projection_keep_their_options():
    student, projection = tiny_bert(), nn.Linear(32, 48)
    prec = make()
    prec.prepare(student)  # the projection is left fp32: it is its own master
    opt = prec.make_optimizer(
        [{"params": student.parameters(), "lr": 1e-3}, {"params": projection.parameters(), "lr": 1e-2}],
        torch.optim.AdamW, weight_decay=0.0,
    )
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert opt.param_groups[1]["params"] == list(projection.parameters())
    assert all(p.dtype == torch.float32 for p in masters(opt))
    before = projection.weight.detach().clone()
    ids, mask = tiny.random_batch()
    with prec.autocast():
        hidden = student.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = projection(hidden).float().pow(2).mean()
    prec.backward(loss)
    assert not prec.step(opt, 1.0).skipped
    assert not torch.equal(before, projection.weight)


def test_a_weight_changed_after_make_optimizer_resets_its_master_with_a_warning(caplog):
    model, other = tiny_bert(), tiny_bert(seed=3)
    prec = make()
    prec.prepare(model)
    prec.prepare(other)
    opt = prec.make_optimizer(model.parameters(), torch.optim.SGD, lr=0.0)
    model.load_state_dict(other.state_dict())  # behind the optimiser's back
    with prec.autocast():
        loss = mlm_loss(model)
    prec.backward(loss)
    with caplog.at_level(logging.WARNING, logger="distill.precision"):
        prec.step(opt, 1.0)
    assert any("masters were reset" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))  # not reverted


def test_export_takes_the_fp32_master_weights():
    model = tiny_bert()
    prec = make()
    prec.prepare(model)
    opt = prec.make_optimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    with prec.autocast():
        loss = mlm_loss(model)
    prec.backward(loss)
    prec.step(opt, 1.0)
    state = prec.fp32_state_dict(model)
    assert set(state) == set(model.state_dict())
    params = dict(model.named_parameters())
    for (name, _), master in zip(model.named_parameters(), masters(opt)):
        assert torch.equal(state[name], master)
    assert all(v.dtype == torch.float32 for k, v in state.items() if v.is_floating_point())
    assert torch.equal(state["cls.predictions.decoder.weight"], state["bert.embeddings.word_embeddings.weight"])
    assert params["bert.embeddings.LayerNorm.weight"].dtype == torch.float32

    export = prec.export_model(model)
    assert export is not model and model.bert.embeddings.word_embeddings.weight.dtype == torch.float16
    assert all(torch.equal(export.state_dict()[k], v) for k, v in state.items())
    assert export.cls.predictions.decoder.weight is export.bert.embeddings.word_embeddings.weight  # still tied
    fp32_model = nn.Linear(2, 2)
    assert make(level="O1").export_model(fp32_model) is fp32_model  # already fp32: no copy


def test_prepared_model_can_be_wrapped_in_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_bert()
        prec = make()
        ddp = DDP(prec.prepare(model))
        opt = prec.make_optimizer(ddp.parameters(), torch.optim.AdamW, lr=1e-3)
        ids, mask = tiny.random_batch()
        for micro in range(2):
            sync = ddp.no_sync() if micro == 0 else torch.enable_grad()
            with sync, prec.autocast():
                loss = ddp(input_ids=ids, attention_mask=mask, labels=ids).loss / 2
            prec.backward(loss)
        assert model.bert.encoder.layer[0].output.dense.weight.grad.dtype == torch.float16
        assert not prec.step(opt, 1.0).skipped
        assert all(torch.equal(p, m.to(p.dtype)) for p, m in o2_pairs(model, opt))
    finally:
        dist.destroy_process_group()


def _two_rank_worker(rank, store, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # each rank initialises differently (nanoGPT seeds by rank)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        original = [p.detach().clone() for p in model.parameters()]
        prec = make()
        ddp = DDP(prec.prepare(model))  # DDP broadcasts rank 0's fp16 weights, not the fp32 masters
        opt = prec.make_optimizer(ddp.parameters(), torch.optim.AdamW, lr=1e-2)
        first_masters = [m.detach().clone() for m in masters(opt)]
        with prec.autocast():
            loss = ddp(torch.randn(4, 8)).float().pow(2).mean()
        prec.backward(loss)
        prec.step(opt, 1.0)
        torch.save({"original": original, "first_masters": first_masters, "masters": masters(opt),
                    "model": list(model.parameters())}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_with_different_inits_share_rank0s_exact_masters(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["first_masters"], r0["original"]))
    assert all(torch.equal(a, b) for a, b in zip(r1["first_masters"], r0["original"]))  # not rank 1's own init
    assert all(torch.equal(a, b) for a, b in zip(r0["masters"], r1["masters"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["model"], r1["model"]))
