"""The gated mixture of teachers on extractive QA: the span task loss against float64, the gated mixture that the
student distils from, the load-balancing loss keeping a teacher that is the expert for part of the windows above a
stated share where the gate collapses without it, and a whole glue-eval run."""

import json
import random
from pathlib import Path

import pytest
import torch

from glue_eval.cli import main
from glue_eval.gate import (
    GatedTeacherMixture,
    GateSchedule,
    SpanTargets,
    TeacherGate,
    mixture_task_loss,
    train_gate,
)
from glue_eval.qa_distill import SpanLogitCache
from glue_eval.squad_metrics import squad_scores
from tests import qa_sets, tiny

FAST = ["--use_cpu", "--precision", "fp32", "--max_seq_length", "48", "--doc_stride", "16",
        "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--report_to", "none"]


def _span_loss64(z, gates, gold, lengths):
    """float64: mean over windows and over (start, end) of ``-log sum_k g_k softmax(z_k[:L])[gold]``, each window
    read over its first ``L`` (real) tokens only. z: ``[K, B, 2, S]``, gates ``[B, K]``, gold ``[B, 2]``."""
    losses = []
    for b, length in enumerate(lengths):
        for side in (0, 1):
            p = sum(gates[b, k].double() * torch.softmax(z[k, b, side, :length].double(), -1) for k in range(len(z)))
            losses.append(-p[gold[b, side]].log())
    return torch.stack(losses).mean()


def test_the_span_task_loss_of_the_mixture_matches_float64_over_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 2, 9, generator=g) * 3  # 3 teachers, 4 windows, start/end, 9 positions
    gates = torch.softmax(torch.randn(4, 3, generator=g), -1)
    lengths = [9, 6, 4, 7]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    gold = torch.tensor([[3, 5], [0, 0], [1, 2], [6, 6]])  # window 1 has no answer: its classifier token
    expected = _span_loss64(z, gates, gold, lengths)
    assert mixture_task_loss(z, gates, gold, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    padded = z.masked_fill(~mask.bool()[None, :, None, :], 50.0)  # what sits in the padding does not count
    assert mixture_task_loss(padded, gates, gold, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert mixture_task_loss(padded, gates, gold).item() > expected.item() + 1  # unmasked, padding would take mass
    # the same through the gate's targets: ragged per-teacher caches put back into a batch's padded layout
    caches = [SpanLogitCache([z[k, b, :, :n].clone() for b, n in enumerate(lengths)]) for k in range(3)]
    targets = SpanTargets(caches, gold)
    found, labels = targets.batch([2, 0], mask[[2, 0]])
    assert torch.equal(labels, gold[[2, 0]])
    assert mixture_task_loss(found, gates[[2, 0]], labels, mask[[2, 0]]).item() == pytest.approx(
        _span_loss64(z[:, [2, 0]], gates[[2, 0]], gold[[2, 0]], [4, 9]).item(), rel=1e-6)


def _qa_teacher(seed):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(seed)
    return BertForQuestionAnswering(tiny.make_config("bert")).eval()


def _gate(seed=0):
    from transformers import BertModel

    torch.manual_seed(seed)
    return TeacherGate(BertModel(tiny.make_config("bert", num_hidden_layers=1)), 2)


def test_the_student_distils_from_the_gate_weighted_mixture_of_the_span_distributions():
    from glue_eval.teachers import TeacherMixture

    teachers = [_qa_teacher(1), _qa_teacher(2)]
    gated = GatedTeacherMixture(TeacherMixture(teachers, [0.5, 0.5], temperature=2.0), _gate())
    ids = torch.randint(5, tiny.VOCAB_SIZE, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        weights = gated.gate(ids, mask).double()  # [3, 2]
        own = [t(input_ids=ids, attention_mask=mask) for t in teachers]
        out = gated(input_ids=ids, attention_mask=mask)
        gated.gate.top1 = True
        one = gated(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(weights[:, 0], torch.full((3,), 0.5, dtype=torch.float64), atol=1e-3)
    for b in range(3):
        real = mask[b].bool()
        for name in ("start_logits", "end_logits"):
            expected = sum(weights[b, k] * torch.softmax(getattr(o, name)[b][real].double() / 2.0, -1)
                           for k, o in enumerate(own))
            assert torch.allclose(torch.softmax(getattr(out, name)[b][real].double() / 2.0, -1), expected, atol=1e-6)
            chosen = getattr(own[int(weights[b].argmax())], name)[b][real]  # top1: that one teacher's distribution
            assert torch.allclose(torch.softmax(getattr(one, name)[b][real] / 2.0, -1),
                                  torch.softmax(chosen / 2.0, -1), atol=1e-6)


def _windows(vocab_dir, tmp_path):
    """Training windows of real QA text (48 tokens, stride 16): many point at the classifier token."""
    from transformers import AutoTokenizer

    from glue_eval.qa import encode_train
    from glue_eval.qa_data import read_squad_file

    path = tmp_path / "train.json"
    path.write_text(json.dumps(qa_sets.squad_document(qa_sets.year_paragraphs()[:24], "t")))
    tokenizer = AutoTokenizer.from_pretrained(vocab_dir)
    return encode_train(read_squad_file(str(path)), tokenizer, 48, 16), tokenizer


def _expert_caches(windows, share_of_b=0.2, seed=0):
    """Per window, teacher A puts 0.99 of its start (and end) mass on the gold token of most windows and B on the
    rest; where B is the expert A is unsure (0.5 on gold, the rest spread), and where A is the expert B is wrong
    (a logit of -m on gold). The windows' texts do not tell the two parts apart (B's are drawn at random)."""
    rng = random.Random(seed)
    b_rows = set(rng.sample(range(len(windows)), int(len(windows) * share_of_b)))
    caches = ([], [])
    for i, (ids, start, end) in enumerate(zip(windows["input_ids"], windows["start_positions"],
                                              windows["end_positions"])):
        length = len(ids)
        expert, unsure = torch.log(torch.tensor(99.0 * (length - 1))), torch.log(torch.tensor(length - 1.0))
        a, b = torch.zeros(2, length), torch.zeros(2, length)
        for side, gold in enumerate((start, end)):
            a[side, gold] = unsure if i in b_rows else expert
            b[side, gold] = expert if i in b_rows else -expert
        caches[0].append(a)
        caches[1].append(b)
    return SpanTargets([SpanLogitCache(caches[0]), SpanLogitCache(caches[1])],
                       torch.tensor([windows["start_positions"], windows["end_positions"]]).t())


def _train(windows, tokenizer, targets, balance):
    from transformers import DataCollatorWithPadding

    gate = _gate()
    rows = windows.select_columns(["input_ids", "attention_mask", "token_type_ids"])
    epochs = train_gate(gate, rows, targets, DataCollatorWithPadding(tokenizer),
                        GateSchedule(epochs=8, learning_rate=1e-2, balance=balance, batch_size=16, seed=0))
    return gate, rows, epochs


FLOOR = 0.25  # the least share of the training windows the balanced gate gives either teacher


def test_the_balancing_loss_keeps_every_qa_teacher_above_the_floor_and_the_gate_collapses_without_it(
        vocab_dir, tmp_path):
    """Two span teachers, each the expert for part of the windows (A on 80%, B on 20%, windows the gate's input
    does not tell apart; halves would not show it: with two equal parts the best constant gate is 0.5 each). The
    span loss alone drives B's share to nothing (below 0.05); with the load-balancing loss at weight 1 either
    teacher keeps more than FLOOR of the windows. The recorded share and task loss are checked against the trained
    gate run window by window, unpadded, and the float64 span loss."""
    windows, tokenizer = _windows(vocab_dir, tmp_path)
    targets = _expert_caches(windows)
    assert len(windows) > 100 and 0 < sum(s == 0 for s in windows["start_positions"]) < len(windows)
    _, _, collapsed = _train(windows, tokenizer, targets, 0.0)
    gate, rows, balanced = _train(windows, tokenizer, targets, 1.0)
    assert min(collapsed[-1]["share"]) < 0.05
    assert min(balanced[-1]["share"]) > FLOOR
    gate.eval()
    with torch.no_grad():
        weights = torch.cat([gate(**{k: torch.tensor([v]) for k, v in rows[i].items()}) for i in range(len(rows))])
    assert balanced[-1]["share"] == pytest.approx(weights.mean(0).tolist(), abs=1e-3)
    lengths = [len(ids) for ids in windows["input_ids"]]
    z = torch.full((2, len(rows), 2, max(lengths)), -1e4)
    for k, cache in enumerate(targets.caches):
        for i, row in enumerate(cache.rows):
            z[k, i, :, :lengths[i]] = row
    assert balanced[-1]["task_loss"] == pytest.approx(
        _span_loss64(z, weights, targets.positions, lengths).item(), rel=1e-4)


def _qa_teacher_folder(folder, seed, vocab_dir):
    from transformers import AutoTokenizer

    _qa_teacher(seed).save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    return str(folder)


def test_a_gated_qa_run_scores_em_and_f1_and_records_the_teachers_shares(tmp_path, vocab_dir, capsys):
    paragraphs = qa_sets.year_paragraphs()
    data = qa_sets.write_squad(tmp_path / "squad", paragraphs[:12], paragraphs[12:18])
    teachers = [_qa_teacher_folder(tmp_path / name, seed, vocab_dir) for name, seed in (("a", 1), ("b", 2))]
    student = tiny.save_model("bert_mlm", tmp_path / "student", vocab_dir, seed=3)
    assert main(["--model", student, "--task", "squad", "--data_dir", str(data), "--teacher", teachers[0],
                 "--teacher", teachers[1], "--teacher_gate", "softmax", "--gate_epochs", "2",
                 "--distill_weights", '{"kl": 1}', "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                 *FAST]) == 0
    assert "gate epoch 2: teacher shares" in capsys.readouterr().err
    (path,) = Path(tmp_path / "out").rglob("result.json")
    record = json.loads(path.read_text())
    predictions = json.loads((path.parent / "predictions_validation.json").read_text())
    gold = {qa["id"]: [a["text"] for a in qa["answers"]]
            for article in json.loads((data / "dev-v1.1.json").read_text())["data"]
            for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    assert record["dev"]["validation"] == pytest.approx(squad_scores(predictions, gold))
    assert set(record["dev"]["validation"]) == {"exact_match", "f1"}
    gate = record["train"]["gate"]
    assert gate["kind"] == "softmax" and len(gate["epochs"]) == 2 and gate["rows"] == record["train"]["examples"]
    assert len(gate["epochs"][-1]["share"]) == 2 and sum(gate["epochs"][-1]["share"]) == pytest.approx(1, abs=1e-3)
    assert record["settings"]["teacher_gate"] == "softmax" and len(record["settings"]["teachers"]) == 2
    assert record["train"]["teacher_cache"]["rows"] == record["train"]["examples"]  # the gated mixture, cached


def test_a_qa_gate_needs_several_teachers(tmp_path, vocab_dir, capsys):
    paragraphs = qa_sets.year_paragraphs()
    data = qa_sets.write_squad(tmp_path / "squad", paragraphs[:4], paragraphs[4:6])
    teacher = _qa_teacher_folder(tmp_path / "a", 1, vocab_dir)
    with pytest.raises(SystemExit) as stop:
        main(["--model", teacher, "--task", "squad", "--data_dir", str(data), "--teacher", teacher,
              "--teacher_gate", "softmax", "--output_dir", str(tmp_path / "out"), *FAST])
    assert stop.value.code == 2 and "weighs several teachers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
