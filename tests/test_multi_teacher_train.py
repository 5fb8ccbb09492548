"""Several teachers in distill-train: the soft targets are the weighted mixture of the teachers' own, the
representation terms the weighted sum of each teacher's own term through its own layer map, one teacher
twice (or weight 0) is the one-teacher run exactly, and bad lists are refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from distill.cli import train_main
from distill.common.errors import UsageError
from distill.models.loading import extract
from distill.models.student import build_student
from distill.objective.mixture import TeacherMix
from distill.objective.plan import Objective
from distill.settings.config import make_config, parse_config
from distill.train.loop import train
from distill.train.step import StudentStep
from distill.train.teachers import build_objective, read_teachers
from tests import tiny
from tests.test_train import write_corpus

T = 2.0


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, vocab_dir):
    """Two tiny masked-LM BERTs of different seeds: A (4 layers, the student's source) and B (6 layers)."""
    from transformers import AutoTokenizer

    a = tiny.save_model("bert_mlm", tmp_path_factory.mktemp("teacher_a"), vocab_dir, seed=0)
    b = str(tmp_path_factory.mktemp("teacher_b"))
    model = tiny.build_model("bert_mlm", seed=1, num_hidden_layers=6)
    with torch.no_grad():  # a surer teacher than A (random tiny heads are near uniform): entropy weights differ
        model.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
    model.save_pretrained(b)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(b)
    return a, b


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _setup(teacher, weights, teacher_weights=None, **more):
    """The objective distill-train builds for this recipe, the student from the first teacher's layers 1,3, the
    teacher models (eval mode) and a batch with MLM targets."""
    cfg = make_config({"teacher": teacher, "teacher_weights": teacher_weights, "student_layers": [1, 3],
                       "weights": weights, "temperature": T, **more})
    found = read_teachers(cfg, str)
    models = {p: AutoModelForMaskedLM.from_pretrained(p, attn_implementation="eager").eval() for p in found.paths}
    first = models.get(found.first[0]) or AutoModelForMaskedLM.from_pretrained(found.first[0],
                                                                              attn_implementation="eager")
    student, _ = build_student(first, [1, 3], "bert")
    objective = build_objective(cfg, found, student.config, [1, 3])
    ids, mask = tiny.random_batch(batch=3, seq=12, seed=3)
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = ids[:, 2:5]
    batch = {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels * mask - 100 * (1 - mask)}
    return objective, student.eval(), [models[p] for p in found.paths], batch


def _loss(objective, student, teacher_models, batch):
    step = StudentStep(student, objective, teacher_models if isinstance(objective, TeacherMix) else teacher_models[0])
    with torch.no_grad():
        return step(batch)


def _real_logits64(model, batch):
    """The model's own masked-LM logits at the real tokens, float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()].double()


def _hidden64(model, batch, layer):
    """The output of the model's own ``layer`` (1-based; 0: the embeddings) at the real tokens, float64, read by
    a forward hook on that module (transformers 5's ``output_hidden_states`` leaves out the last layer's)."""
    module = model.bert.embeddings if layer == 0 else model.bert.encoder.layer[layer - 1]
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return seen[0][batch["attention_mask"].bool()].double()


@pytest.mark.parametrize("chunk_rows", [0, -1])  # the vocabulary head chunk by chunk, and whole
@pytest.mark.parametrize("mix", ["0.7,0.3", "entropy"])
def test_ce_and_kl_read_exactly_the_weighted_mixture_of_the_teachers_soft_targets(teachers, mix, chunk_rows):
    objective, student, models, batch = _setup(list(teachers), {"ce": 1.0, "kl": 1.0}, mix,
                                               logit_chunk_rows=chunk_rows)
    assert isinstance(objective, TeacherMix)
    _, terms = _loss(objective, student, models, batch)
    za, zb, zs = (_real_logits64(m, batch) for m in (*models, student))
    if mix == "entropy":  # per token: softmax over the teachers of minus their entropy at T = 1
        entropy = torch.stack([-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1) for z in (za, zb)], -1)
        w = torch.softmax(-entropy, -1)
        wa, wb = w[:, :1], w[:, 1:]
        assert not torch.allclose(wa, torch.full_like(wa, 0.5), atol=1e-3)  # the weights do differ per token
    else:
        wa, wb = 0.7, 0.3
    p = wa * torch.softmax(za / T, -1) + wb * torch.softmax(zb / T, -1)
    log_q = torch.log_softmax(zs / T, -1)
    ce = (-(p * log_q).sum(-1)).mean() * T ** 2
    kl = (p * (p.log() - log_q)).sum(-1).mean() * T ** 2
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    # not the first teacher's alone: the second one moved it
    ce_a = (-(torch.softmax(za / T, -1) * log_q).sum(-1)).mean() * T ** 2
    assert abs(ce_a.item() - ce.item()) > 1e-3


def test_hid_mse_is_the_weighted_sum_of_each_teachers_term_through_its_own_layer_map(teachers):
    objective, student, models, batch = _setup(list(teachers), {"hid_mse": 1.0}, "0.7,0.3")
    _, terms = _loss(objective, student, models, batch)
    a, b = models

    def mse(pairs, teacher):
        return sum(((_hidden64(student, batch, s) - _hidden64(teacher, batch, t)) ** 2).mean()
                   for s, t in pairs) / len(pairs)

    # A: the student's own source layers 1,3; B has 6 layers: 1,3 scaled by 6/4 and rounded -> 2,4
    own_a, own_b = mse([(1, 1), (2, 3)], a), mse([(1, 2), (2, 4)], b)
    assert objective.to_dict()["teachers"][1]["layer_map"] == [[1, 2], [2, 4]]
    assert terms["hid_mse"].item() == pytest.approx((0.7 * own_a + 0.3 * own_b).item(), rel=1e-5)
    assert abs(own_a - own_b) > 0.5  # the two teachers' terms are far apart: the weights and maps are what count


@pytest.mark.parametrize("weights", [{"ce": 5.0, "mlm": 2.0, "hid_mse": 1.0, "att_mse": 1.0}, {"kl": 1.0, "cos": 1.0}])
def test_one_teacher_twice_or_a_zero_weight_is_exactly_the_one_teacher_loss(teachers, weights):
    a, b = teachers
    single, student, models, batch = _setup(a, weights)
    assert isinstance(single, Objective)
    expected, _ = _loss(single, student, models, batch)
    for teacher, mix in (([a, a], None), ([a, b], "1,0"), ([a, b, a], "0.2,0,0.8")):
        objective, _, _, _ = _setup(teacher, weights, mix)
        assert isinstance(objective, Objective) and not isinstance(objective, TeacherMix)  # B never even runs
        assert torch.equal(_loss(objective, student, models, batch)[0], expected)
    # entropy weights are per token, so a teacher twice stays two: the mixture of two equal teachers is that one
    objective, _, twice, _ = _setup([a, a], weights, "entropy")
    assert isinstance(objective, TeacherMix) and len(twice) == 2
    assert _loss(objective, student, twice, batch)[0].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_several_teachers_are_read_from_flags_and_recipe_lists(teachers, tmp_path):
    a, b = teachers
    cfg = parse_config(["--teacher", a, "--teacher", b, "--teacher_weights", "3,1", "--student_layers", "1,3"])
    assert (cfg.teacher, cfg.other_teachers, cfg.teacher_weights) == (a, [b], "3,1")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"teacher": [a, b], "teacher_weights": [0.7, 0.3], "student_layers": [1, 3]}))
    cfg = parse_config(["--config", str(recipe)])
    assert (cfg.teacher, cfg.other_teachers, cfg.teacher_weights) == (a, [b], "0.7,0.3")
    assert read_teachers(cfg, str).weights == pytest.approx([0.7, 0.3])
    # --teacher on the command line names the whole list; one --teacher is the one-teacher recipe
    cfg = parse_config(["--config", str(recipe), "--teacher", b, "--teacher_weights", "none"])
    assert (cfg.teacher, cfg.other_teachers) == (b, [])


def _bad(capsys, argv, out):
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert not Path(out).exists()
    return err


def _argv(teachers, corpus, out, tmp_path, **more):
    values = dict(corpus=corpus, output_dir=str(out), cache_dir=str(tmp_path / "cache"), student_layers=[1, 3],
                  student_type="bert", block_size=32, per_device_batch_size=4, max_steps=4, precision="fp32",
                  save_steps=2, logging_steps=1, progress=False, device="cpu", learning_rate=1e-3,
                  weights={"ce": 5.0, "mlm": 2.0, "hid_mse": 1.0, "att_mse": 1.0})
    values.update(more)
    return [arg for t in teachers for arg in ("--teacher", t)] + tiny.cli_args(values)


def test_bad_teacher_lists_are_refused_in_one_line_before_anything_is_written(teachers, corpus, tmp_path, capsys,
                                                                               vocab_dir):
    a, b = teachers
    out = tmp_path / "o"
    for weights, needle in (("0.7", "give 2 numbers >= 0"), ("x,y", "one number per teacher"),
                            ("0.5,-1", "give 2 numbers >= 0"), ("0,0", "not all 0"), ("nan,1", "give 2 numbers")):
        err = _bad(capsys, _argv([a, b], corpus, out, tmp_path, teacher_weights=weights), out)
        assert f"--teacher_weights {weights!r}" in err, err
        assert needle in err
    err = _bad(capsys, _argv([a], corpus, out, tmp_path, teacher_weights="0.5,0.5"), out)
    assert "give --teacher more than once" in err
    # another vocabulary: other embedding rows; or the same rows, another tokenizer
    wide = tiny.save_model("bert_mlm", tmp_path / "wide", None, seed=2, vocab_size=tiny.VOCAB_SIZE + 7)
    err = _bad(capsys, _argv([a, wide], corpus, out, tmp_path), out)
    assert err == (f"error: --teacher {wide!r} and the student have different vocabularies ({tiny.VOCAB_SIZE + 7} vs "
                   f"{tiny.VOCAB_SIZE} tokens): both read the same token ids, so they need the same tokenizer")
    other = Path(tiny.save_model("bert_mlm", tmp_path / "other", vocab_dir, seed=2))
    tokens = tiny.vocab_tokens()
    tokens[10], tokens[11] = tokens[11], tokens[10]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink(missing_ok=True)
    (other / "vocab.txt").write_text("\n".join(tokens) + "\n")
    err = _bad(capsys, _argv([a, str(other)], corpus, out, tmp_path), out)
    assert "vocabularies differ" in err and str(other) in err
    # a wider teacher with no projection to reach it: its hidden states cannot be compared
    wider = tiny.save_model("bert_mlm", tmp_path / "wider", vocab_dir, seed=2, hidden_size=48, intermediate_size=96)
    err = _bad(capsys, _argv([a, wider], corpus, out, tmp_path, projection=False), out)
    assert err.startswith(f"error: teacher 2 ({wider}): term 'hid_mse' compares hidden states") and "48" in err
    err = _bad(capsys, _argv([a, b], corpus, out, tmp_path, weights={"out_mse": 1.0}), out)
    assert "out_mse" in err and "ce or kl" in err


def test_a_short_two_teacher_run_saves_a_loadable_student_and_resumes_exactly(teachers, corpus, tmp_path, capsys):
    a, b = teachers
    out = tmp_path / "o"
    assert train_main(_argv([a, b], corpus, out, tmp_path, teacher_weights="0.7,0.3")) == 0
    student = AutoModelForMaskedLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    record = json.loads((out / "distill_config.json").read_text())
    assert (record["teacher"], record["other_teachers"], record["teacher_weights"]) == (a, [b], "0.7,0.3")
    assert (out / "checkpoints" / "step-00000002").is_dir()
    finished = tiny.saved_weights(out)
    # resume from step 2: steps 3 and 4 again give the very same student
    assert train_main(_argv([a, b], corpus, out, tmp_path, teacher_weights="0.7,0.3", resume=True)) == 0
    assert "resumed from" in capsys.readouterr().err
    again = tiny.saved_weights(out)
    assert again.keys() == finished.keys() and all(torch.equal(again[k], finished[k]) for k in finished)
    # the teacher list is part of the recipe a resumed run keeps
    with pytest.raises(SystemExit):
        train_main(_argv([a], corpus, out, tmp_path, resume=True))
    assert "other_teachers=[]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(_argv([a, b], corpus, out, tmp_path, teacher_weights="0.5,0.5", resume=True))
    assert "teacher_weights" in capsys.readouterr().err


def test_a_first_teacher_of_weight_0_builds_the_student_and_is_then_let_go(teachers, corpus, tmp_path, monkeypatch):
    """``--teacher A --teacher B --teacher_weights 0,1``: the student is A's layers, B alone teaches, and A's
    model is freed once the student is built (not held for the whole run)."""
    import gc
    import weakref

    from distill.train import setup
    from distill.train.distributed import setup_distributed

    a, b = teachers
    made = {}
    real = setup.load_models

    def remembered(*args, **kwargs):
        out = real(*args, **kwargs)
        made["first"] = weakref.ref(out[0])
        return out

    monkeypatch.setattr(setup, "load_models", remembered)
    cfg = make_config({"teacher": [a, b], "teacher_weights": "0,1", "output_dir": str(tmp_path / "o"), "corpus": corpus, "student_layers": [1, 3], "student_type": "bert",
                       "block_size": 32, "per_device_batch_size": 4, "max_steps": 1, "precision": "fp32",
                       "device": "cpu", "cache_dir": str(tmp_path / "cache"), "weights": {"hid_mse": 1.0}})
    run = setup.build_run(cfg, setup_distributed(cfg.device))
    gc.collect()
    assert made["first"]() is None  # A's model is gone
    own_b = AutoModelForMaskedLM.from_pretrained(b)
    assert run.teacher.config.num_hidden_layers == 6 and run.step_teachers() is run.teacher
    assert all(torch.equal(p, q) for p, q in zip(run.teacher.state_dict().values(), own_b.state_dict().values()))
    own_a = AutoModelForMaskedLM.from_pretrained(a)  # the student is still A's layers 1 and 3
    assert torch.equal(run.student.bert.encoder.layer[1].output.dense.weight,
                       own_a.bert.encoder.layer[2].output.dense.weight)


def test_each_teacher_runs_only_what_its_terms_read(teachers):
    a, b = teachers
    objective, student, models, batch = _setup([a, b], {"hid_mse": 1.0}, "0.7,0.3")
    requests = [o.requests()["teacher"] for o in objective.objectives]
    assert [r.depth for r in requests] == [3, 4]  # A stops after its layer 3, B after its layer 4 of 6
    assert all(r.logits is None and not r.attentions for r in requests)
    features = StudentStep(student, objective, models).teacher_features(batch)
    assert [f.logits for f in features] == [None, None]


def test_a_command_line_teacher_replaces_a_recipes_whole_list_and_its_weights():
    """--teacher on the command line names every teacher: a two-teacher recipe's others and weights (which were for
    its own list) go; --teacher_weights given beside it stands; --other_teachers and a repeated --teacher clash."""
    from distill.common.errors import UsageError
    from distill.settings.config import parse_config

    recipe = str(Path(__file__).resolve().parents[1] / "student_configs" / "bert_4l_multi_teacher.json")
    both = parse_config(["--config", recipe])
    assert len(both.other_teachers) == 1 and both.teacher_weights is not None
    one = parse_config(["--config", recipe, "--teacher", "bert-base-uncased"])
    assert (one.teacher, one.other_teachers, one.teacher_weights) == ("bert-base-uncased", [], None)
    two = parse_config(["--config", recipe, "--teacher", "a", "--teacher", "b", "--teacher_weights", "1,3"])
    assert (two.teacher, two.other_teachers, two.teacher_weights) == ("a", ["b"], "1,3")
    with pytest.raises(UsageError, match="--other_teachers and a repeated --teacher"):
        parse_config(["--teacher", "a", "--other_teachers", "b", "--teacher", "c"])


@pytest.mark.slow
def test_two_processes_equal_one_with_two_teachers(tmp_path, vocab_dir, corpus):
    """Several teachers under torchrun: two processes with the same global batch give one process's student
    (the teachers' mixture and each teacher's layer map, per process; no dropout, so the runs compare exactly)."""
    import os
    import shutil
    import subprocess
    import sys

    quiet = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    a = tiny.save_model("bert_mlm", tmp_path / "a", vocab_dir, seed=0, **quiet)
    b = tiny.save_model("bert_mlm", tmp_path / "b", vocab_dir, seed=1, num_hidden_layers=6, **quiet)
    common = dict(teacher_weights="0.7,0.3", per_device_batch_size=3, max_steps=3, save_steps=0)
    assert train_main(_argv([a, b], corpus, tmp_path / "one", tmp_path, gradient_accumulation_steps=2, **common)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           shutil.which("distill-train"), *_argv([a, b], corpus, tmp_path / "two", tmp_path, **common)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two, start = (tiny.saved_weights(tmp_path / n) for n in ("one", "two", "a"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(one[k], start[k]) for k in one if k in start) > 10  # the runs trained
