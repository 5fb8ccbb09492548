"""The frozen teacher does only what the loss reads (distill.models.frozen), and gives the same features.

Each lever is checked against the teacher run the plain way: autocast over fp32 weights, every layer, every
layer eager. Models are tiny and random, saved and loaded through from_pretrained.
"""

import copy

import pytest
import torch

from distill.models.frozen import SDPA, attention_layers, cast_linears, eager_only_on, prepare_teacher, truncated
from distill.models.loading import extract, load_model, transformer_layers
from distill.models.student import build_student
from distill.objective.plan import Objective
from distill.train.step import StudentStep
from tests.tiny import random_batch, save_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_model("bert_mlm", tmp_path_factory.mktemp("frozen") / "teacher")


def _teacher(folder, eager=True):
    model = load_model(folder, eager=eager).eval()
    model.requires_grad_(False)
    return model


def _bf16(fn):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


def test_linears_cast_once_give_exactly_what_autocast_gives_on_fp32_weights(teacher_dir):
    plain, cast = _teacher(teacher_dir), _teacher(teacher_dir)
    embedding_before = cast.get_input_embeddings().weight.detach().clone()
    assert cast_linears(cast, torch.bfloat16) > 0
    ids, mask = random_batch(seq=12)
    where = mask.bool()
    kwargs = dict(hidden=True, attentions=True, positions=where)
    ref = _bf16(lambda: extract(plain, ids, mask, **kwargs))
    got = _bf16(lambda: extract(cast, ids, mask, **kwargs))
    for a, b in zip(ref.hidden_states, got.hidden_states):
        assert torch.equal(a, b)
    for a, b in zip(ref.attentions, got.attentions):
        assert torch.equal(a, b)
    assert ref.logits.dtype == torch.bfloat16 and torch.equal(ref.logits, got.logits)
    # the decoder was tied to the word embeddings: it got its own bf16 copy, the embedding kept its fp32 table
    assert cast.get_output_embeddings().weight.dtype == torch.bfloat16
    assert cast.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(cast.get_input_embeddings().weight, embedding_before)
    layer = transformer_layers(cast)[0]
    assert layer.attention.self.query.weight.dtype == torch.bfloat16 and layer.output.LayerNorm.weight.dtype == torch.float32


def test_a_truncated_forward_gives_the_full_forwards_lower_layers_and_puts_the_layers_back(teacher_dir):
    teacher = _teacher(teacher_dir)
    ids, mask = random_batch(seq=12)
    with torch.no_grad():
        full = extract(teacher, ids, mask, hidden=True, attentions=True)
        cut = extract(teacher, ids, mask, hidden=True, attentions=True, depth=2)
    assert len(cut.hidden_states) == 5 and cut.hidden_states[3:] == (None, None)
    for i in range(3):
        assert torch.equal(cut.hidden_states[i], full.hidden_states[i])
    assert torch.equal(cut.attentions[1], full.attentions[1]) and cut.attentions[2:] == (None, None)
    assert len(transformer_layers(teacher)) == 4  # restored after the call
    with pytest.raises(ValueError, match="no head can run"):
        extract(teacher, ids, mask, positions=mask.bool(), depth=2)
    with truncated(teacher, 1):
        assert len(transformer_layers(teacher)) == 1
    assert len(transformer_layers(teacher)) == 4


def test_eager_only_on_the_mapped_layers_keeps_hidden_states_and_their_attentions(teacher_dir):
    eager, mixed = _teacher(teacher_dir), _teacher(teacher_dir)
    assert eager_only_on(mixed, (2, 4)) == (2, 4)
    assert attention_layers(mixed) == (2, 4) and attention_layers(eager) is None
    assert mixed.config._attn_implementation == "eager"  # the model's own config: the mask keeps eager's format
    assert transformer_layers(mixed)[0].attention.self.config._attn_implementation == SDPA
    ids, mask = random_batch(seq=12, pad_last=5)
    with torch.no_grad():
        ref = extract(eager, ids, mask, hidden=True, attentions=True)
        got = extract(mixed, ids, mask, hidden=True, attentions=True)
    for a, b in zip(ref.hidden_states, got.hidden_states):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert got.attentions[0] is None and got.attentions[2] is None
    for layer in (2, 4):  # the layers before them ran sdpa: equal to float rounding
        torch.testing.assert_close(got.attentions[layer - 1], ref.attentions[layer - 1], atol=1e-6, rtol=0)
    assert eager_only_on(mixed, (1, 2, 3, 4)) == (1, 2, 3, 4) and attention_layers(mixed) is None


def test_a_family_without_per_layer_attention_is_left_as_it_is(tmp_path):
    from tests.tiny import build_mpnet

    model = build_mpnet("mpnet_base", 40)
    model.config._attn_implementation = "eager"
    before = [id(transformer_layers(model)[i].attention.attn) for i in range(4)]
    assert eager_only_on(model, (1,)) is None and attention_layers(model) is None
    assert before == [id(transformer_layers(model)[i].attention.attn) for i in range(4)]


def _objective(weights, teacher, student, layers, **kw):
    return Objective.from_config(weights, 2.0, student_config=student, teacher_config=teacher, student_layers=layers,
                                 **kw)


def test_the_teacher_request_names_the_attention_layers_and_the_depth(teacher_dir):
    teacher = _teacher(teacher_dir)
    student, _ = build_student(teacher, [1, 2])
    request = _objective({"hid_mse": 1, "att_mse": 1}, teacher, student, [1, 2]).requests()["teacher"]
    assert request.attention_layers == (1, 2) and request.depth == 2
    assert _objective({"hid_mse": 1, "cos": 1}, teacher, student, [1, 2]).requests()["teacher"].depth == 4
    assert _objective({"ce": 1, "hid_mse": 1}, teacher, student, [1, 2]).requests()["teacher"].depth is None
    assert _objective({"emb_mse": 1}, teacher, student, [1, 2]).requests()["teacher"].depth == 1
    assert _objective({"hid_mse": 1}, teacher, student, [1, 2]).requests()["student"].depth is None


@pytest.mark.parametrize("weights, layers", [({"hid_mse": 1.0, "att_mse": 1.0}, [1, 3]),
                                             ({"cos": 1.0, "att_kl": 1.0, "ce": 5.0}, [2, 4])])
def test_the_step_with_a_prepared_teacher_gives_the_plain_steps_loss_and_gradients(teacher_dir, weights, layers):
    """fp32: mixed attention (+ the depth cut) against every layer eager; bf16: the cast weights too, against
    autocast over fp32 weights."""
    plain = _teacher(teacher_dir)
    student0, _ = build_student(plain, layers)
    objective = _objective(weights, plain, student0, layers)
    ids, mask = random_batch(seq=12, pad_last=5)
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]
    batch = {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels}
    for dtype in (None, torch.bfloat16):
        prepared = _teacher(teacher_dir)
        record = prepare_teacher(prepared, objective.requests()["teacher"].attention_layers, dtype)
        assert record["eager_layers"] == tuple(layers)
        results = []
        for teacher in (plain, prepared):
            student = copy.deepcopy(student0).eval()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, _ = StudentStep(student, objective, teacher)(batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
        (ref, ref_grads), (got, got_grads) = results
        # fp32: sdpa and eager differ by float rounding. bf16: the cast is autocast's own (bit-exact, the first
        # test), but the sdpa layers round their bf16 products differently from eager: bounded well inside bf16's
        # own resolution (2^-8 = 3.9e-3 relative), the tolerance the lever is kept under.
        tol = 1e-5 if dtype is None else 1e-3
        torch.testing.assert_close(got, ref, atol=0, rtol=tol)
        largest = max(float(g.abs().max()) for g in ref_grads)
        for a, b in zip(ref_grads, got_grads):
            torch.testing.assert_close(b, a, atol=tol * largest, rtol=0)


def test_the_task_stage_teacher_runs_eager_only_where_its_stage_reads_maps(tmp_path):
    """glue-eval loads the teacher eager when any stage reads attention; a stage without attention terms (the
    prediction stage) then runs it all sdpa, with the same loss; an attention stage gets eager on its layers."""
    from transformers import TrainingArguments

    from glue_eval.arguments import GlueArguments
    from glue_eval.distillation import stage_objectives
    from glue_eval.trainer import DistillationTrainer
    from tests import tiny

    student, teacher = tiny.eager_classifier(1, 2), tiny.eager_classifier(2, 4)
    reference = copy.deepcopy(teacher)  # every layer eager, as loaded
    ids, mask = random_batch(seq=12, pad_last=5)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    glue = GlueArguments(student_layers="2,4")
    soft, _ = stage_objectives({"kl": 1.0}, glue, student, teacher)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, soft=soft, hard=None)
    assert attention_layers(teacher) == ()  # no layer eager: this stage reads no map
    loss, _, _ = trainer.distillation_loss(student, dict(batch))
    with torch.no_grad():
        target = extract(reference, ids, mask, sequence_logits=True)
    expected, _ = soft(extract(student, ids, mask, sequence_logits=True), target, batch)
    torch.testing.assert_close(loss, expected, atol=0, rtol=1e-5)
    soft, _ = stage_objectives({"att_mse": 1.0}, glue, student, teacher)
    DistillationTrainer(model=student, args=args, teacher=teacher, soft=soft, hard=None)
    assert attention_layers(teacher) == (2, 4)


@pytest.mark.slow
def test_compiled_models_give_the_eager_steps_loss_and_gradients(teacher_dir):
    """--compile (distill.train.setup.compile_models): the teacher's and the student's forward compiled apart;
    the step's loss and the student's gradients as in eager mode (inductor may reorder float sums)."""
    from distill.train.setup import compile_models

    teacher = _teacher(teacher_dir)
    student0, _ = build_student(teacher, [1, 3])
    objective = _objective({"cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0}, teacher, student0, [1, 3])
    prepare_teacher(teacher, objective.requests()["teacher"].attention_layers)
    ids, mask = random_batch(seq=12, pad_last=5)
    batch = {"input_ids": ids, "attention_mask": mask}
    results = []
    for compiled in (False, True):
        student, t = copy.deepcopy(student0).eval(), copy.deepcopy(teacher)
        if compiled:
            compile_models(t, student)
        loss, _ = StudentStep(student, objective, t)(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in student.parameters() if p.grad is not None]))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, atol=0, rtol=1e-5)
    assert len(got_grads) == len(ref_grads)
    for a, b in zip(ref_grads, got_grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_teacher_fp32_gives_the_fp32_teachers_features_under_bf16_autocast(teacher_dir):
    """--teacher_fp32: inside the run's bf16 autocast the teacher's forward is the fp32 forward, bit for bit;
    without it the teacher computes in bf16 (its features differ from the fp32 ones)."""
    teacher = _teacher(teacher_dir)
    student, _ = build_student(teacher, [1, 3])
    objective = _objective({"cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0}, teacher, student, [1, 3])
    prepare_teacher(teacher, objective.requests()["teacher"].attention_layers)  # fp32 run: weights stay fp32
    ids, mask = random_batch(seq=12, pad_last=5)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ref = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = StudentStep(student, objective, teacher, teacher_fp32=True).teacher_features(batch)
        cast = StudentStep(student, objective, teacher).teacher_features(batch)
    assert ref.hidden_states and ref.attentions
    pairs = [(a, b, c) for a, b, c in zip(ref.hidden_states + ref.attentions, exact.hidden_states + exact.attentions,
                                          cast.hidden_states + cast.attentions) if a is not None]
    assert len(pairs) >= 4  # the mapped layers' hidden states and attention maps
    for a, b, _ in pairs:
        assert b.dtype == torch.float32 and torch.equal(a, b)
    assert not all(torch.equal(a, c.float()) for a, _, c in pairs)  # bf16 matmuls inside
