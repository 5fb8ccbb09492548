"""The weighting aid: per-term gradient norms against independent backward passes, suggested weights that
equalise the shares when measured again, a student left as it was, and distill-train --calibrate end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

from distill.cli import train_main
from distill.models.loading import extract, load_model
from distill.objective.calibrate import (
    Calibration,
    calibrate,
    objective_terms,
    term_gradient_norms,
)
from distill.objective.plan import Objective
from tests import tiny
from tests.test_train import cli_args, run_config

WEIGHTS = {"ce": 5.0, "mlm": 2.0, "cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, vocab_dir):
    """A 4-layer teacher and a 2-layer student (different random weights), both loaded with eager attention."""
    teacher_dir = tiny.save_model("bert_mlm", tmp_path_factory.mktemp("t"), vocab_dir, seed=0)
    student_dir = tiny.save_model("bert_mlm", tmp_path_factory.mktemp("s"), vocab_dir, seed=1, num_hidden_layers=2)
    teacher = load_model(teacher_dir, eager=True, what="teacher").eval()
    student = load_model(student_dir, eager=True, what="student").eval()  # eval: every forward is the same function
    return teacher, student


def batches(n=3):
    out = []
    for seed in range(n):
        ids, mask = tiny.random_batch(batch=3, seq=12, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        targets = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
        targets[:, 1] = True  # at least one target per row
        out.append({"input_ids": ids, "attention_mask": mask, "mlm_labels": torch.where(targets, ids, -100)})
    return out


def objective_for(weights, teacher, student):
    return Objective.from_config(weights, 2.0, student_config=student, teacher_config=teacher, student_layers=[2, 4])


def term_values_fn(objective, teacher, student):
    def term_values(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
        s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
        return objective_terms(objective, s, t, batch)

    return term_values


def independent_norm(name, batch, teacher, student):
    """||grad|| of one term alone: its own objective, its own forward, loss.backward() into .grad."""
    objective = objective_for({name: 1.0}, teacher, student)
    student.zero_grad(set_to_none=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t = extract(teacher, ids, mask, **objective.extract_kwargs(batch, "teacher"))
    s = extract(student, ids, mask, **objective.extract_kwargs(batch, "student"))
    loss, _ = objective(s, t, batch)
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in student.parameters() if p.grad is not None))
    student.zero_grad(set_to_none=True)
    return float(loss.detach()), norm


def test_hand_computed_gradient_norms():
    theta = torch.tensor([1.0, 2.0, 2.0], requires_grad=True)
    other = torch.tensor([3.0], requires_grad=True)
    a = torch.tensor([3.0, 0.0, 4.0])
    terms = {"dot": theta @ a,  # gradient a: norm 5
             "half_square": 0.5 * theta.pow(2).sum() + 0.5 * other.pow(2).sum(),  # gradient (theta, other): norm 3*sqrt(2)
             "const": torch.tensor(2.0)}  # reaches nothing
    norms = term_gradient_norms(terms, [theta, other])
    assert norms == pytest.approx({"dot": 5.0, "half_square": math.sqrt(18.0), "const": 0.0})
    assert theta.grad is None and other.grad is None  # nothing accumulated


def test_gradient_norms_and_values_match_each_term_computed_alone(pair):
    teacher, student = pair
    objective = objective_for(WEIGHTS, teacher, student)
    data = batches(3)
    result = calibrate(term_values_fn(objective, teacher, student), student.parameters(), data, objective.weights)
    assert result.batches == 3 and list(result.weights) == list(WEIGHTS)
    for name in WEIGHTS:
        pairs = [independent_norm(name, batch, teacher, student) for batch in data]
        assert result.values[name] == pytest.approx(sum(v for v, _ in pairs) / 3, rel=1e-5), name
        assert result.grad_norms[name] == pytest.approx(sum(g for _, g in pairs) / 3, rel=1e-4), name
        assert result.grad_norms[name] > 0
    assert objective.weights == WEIGHTS  # restored after the per-term evaluations


def test_the_student_is_unchanged_and_holds_no_gradient(pair):
    teacher, student = pair
    before = {k: v.clone() for k, v in student.state_dict().items()}
    objective = objective_for(WEIGHTS, teacher, student)
    calibrate(term_values_fn(objective, teacher, student), student.parameters(), batches(2), objective.weights)
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("weights", [{"cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0}, WEIGHTS])
def test_suggested_weights_give_the_asked_shares_when_measured_again(pair, weights):
    teacher, student = pair
    data = batches(2)
    first = objective_for(weights, teacher, student)
    result = calibrate(term_values_fn(first, teacher, student), student.parameters(), data, first.weights)
    suggested = result.suggested_weights()
    # re-run with the suggested weights: the shares measured afresh are those the configured weights ask for
    second = objective_for(suggested, teacher, student)
    again = calibrate(term_values_fn(second, teacher, student), student.parameters(), data, second.weights)
    total = sum(weights.values())
    for name, w in weights.items():
        assert again.grad_shares()[name] == pytest.approx(w / total, rel=1e-4), name
    # and the total pull sum_k w_k g_k is the configured recipe's
    assert sum(suggested[k] * result.grad_norms[k] for k in weights) == pytest.approx(
        sum(weights[k] * result.grad_norms[k] for k in weights), rel=1e-9)
    # the configured recipe was not balanced, which is why the aid exists
    assert max(result.grad_shares().values()) - min(result.grad_shares().values()) > 0.01


def test_shares_suggestions_and_the_paste_line_by_hand():
    cal = Calibration(weights={"a": 1.0, "b": 1.0, "c": 2.0}, values={"a": 1.0, "b": 3.0, "c": 0.5},
                      grad_norms={"a": 2.0, "b": 0.5, "c": 1.0}, batches=1)
    # weighted norms 2, 0.5, 2 (sum 4.5); weighted values 1, 3, 1 (sum 5)
    assert cal.grad_shares() == pytest.approx({"a": 2 / 4.5, "b": 0.5 / 4.5, "c": 2 / 4.5})
    assert cal.value_shares() == pytest.approx({"a": 0.2, "b": 0.6, "c": 0.2})
    # targets 1/4, 1/4, 1/2; pull 4.5 / 4 per unit weight: w' = w / g * 1.125
    assert cal.suggested_weights() == pytest.approx({"a": 0.5625, "b": 2.25, "c": 2.25})
    assert json.loads(cal.paste_line()) == {"a": 0.5625, "b": 2.25, "c": 2.25}
    table = cal.table().splitlines()
    assert table[0].split() == ["term", "weight", "value", "value", "share", "grad", "norm", "grad", "share", "target",
                                "suggested"]
    assert table[2].split() == ["b", "1", "3", "60.0%", "0.5", "11.1%", "25.0%", "2.25"]


def test_a_term_without_gradient_keeps_its_weight_and_is_named():
    cal = Calibration(weights={"a": 1.0, "b": 3.0}, values={"a": 1.0, "b": 0.0}, grad_norms={"a": 2.0, "b": 0.0},
                      batches=1)
    assert cal.unreachable() == ["b"]
    assert cal.suggested_weights() == {"a": 1.0, "b": 3.0}


def test_distill_train_calibrate_prints_the_table_and_writes_calibration_json(bert_mlm_dir, tmp_path, capsys):
    from tests.test_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", lines=120)
    out = tmp_path / "calib"
    values = run_config(bert_mlm_dir, corpus, out, tmp_path, calibrate=2,
                        weights={"cos": 1.0, "hid_mse": 1.0, "att_mse": 1.0})
    assert train_main(cli_args(values)) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    pasted = json.loads(lines[-1])
    assert set(pasted) == {"cos", "hid_mse", "att_mse"}
    assert lines[0].split()[0] == "term" and {line.split()[0] for line in lines[1:4]} == set(pasted)
    record = json.loads((out / "calibration.json").read_text())
    assert record["batches"] == 2 and record["suggested_weights"] == pasted
    shares = {k: pasted[k] * record["terms"][k]["grad_norm"] for k in pasted}
    assert max(shares.values()) / min(shares.values()) == pytest.approx(1.0, rel=2e-3)  # 4-digit rounding
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json"]  # no student, checkpoint or log
    assert "not updated" in captured.err


def test_calibrate_refuses_resume_and_negative_counts(bert_mlm_dir, tmp_path, capsys):
    from tests.test_train import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", lines=50)
    for extra, needle in (({"calibrate": -1}, "calibrate=-1 is out of range"),
                          ({"calibrate": 2, "resume": True}, "drop --resume")):
        with pytest.raises(SystemExit) as exc:
            train_main(cli_args(run_config(bert_mlm_dir, corpus, tmp_path / "o", tmp_path, **extra)))
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert not Path(tmp_path / "o").exists()
