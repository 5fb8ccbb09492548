"""Several teachers in glue-eval's task stage with representation terms: kl reads the mixture of the teachers' soft
targets, hid_mse and att_mse are the weighted sum of each teacher's own term through its own layer map (a teacher of
another depth through the first one's map scaled to it), one teacher listed twice is the one-teacher run, and what
cannot be mixed is refused in one line."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill.models.loading import extract
from distill.objective.mixture import TeacherMix
from glue_eval.cli import main
from glue_eval.distillation import build_teacher_cache, each_teacher_terms, load_checked_teacher, stage_objectives
from glue_eval.tasks import get_task
from glue_eval.teachers import TeacherMixture
from glue_eval.trainer import ROW, DistillationTrainer
from tests import tiny

T = 2.0
TEXTS = ["the city was new in the world", "one of the first", "he was known at the school for many years",
         "the state university"]


def _save(model, folder, vocab_dir) -> str:
    from transformers import AutoTokenizer

    model.config.id2label, model.config.label2id = {0: "no", 1: "yes"}, {"no": 0, "yes": 1}
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory, vocab_dir):
    """Teacher A (4 layers, the student's source), teacher B (6 layers), a 2-layer student (A's layers 1,3), a
    teacher with 8 heads and one 48 wide: tiny eager classifiers without dropout, saved with the tokenizer."""
    root = tmp_path_factory.mktemp("repr_teachers")
    a, b = tiny.eager_classifier(1, 4), tiny.eager_classifier(2, 6)
    with torch.no_grad():  # random tiny attention is near uniform: sharper maps, and B's states far from A's
        for teacher, scale in ((a, 60.0), (b, 30.0)):
            for layer in teacher.bert.encoder.layer:
                layer.attention.self.query.weight.mul_(scale)
        for layer in b.bert.encoder.layer:
            layer.output.LayerNorm.weight.mul_(2.0)
        for teacher, scale in ((a, 20.0), (b, 60.0)):  # and surer heads than near-uniform random ones, B the surer
            teacher.bert.pooler.dense.weight.mul_(50.0)
            teacher.classifier.weight.mul_(scale)
    out = {"a": _save(a, root / "a", vocab_dir), "b": _save(b, root / "b", vocab_dir),
           "student": _save(tiny.eager_classifier(3, 2), root / "student", vocab_dir)}
    for name, overrides in (("heads8", {"num_attention_heads": 8}), ("wide", {"hidden_size": 48})):
        from transformers import BertForSequenceClassification

        torch.manual_seed(4)
        config = tiny.make_config("bert_mlm", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  **overrides)
        config._attn_implementation = "eager"
        out[name] = _save(BertForSequenceClassification(config).eval(), root / name, vocab_dir)
    return out


def _spec(folder) -> str:
    rows = [("the city was new in the world", "yes"), ("one of the first", "no"), ("the state university", "yes"),
            ("he was known at the school", "no")] * 4
    (folder / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    spec = {"name": "tiny", "train": "train.csv", "dev": "train.csv", "text_columns": ["text"],
            "label_column": "label", "labels": ["no", "yes"], "metric": "accuracy"}
    (folder / "task.json").write_text(json.dumps(spec))
    return str(folder / "task.json")


def _glue(models, teachers, weights=None, **more):
    return SimpleNamespace(teacher=models[teachers[0]], other_teachers=",".join(models[t] for t in teachers[1:]),
                           teacher_weights=weights, teacher_gate="none", temperature=T, tokenizer=None,
                           model=models["student"], student_layers="1,3", layer_map=None, **more)


def _batch(vocab_dir):
    import datasets
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(vocab_dir)
    rows = datasets.Dataset.from_dict(dict(tokenizer(TEXTS))).add_column(ROW, list(range(len(TEXTS))))
    collate = DataCollatorWithPadding(tokenizer)
    batch = collate([rows[i] for i in range(len(rows))])
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    assert not batch["attention_mask"].bool().all()  # padded rows: what padding holds must not count
    return rows, collate, batch


def _terms(models, teachers, weights, vocab_dir, tmp_path, teacher_weights=None, cache_mb=None):
    """The task stage's unweighted terms on one padded batch, as glue-eval builds and runs them (its trainer's
    distillation_loss; ``cache_mb``: through the teacher caches of that limit), and the student and teachers."""
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    glue = _glue(models, teachers, teacher_weights, teacher_cache_mb=cache_mb)
    student = AutoModelForSequenceClassification.from_pretrained(models["student"], attn_implementation="eager").eval()
    teacher = load_checked_teacher(glue, get_task(_spec(tmp_path)), student, eager=True)
    stages = [{"weights": weights}]
    each = each_teacher_terms(teacher, stages)
    soft, _ = stage_objectives(weights, glue, student, teacher, each)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none")
    rows, collate, batch = _batch(vocab_dir)
    cache = None
    if cache_mb is not None:
        cache, _ = build_teacher_cache(teacher, [soft], rows, collate, args, glue, each)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, soft=soft, teacher_cache=cache)
    with torch.no_grad():
        loss, terms, _ = trainer.distillation_loss(student, batch)
    return {k: float(v) for k, v in terms.items()}, float(loss), teacher, soft, trainer, batch


def _features64(model, batch):
    with torch.no_grad():
        f = extract(model, batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                    hidden=True, attentions=True, sequence_logits=True)
    return ([h.double() for h in f.hidden_states], [a.double() for a in f.attentions], f.logits.double())


def _reference(student, teacher, pairs, mask):
    """hid_mse and att_mse of ``teacher`` over ``pairs`` (1-based; float64, means over real tokens / entries)."""
    real = mask.bool()
    valid = real[:, None, :, None] & real[:, None, None, :]
    hid = sum(((student[0][s][real] - teacher[0][t][real]) ** 2).mean() for s, t in pairs) / len(pairs)
    att = sum((((student[1][s - 1] - teacher[1][t - 1]) ** 2) * valid).sum() / (valid.sum() * student[1][0].shape[1])
              for s, t in pairs) / len(pairs)
    return float(hid), float(att)


# teachers per batch; all cached; logits cached only; entropy weights (equal for the representation terms)
@pytest.mark.parametrize("cache_mb, mix", [(None, "0.7,0.3"), (2048, "0.7,0.3"), (0, "0.7,0.3"), (2048, "entropy")])
def test_representation_terms_are_the_weighted_sum_of_each_teachers_own_through_its_own_map(
        models, vocab_dir, tmp_path, cache_mb, mix):
    from transformers import AutoModelForSequenceClassification

    weights = {"kl": 1.0, "hid_mse": 1.0, "att_mse": 1.0}
    terms, loss, teacher, soft, trainer, batch = _terms(models, ["a", "b"], weights, vocab_dir, tmp_path, mix, cache_mb)
    assert isinstance(teacher, TeacherMixture) and isinstance(soft, TeacherMix)
    # A: the student's own source layers 1,3; B has 6 layers: 1,3 scaled by 6/4 and rounded -> 2,4
    assert [t["layer_map"] for t in soft.to_dict()["teachers"]] == [[[1, 1], [2, 3]], [[1, 2], [2, 4]]]
    assert trainer.teacher_forwards == (0 if cache_mb else 1)
    own = [_features64(AutoModelForSequenceClassification.from_pretrained(models[k], attn_implementation="eager")
                       .eval(), batch) for k in ("a", "b", "student")]
    mask = batch["attention_mask"]
    hid_a, att_a = _reference(own[2], own[0], [(1, 1), (2, 3)], mask)
    hid_b, att_b = _reference(own[2], own[1], [(1, 2), (2, 4)], mask)
    wa, wb = (0.7, 0.3) if mix != "entropy" else (0.5, 0.5)
    assert terms["hid_mse"] == pytest.approx(wa * hid_a + wb * hid_b, rel=1e-5)
    assert terms["att_mse"] == pytest.approx(wa * att_a + wb * att_b, rel=1e-5)
    # the teachers' terms differ: the weights and the maps are what count
    assert abs(hid_a - hid_b) > 0.5 * hid_a and abs(att_a - att_b) > 0.1 * att_a and att_a > 1e-3
    if mix == "entropy":  # soft targets: per example, softmax over the teachers of minus their entropy (T = 1)
        entropy = torch.stack([-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1) for z in (own[0][2],
                                                                                                    own[1][2])], -1)
        wa, wb = torch.softmax(-entropy, -1)[:, :1], torch.softmax(-entropy, -1)[:, 1:]
        assert (wa - 0.5).abs().min() > 0.01  # the weights do differ per example
    p = wa * torch.softmax(own[0][2] / T, -1) + wb * torch.softmax(own[1][2] / T, -1)
    log_q = torch.log_softmax(own[2][2] / T, -1)
    kl = float((p * (p.log() - log_q)).sum(-1).mean() * T ** 2)
    assert terms["kl"] == pytest.approx(kl, rel=1e-5) and kl > 1e-2
    assert loss == pytest.approx(terms["kl"] + terms["hid_mse"] + terms["att_mse"], rel=1e-6)


def test_one_teacher_listed_twice_is_the_one_teacher_value(models, vocab_dir, tmp_path):
    weights = {"kl": 1.0, "hid_mse": 1.0, "att_mse": 1.0}
    single, single_loss, teacher, soft, _, _ = _terms(models, ["a"], weights, vocab_dir, tmp_path)
    assert not isinstance(teacher, TeacherMixture) and not isinstance(soft, TeacherMix)
    twice, loss, teacher, soft, _, _ = _terms(models, ["a", "a"], weights, vocab_dir, tmp_path, "0.2,0.8")
    assert not isinstance(teacher, TeacherMixture)  # fixed weights: one teacher, its weights summed
    assert twice == single and loss == single_loss
    # entropy weighs per example, so the teacher stays two: each term the mean of two equal ones, kl the same
    twice, loss, teacher, soft, _, _ = _terms(models, ["a", "a"], weights, vocab_dir, tmp_path, "entropy", 2048)
    assert isinstance(soft, TeacherMix) and len(soft.objectives) == 2
    assert twice == pytest.approx(single, rel=1e-5, abs=1e-7) and loss == pytest.approx(single_loss, rel=1e-5)


def test_a_wider_teacher_goes_through_its_own_projection(models, vocab_dir, tmp_path):
    terms, _, _, soft, trainer, _ = _terms(models, ["a", "wide"], {"hid_mse": 1.0}, vocab_dir, tmp_path)
    assert [dict(o.projections) != {} for o in soft.objectives] == [False, True]
    assert soft.objectives[1].projections["hid_mse"].in_features == 32
    assert soft.objectives[1].projections["hid_mse"].out_features == 48
    optimizer = trainer.create_optimizer()  # the projection trains with the student
    projection = soft.objectives[1].projections["hid_mse"].weight
    assert any(p is projection for group in optimizer.param_groups for p in group["params"])


def _cli(models, task, out, *extra):
    task = task if isinstance(task, list) else ["--task", task]
    return ["--model", models["student"], *task, "--output_dir", str(out), "--use_cpu", "--precision",
            "fp32", "--report_to", "none", "--disable_tqdm", "true", "--student_layers", "1,3", *extra]


def test_two_teachers_with_hidden_states_run_end_to_end(models, tmp_path):
    out = tmp_path / "out"
    assert main(_cli(models, _spec(tmp_path), out, "--teacher", models["a"], "--teacher", models["b"],
                     "--teacher_weights", "0.7,0.3", "--distill_weights", '{"kl": 1, "hid_mse": 1}',
                     "--max_steps", "2", "--logging_steps", "1")) == 0
    (path,) = Path(out).rglob("result.json")
    result = json.loads(path.read_text())
    stage = result["train"]["stages"][0]
    assert [t["layer_map"] for t in stage["teachers"]] == [[[1, 1], [2, 3]], [[1, 2], [2, 4]]]
    assert stage["teachers"][1]["weight"] == pytest.approx(0.3)
    assert all("distill/hid_mse" in entry for entry in stage["logs"]) and stage["teacher_forwards"] == 0
    cache = result["train"]["teacher_cache"]
    assert cache["per_teacher"] == 2 and cache["representations"]
    assert "accuracy" in json.dumps(result["dev"])


def test_what_cannot_be_mixed_is_refused_in_one_line(models, tmp_path, capsys):
    from tests import qa_sets

    spec = _spec(tmp_path)
    two = ["--teacher", models["a"], "--teacher", models["b"]]
    squad = qa_sets.write_squad(tmp_path / "squad", qa_sets.year_paragraphs()[:4], qa_sets.year_paragraphs()[4:6])
    cases = [
        (two + ["--distill_weights", '{"kl": 1, "hid_mse": 1}'], "with several extractive-QA teachers"),
        (two + ["--teacher_gate", "softmax", "--distill_weights", '{"kl": 1, "hid_mse": 1}'],
         "which the gate does not weigh"),
        (["--teacher", models["a"], "--teacher", models["heads8"], "--distill_weights", '{"att_mse": 1}'],
         f"--teacher {models['heads8']!r} (teacher 2): term 'att_mse' compares attention heads one to one"),
    ]
    qa = ["--task", "squad", "--data_dir", str(squad), "--max_seq_length", "48", "--doc_stride", "16"]
    for extra, message in cases:
        out = tmp_path / "refused"
        task = qa if "extractive-QA" in message else spec
        with pytest.raises(SystemExit) as stop:
            main(_cli(models, task, out, *extra, "--max_steps", "1"))
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len([line for line in err if line.startswith("error:")]) == 1, err
        assert message in err[-1], (extra, err)
        assert not Path(out).exists()  # refused before anything is written
