"""The objective: weights, layer maps, what it asks the models for, and end-to-end values on tiny models."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoConfig, BertForSequenceClassification

from distill.common.errors import UsageError
from distill.models.loading import Features, extract
from distill.objective import losses
from distill.objective.plan import TERMS, Objective, Request
from tests import tiny

DISTANCES = ("kl", "out_mse", "cos", "hid_mse", "emb_mse", "att_mse", "att_kl", "val_kl")


def build(kind, seed=0, **overrides):
    """A tiny random model in eval mode with eager attention (the only kind that returns attention weights)."""
    return tiny.build_model(kind, seed=seed, _attn_implementation="eager", **overrides).eval()


@pytest.fixture(scope="module")
def teacher():
    return build("bert_mlm")  # 4 layers, width 32, 4 heads


@pytest.fixture(scope="module")
def student():
    return build("bert_mlm", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def narrow_student():
    return build("bert_mlm", seed=2, num_hidden_layers=2, hidden_size=16, intermediate_size=32)


def make_batch(seed=0):
    ids, mask = tiny.random_batch(batch=3, seq=12, seed=seed)
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    targets[:, 0] = False
    targets[0, 3] = True
    return {"input_ids": ids, "attention_mask": mask, "mlm_labels": torch.where(targets, ids, -100)}


def features(objective, student, teacher, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
    s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
    return s, t


def run(objective, student, teacher, batch):
    return objective(*features(objective, student, teacher, batch), batch)


def make(weights, student, teacher, **kwargs):
    kwargs.setdefault("student_layers", [2, 4] if student.config.num_hidden_layers == 2 else None)
    return Objective.from_config(weights, kwargs.pop("temperature", 2.0), student_config=student,
                                 teacher_config=teacher, **kwargs)


def spy_base_model(model):
    """Record the keyword arguments every forward of the model's encoder receives."""
    calls = []
    handle = model.base_model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(dict(kw)), with_kwargs=True)
    return calls, handle


# ---------------------------------------------------------------------------------------------
# combination


def float64_outputs(model, batch):
    """A float64 copy of ``model`` run on the whole batch: logits ``[B, S, V]``, hidden states, attentions and
    every layer's value vectors ``[B, heads, S, d]`` (computed from the layer's input, not captured by hooks)."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    output_attentions=True)
        heads = model.config.num_attention_heads
        values = {}
        for i, layer in enumerate(model.bert.encoder.layer, start=1):
            v = layer.attention.self.value(out.hidden_states[i - 1])
            values[i] = v.view(*v.shape[:2], heads, -1).transpose(1, 2)
    return out.logits, out.hidden_states, out.attentions, values


def reference_terms(student, teacher, batch, T, s_layers, t_layers):
    """Each term of the objective's table, written from its formula in float64 (no distill.objective.losses call)."""
    zs, hs, a_s, vs = float64_outputs(student, batch)
    zt, ht, a_t, vt = float64_outputs(teacher, batch)
    real = batch["attention_mask"].bool()
    labels = batch["mlm_labels"]
    target = (labels != -100) & real
    pairs = list(zip(s_layers, t_layers))
    valid = real[:, None, :, None] & real[:, None, None, :]  # [B, 1, S, S]: query and key both real
    rows = real[:, None, :].expand(-1, a_s[0].shape[1], -1)  # [B, heads, S]

    def log_softmax(z):
        return z - z.logsumexp(-1, keepdim=True)

    log_ps, log_pt = log_softmax(zs[real] / T), log_softmax(zt[real] / T)
    ce = T * T * (-(log_pt.exp() * log_ps).sum(-1)).mean()
    kl = T * T * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    mlm = -log_softmax(zs[target]).gather(-1, labels[target][:, None]).mean()
    out_mse = ((zs[real] - zt[real]) ** 2).mean()
    u, v = hs[-1][real], ht[-1][real]
    cos = (1 - (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))).mean()
    hid = torch.stack([((hs[i][real] - ht[j][real]) ** 2).mean() for i, j in pairs]).mean()
    emb = ((hs[0][real] - ht[0][real]) ** 2).mean()
    att_mse = torch.stack([((a_s[i - 1] - a_t[j - 1]) ** 2)[valid.expand_as(a_s[i - 1])].mean()
                           for i, j in pairs]).mean()

    def row_kl(p, q):  # KL(p || q) per query row over real keys, then the mean over real rows and heads
        per_key = torch.where(valid, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0)
        return per_key.sum(-1)[rows].mean()

    att_kl = torch.stack([row_kl(a_t[j - 1], a_s[i - 1]) for i, j in pairs]).mean()

    def relations(x):  # softmax over real keys of V V^T / sqrt(d)
        scores = (x @ x.transpose(-1, -2)) / math.sqrt(x.shape[-1])
        return scores.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)

    val_kl = row_kl(relations(vt[len(ht) - 1]), relations(vs[len(hs) - 1]))
    return {"ce": ce, "kl": kl, "mlm": mlm, "cos": cos, "hid_mse": hid, "emb_mse": emb, "att_mse": att_mse,
            "att_kl": att_kl, "val_kl": val_kl, "out_mse": out_mse}


def test_total_is_the_weighted_sum_of_independent_float64_terms(student, teacher):
    weights = {"ce": 5.0, "kl": 0.5, "mlm": 2.0, "cos": 1.0, "hid_mse": 0.3, "emb_mse": 0.7,
               "att_mse": 3.0, "att_kl": 0.2, "val_kl": 0.9, "out_mse": 0.1}
    objective = make(weights, student, teacher)  # student layers 1, 2 <-> teacher layers 2, 4
    batch = make_batch()
    total, terms = run(objective, student, teacher, batch)
    assert list(terms) == list(weights)  # logs name terms by their config keys
    assert all(not terms[n].requires_grad and terms[n].dtype == torch.float32 for n in weights)
    assert total.requires_grad and total.dtype == torch.float32
    reference = reference_terms(student, teacher, batch, 2.0, [1, 2], [2, 4])
    assert all(float(reference[n]) > 0 for n in weights), reference  # different random models: no term is 0
    expected = sum(w * float(reference[n]) for n, w in weights.items())
    assert float(total.detach()) == pytest.approx(expected, rel=2e-5)
    for name in weights:  # float32 roundoff only: the smallest terms (KL of near-equal maps) lose a few digits
        assert float(terms[name]) == pytest.approx(float(reference[name]), rel=1e-3), name
    # Fed float64 models, the objective keeps float64 (the losses widen, never narrow): then every term agrees
    # with the reference to float64 precision, which no float32 roundoff could explain away.
    total64, terms64 = run(objective, copy.deepcopy(student).double(), copy.deepcopy(teacher).double(), batch)
    for name in weights:
        assert float(terms64[name]) == pytest.approx(float(reference[name]), rel=1e-9), name
    assert float(total64.detach()) == pytest.approx(expected, rel=1e-9)


def test_term_values_are_the_loss_functions_on_the_right_layers(student, teacher):
    batch = make_batch(1)
    objective = make({"hid_mse": 1, "att_kl": 1, "cos": 1, "emb_mse": 1, "val_kl": 1}, student, teacher,
                     student_layers=[2, 4])
    s, t = features(objective, student, teacher, batch)
    _, terms = objective(s, t, batch)
    m = batch["attention_mask"]
    # student layer i <-> teacher layer student_layers[i-1]; hidden_states[0] is the embedding output
    hid = (losses.hidden_mse(s.hidden_states[1], t.hidden_states[2], m)
           + losses.hidden_mse(s.hidden_states[2], t.hidden_states[4], m)) / 2
    att = (losses.attention_kl(s.attentions[0], t.attentions[1], m)
           + losses.attention_kl(s.attentions[1], t.attentions[3], m)) / 2
    assert torch.allclose(terms["hid_mse"], hid.detach(), rtol=1e-6)
    assert torch.allclose(terms["att_kl"], att.detach(), rtol=1e-6)
    assert torch.allclose(terms["cos"], losses.cosine_loss(s.hidden_states[-1], t.hidden_states[-1], m).detach())
    assert torch.allclose(terms["emb_mse"], losses.hidden_mse(s.hidden_states[0], t.hidden_states[0], m).detach())
    assert torch.allclose(terms["val_kl"], losses.value_relation_kl(s.values[2], t.values[4], m).detach())


def test_explicit_layer_map_overrides_the_default_and_attention_skips_embeddings(student, teacher):
    objective = make({"hid_mse": 1, "att_mse": 1}, student, teacher, student_layers=[2, 4],
                     layer_map=[[0, 0], [1, 1], [2, 3]])
    assert objective.layer_pairs["hid_mse"] == ((0, 0), (1, 1), (2, 3))
    assert objective.layer_pairs["att_mse"] == ((1, 1), (2, 3))
    default = make({"hid_mse": 1, "att_mse": 1, "cos": 1}, student, teacher, student_layers=[1, 3])
    assert default.layer_pairs == {"hid_mse": ((1, 1), (2, 3)), "att_mse": ((1, 1), (2, 3)), "cos": ((2, 4),)}


# ---------------------------------------------------------------------------------------------
# what the models are asked for


def test_zero_weight_terms_are_dropped_and_their_tensors_never_requested(student, teacher):
    objective = make({"ce": 1, "mlm": 1, "att_mse": 0, "att_kl": 0, "hid_mse": 0, "val_kl": 0, "cos": 0},
                     student, teacher)
    assert list(objective.weights) == ["ce", "mlm"]
    assert objective.requests() == {
        "student": Request(hidden=False, attentions=False, value_layers=(), logits="real"),
        "teacher": Request(hidden=False, attentions=False, value_layers=(), logits="real"),
    }
    assert not objective.needs_attention
    batch = make_batch()
    calls_s, hs = spy_base_model(student)
    calls_t, ht = spy_base_model(teacher)
    try:
        s, t = features(objective, student, teacher, batch)
        _, terms = objective(s, t, batch)
        # the spy can tell: an attention term makes the same models compute attentions
        on = make({"att_mse": 1}, student, teacher)
        features(on, student, teacher, batch)
    finally:
        hs.remove()
        ht.remove()
    assert set(terms) == {"ce", "mlm"}
    for calls in (calls_s, calls_t):
        assert [c["output_attentions"] for c in calls] == [False, True]
        assert [c["output_hidden_states"] for c in calls] == [False, False]
    assert s.attentions is None and s.hidden_states is None and s.values == {} and t.values == {}


def test_requests_follow_the_active_terms(student, teacher):
    val = make({"val_kl": 1}, student, teacher)
    assert val.requests()["student"] == Request(value_layers=(2,))
    assert val.requests()["teacher"] == Request(value_layers=(4,), depth=4)  # its last layer: it runs whole
    assert not val.needs_attention  # value vectors are not touched by attention dropout
    att = make({"att_kl": 1}, student, teacher)
    # eager attention only on the mapped teacher layers; nothing deeper than layer 4 is read
    assert att.needs_attention and att.requests()["teacher"] == Request(attentions=True, attention_layers=(2, 4),
                                                                        depth=4)
    assert make({"att_kl": 1}, student, teacher, student_layers=[1, 2]).requests()["teacher"].depth == 2
    mlm_only = make({"mlm": 1}, student, teacher)
    assert mlm_only.requests() == {"student": Request(logits="masked"), "teacher": Request()}
    assert not mlm_only.needs_teacher and att.needs_teacher


def test_positions_real_tokens_masked_targets_or_none(student, teacher):
    batch = make_batch()
    real = batch["attention_mask"].bool()
    targets = batch["mlm_labels"] != -100
    assert not real[2, -1]
    batch["mlm_labels"][2, -1] = 7  # a label in the padding (a data bug) must not become a position
    ce = make({"ce": 5, "mlm": 2}, student, teacher)
    assert torch.equal(ce.positions(batch, "student"), real)
    assert torch.equal(ce.positions(batch, "teacher"), real)
    restricted = make({"ce": 5, "mlm": 2}, student, teacher, restrict_ce_to_mask=True)
    assert torch.equal(restricted.positions(batch, "student"), targets)
    assert torch.equal(restricted.positions(batch, "teacher"), targets)
    mlm_only = make({"mlm": 1}, student, teacher)
    assert torch.equal(mlm_only.positions(batch, "student"), targets)
    assert mlm_only.positions(batch, "teacher") is None
    assert make({"cos": 1}, student, teacher).positions(batch, "student") is None


@pytest.mark.parametrize("restrict", [False, True])
def test_gathered_logits_and_labels_line_up_with_the_full_model_output(student, teacher, restrict):
    """ce/kl/mlm through positions + gathering equal the losses on the models' full [B, S, V] logits."""
    batch = make_batch(2)
    objective = make({"ce": 1, "kl": 1, "mlm": 1}, student, teacher, restrict_ce_to_mask=restrict)
    _, terms = run(objective, student, teacher, batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["mlm_labels"]
    with torch.no_grad():
        zs = student(input_ids=ids, attention_mask=mask).logits
        zt = teacher(input_ids=ids, attention_mask=mask).logits
    keep = (labels != -100) if restrict else mask
    assert torch.allclose(terms["ce"], losses.soft_cross_entropy(zs, zt, 2.0, keep), rtol=1e-5)
    assert torch.allclose(terms["kl"], losses.kl_divergence(zs, zt, 2.0, keep), rtol=1e-5)
    assert torch.allclose(terms["mlm"], losses.mlm_loss(zs, labels), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# end to end: a student that is the teacher


@pytest.mark.parametrize("kind", ["bert_mlm", "distilbert_mlm"])
def test_a_student_that_is_the_teacher_has_zero_distance_terms(kind):
    model = build(kind)
    batch = make_batch(3)
    weights = {"ce": 1, "mlm": 1, **{name: 1 for name in DISTANCES}}
    objective = Objective.from_config(weights, 2.0, student_config=model, teacher_config=model,
                                      student_layers=[1, 2, 3, 4])
    _, terms = run(objective, model, model, batch)
    for name in DISTANCES:
        assert abs(float(terms[name])) < 1e-6, (name, float(terms[name]))
    # ce is then the teacher's tempered entropy times T^2, computed here from the full logits
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double() / 2.0
    p = z.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[batch["attention_mask"].bool()].mean()
    assert float(terms["ce"]) == pytest.approx(4.0 * float(entropy), rel=1e-5)


@pytest.mark.parametrize("layers", [[1, 2, 4], [1, 3], [2, 4], [1, 2, 3, 4]])
def test_self_copy_pairs_are_exactly_the_pairs_a_fresh_copy_already_matches(teacher, layers):
    from distill.models.student import build_student

    student, _ = build_student(teacher, layers)
    objective = make({"hid_mse": 1.0, "att_mse": 1.0, "cos": 1.0}, student, teacher, student_layers=layers)
    batch = make_batch(5)
    with torch.no_grad():
        s, t = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                  output_attentions=True) for m in (student, teacher))
    # measured: which mapped pairs start equal (hidden states include the embedding output at index 0)
    equal_hidden = tuple((i, j) for i, j in objective.layer_pairs["hid_mse"] if i >= 1
                         and torch.allclose(s.hidden_states[i], t.hidden_states[j], atol=1e-6))
    equal_att = tuple((i, j) for i, j in objective.layer_pairs["att_mse"]
                      if torch.allclose(s.attentions[i - 1], t.attentions[j - 1], atol=1e-6))
    expected = {name: pairs for name, pairs in (("hid_mse", equal_hidden), ("att_mse", equal_att)) if pairs}
    assert objective.self_copy_pairs(layers) == expected
    assert "cos" not in objective.self_copy_pairs(layers)  # a last-layer term, not a mapped one


def test_electra_discriminator_terms_end_to_end():
    model = build("electra_disc")
    other = build("electra_disc", seed=5)
    batch = make_batch(4)
    g = torch.Generator().manual_seed(0)
    batch["replaced_labels"] = (torch.rand(batch["input_ids"].shape, generator=g) < 0.2).long()
    objective = Objective.from_config({"rtd": 1, "rtd_kl": 1, "out_mse": 1}, 2.0, student_config=other,
                                      teacher_config=model)
    assert objective.requests()["student"] == Request(logits="real")
    _, terms = run(objective, other, model, batch)
    mask = batch["attention_mask"]
    with torch.no_grad():
        zs = other(input_ids=batch["input_ids"], attention_mask=mask).logits
        zt = model(input_ids=batch["input_ids"], attention_mask=mask).logits
    assert torch.allclose(terms["rtd"], losses.rtd_loss(zs, batch["replaced_labels"], mask), rtol=1e-5)
    assert torch.allclose(terms["rtd_kl"], losses.rtd_kl(zs, zt, 2.0, mask), rtol=1e-5)
    assert float(terms["rtd_kl"]) > 0
    same = Objective.from_config({"rtd_kl": 1, "out_mse": 1}, 2.0, student_config=model, teacher_config=model)
    _, zero = run(same, model, model, batch)
    assert float(zero["rtd_kl"]) < 1e-7 and float(zero["out_mse"]) < 1e-10


# ---------------------------------------------------------------------------------------------
# widths and projections


def test_width_mismatch_without_projection_is_a_clear_error(narrow_student, teacher):
    for term in ("hid_mse", "cos", "emb_mse"):
        with pytest.raises(UsageError, match=rf"'{term}'.*16 wide and the teacher 32.*projection: true"):
            make({term: 1}, narrow_student, teacher, projection=False)
    # the declared default (the recipe's) learns the projection
    assert set(make({"cos": 1}, narrow_student, teacher).projections) == {"cos"}


def test_projection_is_a_trained_objective_parameter_not_a_student_one(narrow_student, teacher):
    objective = make({"hid_mse": 1, "cos": 1, "att_mse": 1}, narrow_student, teacher, projection=True)
    assert set(objective.projections) == {"hid_mse", "cos"}
    assert tuple(objective.projections["hid_mse"].weight.shape) == (32, 16)
    assert {"projections.hid_mse.weight", "projections.cos.bias"} <= set(objective.state_dict())
    assert not any(k.startswith("projections") for k in narrow_student.state_dict())

    batch = make_batch(5)
    s, t = features(objective, narrow_student, teacher, batch)
    # Fixed student features: only the projection can lower the loss below.
    s = Features(hidden_states=tuple(h.detach() for h in s.hidden_states),
                 attentions=tuple(a.detach() for a in s.attentions))
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.05)
    first, _ = objective(s, t, batch)
    first.backward()
    weight = objective.projections["hid_mse"].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    for _ in range(20):
        optimizer.zero_grad()
        loss, _ = objective(s, t, batch)
        loss.backward()
        optimizer.step()
    assert float(objective(s, t, batch)[0].detach()) < 0.9 * float(first.detach())

    # garbage in the padding reaches neither the value nor the projection's gradient
    pad = batch["attention_mask"] == 0
    dirty = Features(hidden_states=tuple(h.masked_fill(pad[..., None], float("nan")) for h in s.hidden_states),
                     attentions=s.attentions)
    objective.zero_grad()
    loss, _ = objective(dirty, t, batch)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all()
    assert float(loss.detach()) == pytest.approx(float(objective(s, t, batch)[0].detach()), rel=1e-6)


def test_objective_runs_in_float32_under_autocast(narrow_student, teacher):
    objective = make({"hid_mse": 1, "cos": 1, "val_kl": 1}, narrow_student, teacher, projection=True)
    batch = make_batch(6)
    s, t = features(objective, narrow_student, teacher, batch)
    want, _ = objective(s, t, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = objective(s, t, batch)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_attention_terms_need_equal_head_counts(teacher):
    two_heads = build("bert_mlm", seed=3, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(UsageError, match="'att_mse'.*2 heads.*teacher 4"):
        make({"att_mse": 1}, two_heads, teacher)


# ---------------------------------------------------------------------------------------------
# configuration errors: one clear line each


@pytest.mark.parametrize(
    "weights,temperature,message",
    [
        ({"ce": 1, "ce_loss": 1}, 2.0, "unknown loss term 'ce_loss': valid terms are " + ", ".join(TERMS)),
        ({"ce": -1}, 2.0, "weight of 'ce' is -1.*>= 0"),
        ({"ce": "5"}, 2.0, "weight of 'ce' is '5'"),
        ({"ce": float("nan")}, 2.0, "weight of 'ce' is nan"),
        ({"ce": 0, "mlm": 0.0}, 2.0, "all loss weights are zero"),
        ({}, 2.0, "non-empty"),
        ({"ce": 1}, 0.0, r"temperature=0.0 is out of range: it must be a finite number in \(0, 100\]"),
        ({"ce": 1}, -2, "temperature=-2 is out of range"),
        ({"ce": 1}, float("inf"), "temperature=inf is out of range"),
    ],
)
def test_bad_weights_and_temperature(student, teacher, weights, temperature, message):
    with pytest.raises(UsageError, match=message):
        make(weights, student, teacher, temperature=temperature)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer_map": [[3, 4]]}, "layer map entry 3->4: student layer 3 does not exist.*student has 2 layers"),
        ({"layer_map": [[1, 5]]}, "layer map entry 1->5: teacher layer 5 does not exist.*teacher has 4 layers"),
        ({"layer_map": [[1, -1]]}, "teacher layer -1 does not exist"),
        ({"layer_map": [[1]]}, r"layer map entry \[1\] is not a \[student_layer, teacher_layer\] pair"),
        ({"student_layers": [1, 5]}, "layer 5 is out of range: the teacher has 4 layers"),
        ({"student_layers": [1, 2, 4]}, "name 3 teacher layers but the student has 2"),
        ({"student_layers": None}, "'hid_mse' compares intermediate layers but no layer map was given"),
    ],
)
def test_bad_layer_maps_name_the_index(student, teacher, kwargs, message):
    with pytest.raises(UsageError, match=message):
        make({"hid_mse": 1}, student, teacher, **kwargs)


def test_a_teacher_without_mlm_head_is_rejected_for_output_terms_with_a_suggestion(bert_base_dir, student):
    base = AutoConfig.from_pretrained(bert_base_dir)  # a BertModel checkpoint, like all-MiniLM-L6-v2
    for term in ("ce", "kl", "out_mse"):
        with pytest.raises(UsageError, match=rf"'{term}' needs a masked-LM head.*teacher \(BertModel\) has none.*cos"):
            Objective.from_config({term: 1}, student_config=student, teacher_config=base, student_layers=[2, 4])
    with pytest.raises(UsageError, match=r"'mlm' needs a masked-LM head on the student.*BertModel"):
        Objective.from_config({"mlm": 1}, student_config=build("bert_base"), teacher_config=base)
    fine = Objective.from_config({"cos": 1, "hid_mse": 1, "att_mse": 1}, student_config=student, teacher_config=base,
                                 student_layers=[2, 4])
    assert fine.requests()["teacher"].logits is None


def test_head_and_level_mismatches_are_clear_errors(student, teacher):
    disc = build("electra_disc")
    with pytest.raises(UsageError, match=r"'ce' needs a masked-LM head on the teacher.*ElectraForPreTraining.*rtd"):
        make({"ce": 1}, student, disc)
    with pytest.raises(UsageError, match="'rtd' needs an ELECTRA discriminator head on the student"):
        make({"rtd": 1}, student, teacher)
    with pytest.raises(UsageError, match="'hard_ce'.*sequence_level=True"):
        make({"hard_ce": 1}, student, teacher)
    with pytest.raises(UsageError, match="'mlm' does not exist at sequence level"):
        make({"mlm": 1}, student, teacher, sequence_level=True)
    with pytest.raises(UsageError, match="restrict_ce_to_mask"):
        Objective.from_config({"rtd_kl": 1}, student_config=disc, teacher_config=disc, restrict_ce_to_mask=True)
    with pytest.raises(UsageError, match="vocab_size is 50 and the teacher's"):
        make({"kl": 1}, build("bert_mlm", vocab_size=50, num_hidden_layers=2), teacher)
    classifier = BertForSequenceClassification(tiny.make_config("bert_mlm", num_labels=3))
    with pytest.raises(UsageError, match="BertForSequenceClassification.*sequence_level=True"):
        make({"ce": 1}, student, classifier)


def test_missing_features_at_run_time_say_how_to_extract(student, teacher):
    objective = make({"ce": 1, "hid_mse": 1}, student, teacher)
    batch = make_batch()
    with pytest.raises(UsageError, match="needs the student's logits.*extract_kwargs"):
        objective(Features(), Features(), batch)
    s, t = features(objective, student, teacher, batch)
    with pytest.raises(UsageError, match="logits have 5 rows, expected"):
        objective(Features(hidden_states=s.hidden_states, logits=s.logits.materialize()[:5]), t, batch)
    with pytest.raises(UsageError, match="needs the student's hidden_states"):
        objective(Features(logits=s.logits), t, batch)


# ---------------------------------------------------------------------------------------------
# sequence-level (task) distillation


def test_sequence_level_terms_take_per_example_logits():
    torch.manual_seed(0)
    s_model = BertForSequenceClassification(tiny.make_config("bert_mlm", num_labels=3, num_hidden_layers=2,
                                                             _attn_implementation="eager")).eval()
    t_model = BertForSequenceClassification(tiny.make_config("bert_mlm", num_labels=3,
                                                             _attn_implementation="eager")).eval()
    batch = make_batch(7)
    batch["labels"] = torch.tensor([0, 2, 1])
    objective = Objective.from_config({"ce": 1, "kl": 2, "out_mse": 3, "hard_ce": 4, "hid_mse": 1}, 3.0,
                                      student_config=s_model, teacher_config=t_model, student_layers=[2, 4],
                                      sequence_level=True)
    assert objective.requests()["student"] == Request(hidden=True, logits="sequence")
    assert objective.positions(batch, "student") is None and objective.positions(batch, "teacher") is None
    s, t = features(objective, s_model, t_model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s.logits = s_model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t.logits = t_model(input_ids=ids, attention_mask=mask).logits
    total, terms = objective(s, t, batch)
    assert torch.allclose(terms["ce"], losses.soft_cross_entropy(s.logits, t.logits, 3.0).detach())
    assert torch.allclose(terms["kl"], losses.kl_divergence(s.logits, t.logits, 3.0).detach())
    assert torch.allclose(terms["out_mse"], losses.logits_mse(s.logits, t.logits).detach())
    assert torch.allclose(terms["hard_ce"], losses.hard_cross_entropy(s.logits, batch["labels"]).detach())
    total.backward()
    assert s_model.classifier.weight.grad.abs().sum() > 0


def test_record_and_description_for_logs():
    model = build("bert_mlm")
    objective = Objective.from_config({"ce": 5, "mlm": 2, "cos": 1, "att_mse": 0}, 2.0, student_config=model,
                                      teacher_config=model, student_layers=[1, 2, 3, 4])
    assert objective.describe() == "5*ce(T=2) + 2*mlm + 1*cos[s4=t4]"
    record = json.loads(json.dumps(objective.to_dict()))
    assert record["weights"] == {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
    assert record["temperature"] == 2.0 and record["layer_map"] == [[1, 1], [2, 2], [3, 3], [4, 4]]
