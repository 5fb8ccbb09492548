"""The gated mixture of teachers: its losses by hand and in float64, the load-balancing loss keeping a teacher that
is the expert for part of the data above a stated share where the gate collapses without it, and the whole run."""

import json
import random
from pathlib import Path

import pytest
import torch

from glue_eval.cli import main
from glue_eval.gate import (
    ClassTargets,
    GateSchedule,
    TeacherGate,
    load_balancing_loss,
    mixture_task_loss,
    train_gate,
)
from glue_eval.teachers import mix_logits
from tests import tiny


def test_the_load_balancing_loss_is_the_squared_coefficient_of_variation_of_importance():
    gates = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    # importance [1.6, 0.4]: mean 1.0, population variance ((0.6)^2 + (0.6)^2) / 2 = 0.36 -> CV^2 0.36
    assert load_balancing_loss(gates).item() == pytest.approx(0.36, rel=1e-6)
    assert load_balancing_loss(torch.full((4, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-9)  # balanced
    assert load_balancing_loss(torch.tensor([[1.0, 0.0, 0.0]] * 5)).item() == pytest.approx(2.0, rel=1e-6)  # all on one


def test_the_mixtures_task_loss_and_per_example_weights_match_float64():
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(3, 6, 4, generator=g) * 2  # 3 teachers, 6 examples, 4 classes
    gates = torch.softmax(torch.randn(6, 3, generator=g), -1)
    labels = torch.randint(0, 4, (6,), generator=g)
    p = sum(gates[:, k, None].double() * torch.softmax(zt[k].double(), -1) for k in range(3))  # [6, 4]
    assert mixture_task_loss(zt, gates, labels).item() == pytest.approx(-p[range(6), labels].log().mean().item(),
                                                                        rel=1e-6)
    for temperature in (1.0, 2.0):
        mixed = mix_logits(list(zt), gates, temperature)
        expected = sum(gates[:, k, None].double() * torch.softmax(zt[k].double() / temperature, -1) for k in range(3))
        assert torch.allclose(torch.softmax(mixed.double() / temperature, -1), expected, atol=1e-6)
    top1 = torch.nn.functional.one_hot(gates.argmax(-1), 3).float()  # one teacher per example: exactly its targets
    mixed = mix_logits(list(zt), top1, 2.0)
    own = torch.stack([zt[k, i] for i, k in enumerate(gates.argmax(-1).tolist())])
    assert torch.allclose(torch.softmax(mixed / 2.0, -1), torch.softmax(own / 2.0, -1), atol=1e-6)


def _expert_split(n=120, share_of_b=0.2, seed=0):
    """Teacher A is the expert on most rows (gold p 0.99), B on the rest (0.99, where A is unsure: 0.5), and B is
    wrong where A is the expert (0.01); the rows' texts do not tell the two parts apart."""
    rng = random.Random(seed)
    labels = torch.tensor([rng.randrange(2) for _ in range(n)])
    b_rows = set(rng.sample(range(n), int(n * share_of_b)))
    margin = torch.log(torch.tensor(99.0)).item()
    zt = torch.zeros(2, n, 2)
    for i in range(n):
        y = labels[i].item()
        zt[0, i, y] = 0.0 if i in b_rows else margin
        zt[1, i, y] = margin if i in b_rows else -margin
    texts = [" ".join(rng.choice(tiny.WORDS) for _ in range(6)) for _ in range(n)]
    return texts, labels, zt


def _gate_shares(balance, vocab_dir):
    import datasets
    from transformers import AutoTokenizer, BertModel, DataCollatorWithPadding

    texts, labels, zt = _expert_split()
    tokenizer = AutoTokenizer.from_pretrained(vocab_dir)
    rows = datasets.Dataset.from_dict(dict(tokenizer(texts)))
    torch.manual_seed(0)
    gate = TeacherGate(BertModel(tiny.make_config("bert", num_hidden_layers=1)), 2)
    epochs = train_gate(gate, rows, ClassTargets(zt, labels), DataCollatorWithPadding(tokenizer),
                        GateSchedule(epochs=8, learning_rate=1e-2, balance=balance, batch_size=16, seed=0))
    return epochs[-1]["share"]


FLOOR = 0.25  # the least share of the training set the balanced gate gives any of the two teachers


def test_the_balancing_loss_keeps_every_teacher_above_the_floor_and_the_gate_collapses_without_it(vocab_dir):
    """Two teachers, each the expert for part of the data (A on 80%, B on 20%). The gate's task loss alone drives
    B's share to nothing (collapse: below 0.05); with the load-balancing loss at weight 1 every teacher keeps more
    than FLOOR of the training set (the constant gate's optimum is then about 0.35 for B)."""
    collapsed = _gate_shares(0.0, vocab_dir)
    balanced = _gate_shares(1.0, vocab_dir)
    assert min(collapsed) < 0.05
    assert min(balanced) > FLOOR


def test_a_gated_run_trains_the_gate_logs_its_shares_and_distils_the_student(tmp_path, vocab_dir, capsys):
    from tests.test_teachers import _classifier, _spec

    teachers = [_classifier(tmp_path / "a", 1, vocab_dir), _classifier(tmp_path / "b", 2, vocab_dir)]
    student = _classifier(tmp_path / "s", 3, vocab_dir)
    assert main(["--model", student, "--task", _spec(tmp_path), "--teacher", teachers[0], "--teacher", teachers[1],
                 "--teacher_gate", "top1", "--gate_epochs", "2", "--gate_balance", "0.5",
                 "--distill_weights", '{"kl": 1}', "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                 "--use_cpu", "--precision", "fp32", "--report_to", "none", "--disable_tqdm", "true"]) == 0
    assert "gate epoch 2: teacher shares" in capsys.readouterr().err
    (path,) = Path(tmp_path / "out").rglob("result.json")
    record = json.loads(path.read_text())
    gate = record["train"]["gate"]
    assert gate["kind"] == "top1" and len(gate["epochs"]) == 2 and sum(gate["epochs"][-1]["share"]) == pytest.approx(1)
    assert record["settings"]["teacher_gate"] == "top1" and record["settings"]["gate_balance"] == 0.5


def test_a_gate_needs_several_teachers(tmp_path, vocab_dir, capsys):
    from tests.test_teachers import _classifier, _spec

    teacher = _classifier(tmp_path / "a", 1, vocab_dir)
    with pytest.raises(SystemExit) as stop:
        main(["--model", teacher, "--task", _spec(tmp_path), "--teacher", teacher, "--teacher_gate", "softmax",
              "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    assert stop.value.code == 2 and "weighs several teachers" in capsys.readouterr().err
