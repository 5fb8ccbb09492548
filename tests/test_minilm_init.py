"""Students of chosen size (MiniLM's 6x384): the asked shape, the teacher's tokenizer, random weights,
clear errors, and distill-train running the MiniLMv2 recipe's objective through them."""

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoTokenizer,
    BertConfig,
)

from distill.cli import init_main, train_main
from distill.models.families import FAMILIES
from distill.models.student import (
    RANDOM_WIDTH,
    StudentSize,
    build_sized_student,
    sized_student_config,
)
from distill.settings.config import load_config_file, parse_config
from tests import tiny

RECIPE = Path(__file__).parent.parent / "student_configs" / "minilmv2_6x384.json"
AUTO_CLASS = {"mlm": AutoModelForMaskedLM, "rtd": AutoModelForPreTraining}


def _field(config, what: str):
    """A config value by the registry's field name for ``what`` (num_layers, hidden_size, ...)."""
    return getattr(config, getattr(FAMILIES[config.model_type], f"{what}_field"))


@pytest.mark.parametrize("teacher_fixture,student_type,role", [
    ("bert_mlm_dir", "bert", "mlm"),
    ("bert_mlm_dir", "distilbert", "mlm"),
    ("distilbert_mlm_dir", "distilbert", "mlm"),
    ("electra_disc_dir", "electra", "rtd"),
])
def test_distill_init_builds_the_asked_shape_with_the_teachers_tokenizer(request, tmp_path, teacher_fixture,
                                                                          student_type, role):
    teacher_dir = request.getfixturevalue(teacher_fixture)
    out = tmp_path / "s"
    assert init_main(["--teacher", teacher_dir, "--num_layers", "2", "--hidden_size", "16", "--num_heads", "2",
                      "--student-type", student_type, "--output", str(out)]) == 0
    config, teacher_config = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(teacher_dir)
    assert config.model_type == student_type
    assert (_field(config, "num_layers"), _field(config, "hidden_size"), _field(config, "num_heads")) == (2, 16, 2)
    # the feed-forward width follows the teacher's ratio (64 / 32 wide) at the student's width
    assert _field(config, "intermediate_size") == 16 * _field(teacher_config, "intermediate_size") // 32
    assert config.vocab_size == teacher_config.vocab_size
    assert config.max_position_embeddings == teacher_config.max_position_embeddings
    if student_type == "electra":  # the factorised embedding width too, in the teacher's ratio (16 of 32 wide)
        assert config.embedding_size == 16 * teacher_config.embedding_size // 32 == 8

    model = AUTO_CLASS[role].from_pretrained(out)
    assert type(model).__name__ == FAMILIES[student_type].classes[role]
    base = model.base_model
    assert base.get_input_embeddings().weight.shape == (teacher_config.vocab_size,
                                                        getattr(config, "embedding_size", 16))
    assert len(base.get_submodule(FAMILIES[student_type].layers_path)) == 2
    AutoModel.from_pretrained(out)  # the base model alone loads too

    s_tok, t_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(teacher_dir)
    assert s_tok.get_vocab() == t_tok.get_vocab()
    text = "the city school was known for its new university"
    assert s_tok(text)["input_ids"] == t_tok(text)["input_ids"]

    record = json.loads((out / "student_init.json").read_text())
    assert record["layers"] is None and record["initialised"] == RANDOM_WIDTH
    assert (record["num_layers"], record["hidden_size"], record["num_heads"]) == (2, 16, 2)
    card = (out / "README.md").read_text()
    assert "initialised: random (width differs)" in card and "2 layers, hidden size 16, 2 heads" in card


def test_a_chosen_size_student_is_random_not_copied_and_seeded(bert_mlm_dir):
    """At the teacher's own width nothing is copied either: the weights are the family's fresh init
    (LayerNorm 1 and bias 0, dense weights with std initializer_range), decided by the seed alone."""
    teacher = AutoModelForMaskedLM.from_pretrained(bert_mlm_dir)
    config = teacher.config
    a = build_sized_student(config, StudentSize(2, 32, 4), seed=1)
    b = build_sized_student(config, StudentSize(2, 32, 4), seed=1)
    c = build_sized_student(config, StudentSize(2, 32, 4), seed=2)
    t_state = teacher.state_dict()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=0)
        if key in t_state and t_state[key].shape == value.shape and value.numel() > 1:
            assert not torch.equal(value, t_state[key]), f"{key} was copied from the teacher"
    assert not torch.equal(a.bert.encoder.layer[0].intermediate.dense.weight, c.bert.encoder.layer[0].intermediate.dense.weight)
    norm = a.bert.encoder.layer[1].output.LayerNorm
    assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
    std = float(torch.cat([a.bert.encoder.layer[i].attention.self.query.weight.detach().flatten() for i in range(2)]).std())
    assert abs(std - config.initializer_range) < 0.25 * config.initializer_range, std


def test_building_leaves_the_global_rng_alone(bert_mlm_dir):
    config = AutoConfig.from_pretrained(bert_mlm_dir)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_sized_student(config, StudentSize(1, 16, 2), seed=9)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("argv,words", [
    (["--num_layers", "2", "--hidden_size", "18", "--num_heads", "4"], ["hidden_size 18", "num_heads 4", "e.g. 16"]),
    (["--num_layers", "2", "--hidden_size", "18"], ["hidden_size 18", "num_heads 4"]),  # the teacher's 4 heads
    (["--num_layers", "0"], ["num_layers=0", ">= 1"]),
    (["--layers", "1,2", "--num_layers", "2"], ["--layers", "--num_layers", "one of the two"]),
    ([], ["--layers", "--num_layers"]),
])
def test_a_size_that_cannot_be_built_is_one_line_and_writes_nothing(bert_mlm_dir, tmp_path, capsys, argv, words):
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as exc:
        init_main(["--teacher", bert_mlm_dir, "--output", str(out), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("extra,words", [
    (dict(student_hidden_size=16), ["student_hidden_size", "student_num_layers"]),
    (dict(student_num_layers=2, student_layers=[1, 2]), ["student_num_layers", "student_layers"]),
    (dict(student_num_layers=2, student_hidden_size=16, student_num_heads=3), ["hidden_size 16", "num_heads 3"]),
])
def test_distill_train_refuses_contradictory_student_fields_in_one_line(bert_mlm_dir, tmp_path, capsys, extra, words):
    values = dict(teacher=bert_mlm_dir, corpus=str(_corpus(tmp_path)), output_dir=str(tmp_path / "run"),
                  weights={"qq_rel": 1.0}, relation_heads=4, device="cpu", **extra)
    with pytest.raises(SystemExit) as exc:
        train_main(tiny.cli_args(values))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and all(w in err[-1] for w in words), err
    assert not (tmp_path / "run" / "config.json").exists()


def _corpus(tmp_path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(tiny.WORDS[(i * 7 + j) % len(tiny.WORDS)] for j in range(40))
                                for i in range(48)) + "\n")
    return corpus


def _recipe_run(tmp_path, teacher_dir, **student) -> tuple[Path, list[dict]]:
    """The MiniLMv2 recipe's objective (its weights and teacher layer: the last) on tiny models."""
    recipe = load_config_file(str(RECIPE))
    out = tmp_path / "run"
    values = dict(teacher=teacher_dir, corpus=str(_corpus(tmp_path)), output_dir=str(out),
                  cache_dir=str(tmp_path / "cache"), weights=recipe["weights"], relation_heads=4,
                  relation_teacher_layer=4, block_size=16, per_device_batch_size=4, learning_rate=2e-3,
                  warmup_ratio=0.0, max_steps=10, precision="fp32", save_steps=0, logging_steps=1, progress=False,
                  device="cpu", threads=1, **student)
    assert train_main(tiny.cli_args(values)) == 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return out, log


def test_distill_train_runs_the_recipe_objective_from_a_distill_init_student_and_the_loss_goes_down(
        bert_mlm_dir, tmp_path):
    student = tmp_path / "student"
    assert init_main(["--teacher", bert_mlm_dir, "--num_layers", "2", "--hidden_size", "16", "--num_heads", "2",
                      "--output", str(student)]) == 0
    out, log = _recipe_run(tmp_path, bert_mlm_dir, student=str(student))
    terms = set(load_config_file(str(RECIPE))["weights"])
    assert terms <= set(log[0])
    first, last = (sum(r[k] for k in terms) for r in (log[0], log[-1]))
    assert last < 0.9 * first, (first, last)
    saved = AutoModelForMaskedLM.from_pretrained(out)
    assert (saved.config.num_hidden_layers, saved.config.hidden_size, saved.config.num_attention_heads) == (2, 16, 2)
    record = json.loads((out / "student_init.json").read_text())
    assert record["layers"] is None and record["initialised"] == RANDOM_WIDTH and record["distilled"]
    assert "initialised: random (width differs)" in (out / "README.md").read_text()


def test_distill_train_builds_the_student_from_size_fields_as_distill_init_does(bert_mlm_dir, tmp_path):
    """student_num_layers etc. build in the run exactly the student distill-init --seed writes."""
    from safetensors.torch import load_file

    folder = tmp_path / "init"
    assert init_main(["--teacher", bert_mlm_dir, "--num_layers", "2", "--hidden_size", "16", "--num_heads", "2",
                      "--seed", "56", "--output", str(folder)]) == 0
    config = AutoConfig.from_pretrained(bert_mlm_dir)
    built = build_sized_student(config, StudentSize(2, 16, 2), seed=56)
    on_disk = load_file(str(folder / "model.safetensors"))
    for key, value in built.state_dict().items():
        if key in on_disk:
            torch.testing.assert_close(on_disk[key], value, rtol=0, atol=0)
    out, log = _recipe_run(tmp_path, bert_mlm_dir, student_num_layers=2, student_hidden_size=16, student_num_heads=2)
    assert len(log) == 10
    recorded = json.loads((out / "distill_config.json").read_text())
    assert (recorded["student_num_layers"], recorded["student_hidden_size"], recorded["student_num_heads"]) == (2, 16, 2)
    assert AutoConfig.from_pretrained(out).hidden_size == 16


def test_the_minilmv2_recipe_passes_the_config_checks_and_builds_the_papers_shape():
    cfg = parse_config(["--config", str(RECIPE)])
    assert cfg.teacher == "bert-base-uncased" and cfg.student is None and cfg.student_layers is None
    assert set(cfg.weights) == {"qq_rel", "kk_rel", "vv_rel"} and cfg.relation_heads == 48
    assert cfg.relation_teacher_layer == 12 and (cfg.precision, cfg.fp16_opt_level) == ("fp16", "O2")
    # bert-base's config is BertConfig's default; the student from it is all-MiniLM-L6-v2's shape (22.7M parameters)
    teacher = BertConfig(architectures=["BertForPreTraining"])
    size = StudentSize(cfg.student_num_layers, cfg.student_hidden_size, cfg.student_num_heads,
                       cfg.student_intermediate_size)
    student = sized_student_config(teacher, size)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModel.from_config(student).parameters())
    assert round(n_params / 1e6, 1) == 22.7
    from distill.objective.plan import Objective

    objective = Objective.from_config(cfg.weights, student_config=student, teacher_config=teacher,
                                      relation_heads=cfg.relation_heads, relation_teacher_layer=cfg.relation_teacher_layer)
    assert "qq_rel" in objective.describe()


def test_the_recipe_student_matches_the_installed_minilm_shape():
    """all-MiniLM-L6-v2 is a published 6x384 BERT student: the recipe's shape is its shape."""
    from distill.common.assets import minilm_dir

    try:
        reference = AutoConfig.from_pretrained(minilm_dir())
    except Exception:  # noqa: BLE001 - the optional offline package is absent
        pytest.skip("all-MiniLM-L6-v2 is not installed")
    recipe = load_config_file(str(RECIPE))
    assert (reference.num_hidden_layers, reference.hidden_size, reference.num_attention_heads,
            reference.intermediate_size) == (recipe["student_num_layers"], recipe["student_hidden_size"],
                                             recipe["student_num_heads"], recipe["student_intermediate_size"])


def test_a_chosen_size_on_the_demo_recipe_drops_only_the_demos_layer_selection():
    cfg = parse_config(["--student_num_layers", "2", "--student_hidden_size", "192"])
    assert cfg.student_layers is None and (cfg.student_num_layers, cfg.student_hidden_size) == (2, 192)
    assert parse_config([]).student_layers == [2, 4, 6]  # the demo itself is unchanged


def test_the_demo_with_a_chosen_size_drops_its_own_layer_selection_whichever_spelling_names_it():
    from distill.settings.config import parse_config

    for flag in ("--student_num_layers", "--student-num-layers"):
        cfg = parse_config([flag, "2", "--student_hidden_size", "16", "--student_num_heads", "2"])
        assert cfg.student_num_layers == 2 and cfg.student_layers is None
    assert parse_config([]).student_layers == [2, 4, 6]  # the demo itself keeps its layers
