"""fp16 O2's fp32 master weights: distill/train/precision/masters.py on its own, then through Precision.

What a master must be: the exact fp32 value of the weight before the fp16 cast; what
the optimiser steps (the fp16 model weight is its rounding); what a checkpoint keeps;
and one value on every DDP rank (rank 0's), whatever each rank initialised.
"""

import copy
import io
import logging

import pytest
import torch
from torch import nn

from distill.common.errors import UsageError
from distill.train.precision import MasterWeights
from distill.train.precision.base import cast_to_fp16
from tests import tiny
from tests.test_precision import DEVICES, make, masters, mlm_loss, tiny_bert

FP16_EPS = torch.finfo(torch.float16).eps


def o2_pairs(model, opt):
    """(model param, optimiser param) pairs in parameter order."""
    return list(zip(model.parameters(), masters(opt)))


def cast_with_masters(model):
    """What O2's prepare does: remember each trainable fp32 value, cast to fp16 except the norms."""
    weights = MasterWeights()
    cast_to_fp16(model, keep_norms=True, before_cast=weights.remember)
    return weights


# ---------------------------------------------------------------- MasterWeights alone
def test_claim_gives_exact_fp32_masters_for_fp16_weights_and_keeps_fp32_ones_and_group_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    original = [p.detach().clone() for p in model.parameters()]
    frozen = model[2].bias
    frozen.requires_grad_(False)
    weights = cast_with_masters(model)
    groups = weights.claim([{"params": list(model[0].parameters()), "lr": 0.1},
                            {"params": list(model[1].parameters()) + list(model[2].parameters()), "lr": 0.2}])
    assert [g["lr"] for g in groups] == [0.1, 0.2]
    flat = [p for g in groups for p in g["params"]]
    for p, master, value in zip(model.parameters(), flat, original):
        assert master.dtype == torch.float32
        if p.dtype == torch.float32:  # the LayerNorm: its own master
            assert master is p
        else:
            assert master is not p and torch.equal(p, value.half())
            assert master.requires_grad == p.requires_grad
            # a trainable weight's master is its exact value; a frozen one (not remembered) its fp16 rounding
            assert torch.equal(master, value if p.requires_grad else value.half().float())
    assert [id(p) for p, _ in weights.pairs] == [id(p) for p in model.parameters() if p.dtype == torch.float16]


def test_a_weight_changed_between_prepare_and_claim_gets_a_master_of_its_new_value():
    model = nn.Linear(4, 4)
    weights = cast_with_masters(model)
    with torch.no_grad():
        model.weight.fill_(0.25)  # e.g. a DDP broadcast of rank 0's fp16 weights
    groups = weights.claim(model.parameters())
    assert torch.equal(groups[0]["params"][0], torch.full((4, 4), 0.25))


def test_claim_without_fp16_parameters_names_the_missing_prepare():
    with pytest.raises(UsageError, match=r"no fp16 parameters: call precision.prepare\(model\)"):
        MasterWeights().claim(nn.Linear(2, 2).parameters())


def test_grads_widen_into_the_masters_and_the_model_gets_the_masters_rounded():
    model = nn.Linear(4, 3)
    weights = cast_with_masters(model)
    groups = weights.claim(model.parameters())
    weights.ready()
    grads = [torch.randn_like(p, dtype=torch.float32).half() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    weights.grads_to_masters()
    for (p, master), g in zip(weights.pairs, grads):
        assert master.grad.dtype == torch.float32 and torch.equal(master.grad, g.float())
    with torch.no_grad():
        for master in groups[0]["params"]:
            master.add_(1e-3 * torch.arange(master.numel()).reshape(master.shape))  # below fp16's resolution, some
    weights.copy_to_model()
    assert all(torch.equal(p, m.half()) for p, m in weights.pairs)
    weights.zero_model_grads()
    assert all(p.grad is None for p in model.parameters())


def test_state_and_load_round_trip_and_masters_loaded_before_claim_wait_for_it():
    torch.manual_seed(1)
    source = nn.Linear(4, 3)
    src = cast_with_masters(source)
    src.claim(source.parameters())
    saved = src.state()
    assert [s.dtype for s in saved] == [torch.float32, torch.float32]
    assert all(s is not m for s, (_, m) in zip(saved, src.pairs))  # copies, not the live masters

    target = nn.Linear(4, 3)  # another init: everything must come from the saved masters
    tgt = cast_with_masters(target)
    assert tgt.state() is None
    tgt.load(saved)
    assert [torch.equal(a, b) for a, b in zip(tgt.state(), saved)] == [True, True]  # pending, reported as such
    tgt.claim(target.parameters())
    tgt.ready()
    assert all(torch.equal(m, s) for (_, m), s in zip(tgt.pairs, saved))
    assert all(torch.equal(p, s.half()) for (p, _), s in zip(tgt.pairs, saved))


@pytest.mark.parametrize("other, message", [
    (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), r"holds 2 fp32 master weights.*has 4"),
    (nn.Linear(4, 5), r"shape \(3, 4\) where this run's has \(5, 4\)"),
])
def test_loading_masters_of_another_model_is_refused(other, message):
    source = nn.Linear(4, 3)
    src = cast_with_masters(source)
    src.claim(source.parameters())
    weights = cast_with_masters(other)
    weights.claim(other.parameters())
    with pytest.raises(UsageError, match=message):
        weights.load(src.state())


def test_a_stale_master_is_reset_from_its_changed_weight_once_with_a_warning(caplog):
    model = nn.Linear(4, 3)
    weights = cast_with_masters(model)
    weights.claim(model.parameters())
    weights.ready()
    with torch.no_grad():
        model.bias.fill_(0.5)  # behind the masters' back
    with caplog.at_level(logging.WARNING, logger="distill.train.precision"):
        weights.grads_to_masters()
    assert [r.getMessage() for r in caplog.records if "masters were reset" in r.getMessage()][0].startswith(
        "precision: 1 fp16 weights")
    assert torch.equal(weights.pairs[1][1], torch.full((3,), 0.5))
    with torch.no_grad():
        model.bias.fill_(0.75)
    weights.grads_to_masters()  # checked once after the masters were set, not every step
    assert torch.equal(weights.pairs[1][1], torch.full((3,), 0.5))


# ---------------------------------------------------------------- O2 through Precision
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
    with caplog.at_level(logging.WARNING, logger="distill.train.precision"):
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


@pytest.mark.slow
def test_ddp_ranks_with_different_inits_share_rank0s_exact_masters(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["first_masters"], r0["original"]))
    assert all(torch.equal(a, b) for a, b in zip(r1["first_masters"], r0["original"]))  # not rank 1's own init
    assert all(torch.equal(a, b) for a, b in zip(r0["masters"], r1["masters"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["model"], r1["model"]))
