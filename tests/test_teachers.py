"""Several teachers with fixed weights: the student's soft targets are exactly the weighted mixture of theirs."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill.common.errors import UsageError
from distill.models.loading import extract
from distill.objective import losses
from glue_eval.cli import main
from glue_eval.distillation import load_checked_teacher
from glue_eval.tasks import get_task
from glue_eval.teacher_cache import CachePlan, TeacherCache
from glue_eval.teachers import (
    TeacherMixture,
    gather_teacher_flags,
    mix_logits,
    mixture_weights,
    teacher_paths,
)
from tests import tiny


def _mixture64(logits, weights, temperature):
    """sum_k w_k softmax(z_k / T) in float64."""
    return sum(w * torch.softmax(z.double() / temperature, -1) for z, w in zip(logits, weights))


def test_mixed_logits_give_exactly_the_weighted_mixture_of_soft_targets():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3]
    z[1][0, 2] = -200.0  # a class one teacher all but rules out: still finite, still mixed
    for temperature in (1.0, 2.0, 4.5):
        mixed = mix_logits(z, torch.tensor([0.7, 0.3]), temperature)
        assert torch.isfinite(mixed).all()
        expected = _mixture64(z, [0.7, 0.3], temperature)
        assert torch.allclose(torch.softmax(mixed.double() / temperature, -1), expected, atol=1e-6)
        # and so the kl term against the mixture is the divergence from the mixed distribution itself
        student = torch.randn(5, 4, generator=g)
        kl = losses.kl_divergence(student, mixed, temperature)
        log_s = torch.log_softmax(student.double() / temperature, -1)
        reference = (expected * (expected.log() - log_s)).sum(-1).mean() * temperature ** 2
        assert kl.item() == pytest.approx(reference.item(), abs=1e-5)
    regression = mix_logits([torch.tensor([[1.0]]), torch.tensor([[3.0]])], torch.tensor([0.25, 0.75]), 2.0)
    assert regression.item() == pytest.approx(2.5)  # a one-output head: the weighted mean


def test_repeated_teacher_flags_and_weights_are_read_in_order():
    argv = gather_teacher_flags(["--model", "m", "--teacher", "a", "--seed", "1", "--teacher=b", "--teacher", "c"])
    assert argv == ["--model", "m", "--teacher", "a", "--seed", "1", "--other_teachers", "b,c"]
    glue = SimpleNamespace(teacher="a", other_teachers="b,c", teacher_weights="2,1,1")
    assert teacher_paths(glue) == ["a", "b", "c"] and mixture_weights(glue) == [0.5, 0.25, 0.25]
    assert mixture_weights(SimpleNamespace(teacher="a", other_teachers="b", teacher_weights=None)) == [0.5, 0.5]
    for bad, message in (("0.7", "give 2 numbers > 0"), ("0.7,-0.3", "give 2 numbers > 0"), ("x,y", "one number")):
        with pytest.raises(UsageError, match=message):
            mixture_weights(SimpleNamespace(teacher="a", other_teachers="b", teacher_weights=bad))
    with pytest.raises(UsageError, match="give --teacher more than once"):
        mixture_weights(SimpleNamespace(teacher="a", other_teachers=None, teacher_weights="1"))


def _classifier(folder, seed, vocab_dir, labels=("no", "yes"), **overrides):
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny.make_config("bert", num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={n: i for i, n in enumerate(labels)}, **overrides)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def two_teachers(tmp_path, vocab_dir):
    return [_classifier(tmp_path / "a", 1, vocab_dir), _classifier(tmp_path / "b", 2, vocab_dir)]


def _spec(tmp_path):
    rows = [("the city was new", "yes"), ("one of the first", "no")] * 8
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    spec = {"name": "tiny", "train": "train.csv", "dev": "train.csv", "text_columns": ["text"],
            "label_column": "label", "labels": ["no", "yes"], "metric": "accuracy"}
    (tmp_path / "task.json").write_text(json.dumps(spec))
    return str(tmp_path / "task.json")


def test_the_mixture_teacher_and_its_cache_give_the_mixed_soft_targets(tmp_path, two_teachers, vocab_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    import datasets

    student = AutoModelForSequenceClassification.from_pretrained(_classifier(tmp_path / "s", 3, vocab_dir))
    glue = SimpleNamespace(teacher=two_teachers[0], other_teachers=two_teachers[1], teacher_weights="0.7,0.3",
                           temperature=2.0, tokenizer=None, model=str(tmp_path / "s"))
    mixture = load_checked_teacher(glue, get_task(_spec(tmp_path)), student, eager=False)
    assert isinstance(mixture, TeacherMixture)
    tokenizer = AutoTokenizer.from_pretrained(vocab_dir)
    rows = datasets.Dataset.from_dict(dict(tokenizer(["the city was new in the world", "one of the first"])))
    batch = DataCollatorWithPadding(tokenizer)([rows[0], rows[1]])
    with torch.no_grad():
        own = [AutoModelForSequenceClassification.from_pretrained(p).eval()(**batch).logits for p in two_teachers]
        z = extract(mixture, batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                    sequence_logits=True).logits
    expected = _mixture64(own, [0.7, 0.3], 2.0)
    assert torch.allclose(torch.softmax(z.double() / 2.0, -1), expected, atol=1e-6)
    cache = TeacherCache.build(mixture, rows, DataCollatorWithPadding(tokenizer), CachePlan(), batch_size=1)
    assert torch.allclose(cache.logits, z, atol=1e-5)


def test_two_teachers_with_weights_run_end_to_end_and_are_recorded(tmp_path, two_teachers, vocab_dir):
    student = _classifier(tmp_path / "s", 3, vocab_dir)
    assert main(["--model", student, "--task", _spec(tmp_path), "--teacher", two_teachers[0], "--teacher",
                 two_teachers[1], "--teacher_weights", "0.7,0.3", "--distill_weights", '{"kl": 1, "hard_ce": 1}',
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--use_cpu", "--precision", "fp32",
                 "--report_to", "none", "--disable_tqdm", "true"]) == 0
    (path,) = Path(tmp_path / "out").rglob("result.json")
    settings = json.loads(path.read_text())["settings"]
    assert settings["teachers"] == two_teachers and settings["teacher_weights"] == pytest.approx([0.7, 0.3])


def test_teachers_that_cannot_be_mixed_are_refused_in_one_line(tmp_path, two_teachers, vocab_dir, capsys):
    from transformers import BertTokenizer

    wide = _classifier(tmp_path / "wide", 4, vocab_dir, vocab_size=tiny.VOCAB_SIZE + 5)
    shuffled = _classifier(tmp_path / "shuffled", 5, vocab_dir)  # the same size, another tokenizer
    tokens = tiny.vocab_tokens()
    (Path(shuffled) / "vocab.txt").write_text("\n".join(tokens[:5] + tokens[5:][::-1]) + "\n")
    for name in ("tokenizer.json",):
        (Path(shuffled) / name).unlink()
    BertTokenizer.from_pretrained(shuffled).save_pretrained(shuffled)
    student = _classifier(tmp_path / "s", 3, vocab_dir)
    base = ["--model", student, "--task", _spec(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--use_cpu", "--precision", "fp32", "--report_to", "none"]
    cases = [
        (["--teacher", two_teachers[0], "--teacher", wide], "different vocabularies"),
        (["--teacher", two_teachers[0], "--teacher", shuffled], "vocabularies differ"),
        (["--teacher", two_teachers[0], "--teacher", two_teachers[1], "--teacher_weights", "1,2,3"], "give 2 numbers"),
        (["--teacher", two_teachers[0], "--teacher_weights", "1"], "give --teacher more than once"),
        (["--teacher", two_teachers[0], "--teacher", two_teachers[1], "--distill_weights", '{"hid_mse": 1}',
          "--student_layers", "1,2,3,4", "--teacher_gate", "softmax"], "which the gate does not weigh"),
        (["--teacher", two_teachers[0], "--teacher", str(tmp_path / "none")], "is not a model folder"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and message in err[-1], (extra, err)
    assert not list(Path(tmp_path / "out").rglob("result.json"))


def test_two_qa_teachers_mix_their_span_distributions_over_real_tokens():
    from transformers import BertForQuestionAnswering

    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(BertForQuestionAnswering(tiny.make_config("bert")).eval())
    mixture = TeacherMixture(teachers, [0.25, 0.75], temperature=3.0)
    ids = torch.randint(5, tiny.VOCAB_SIZE, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = mixture(input_ids=ids, attention_mask=mask)
        own = [t(input_ids=ids, attention_mask=mask) for t in teachers]
    for i in range(2):
        real = mask[i].bool()
        for mixed, name in ((out.start_logits, "start_logits"), (out.end_logits, "end_logits")):
            expected = _mixture64([getattr(o, name)[i][real] for o in own], [0.25, 0.75], 3.0)
            assert torch.allclose(torch.softmax(mixed[i][real].double() / 3.0, -1), expected, atol=1e-6)
            assert (mixed[i][~real] < -1e8).all()  # padding holds no mass in the mixture


def test_confidence_weights_favour_the_surer_teacher_per_example():
    from glue_eval.teachers import confidence_weights

    assert mixture_weights(SimpleNamespace(teacher="a", other_teachers="b", teacher_weights="entropy")) == "entropy"
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(4, 3, generator=g) * 4, torch.randn(4, 3, generator=g)]
    entropy = torch.stack([-(torch.softmax(t.double(), -1) * torch.log_softmax(t.double(), -1)).sum(-1) for t in z])
    expected = torch.softmax(-entropy, dim=0).t()  # [4, 2]
    assert torch.allclose(confidence_weights(z).double(), expected, atol=1e-6)
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        from transformers import BertForSequenceClassification

        teachers.append(BertForSequenceClassification(tiny.make_config("bert", num_labels=3)).eval())
    mixture = TeacherMixture(teachers, "entropy", temperature=2.0)
    ids = torch.randint(5, tiny.VOCAB_SIZE, (4, 8))
    with torch.no_grad():
        mixed = mixture(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        own = [t(input_ids=ids).logits for t in teachers]
    w = confidence_weights(own).double()
    target = sum(w[:, k, None] * torch.softmax(own[k].double() / 2.0, -1) for k in range(2))
    assert torch.allclose(torch.softmax(mixed.double() / 2.0, -1), target, atol=1e-6)
