"""Recipes: JSON files + command-line overrides, and one clear line for each bad one."""

import json
from pathlib import Path

import pytest

from distill.cli import train_main
from distill.config import FIELDS, load_config_file, parse_config
from distill.terms import check_weights

RECIPES = sorted((Path(__file__).parent.parent / "student_configs").glob("*.json"))


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"weights": {"ce": 5, "mlm": 2, "cos": 1}, "learning_rate": 1e-4,
                                "student_layers": [1, 5, 8, 12]}))
    cfg = parse_config(["--config", str(path), "--learning_rate", "3e-4", "--student_layers", "1,2",
                        "--resume", "--weights", '{"cos": 2}', "--max_documents", "7"])
    assert cfg.learning_rate == 3e-4 and cfg.student_layers == [1, 2] and cfg.resume is True
    assert cfg.weights == {"cos": 2.0} and cfg.max_documents == 7
    assert parse_config(["--config", str(path)]).weights == {"ce": 5.0, "mlm": 2.0, "cos": 1.0}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    values = load_config_file(str(recipe))
    cfg = parse_config(["--config", str(recipe)])
    for key, value in values.items():  # every value of the file reaches the run as written (ints widened)
        assert getattr(cfg, key) == value, key
    # the objective's own check (term keys, weights), which loading a file does not do
    active = check_weights(cfg.weights, sequence_level=False)
    assert active == {k: float(w) for k, w in values.get("weights", cfg.weights).items() if w > 0}


def test_every_field_is_documented_in_the_readme():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in FIELDS if f"`{name}`" not in readme]
    assert not missing, f"README does not document recipe fields {missing}"


def _bad(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_invalid_json(capsys, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"weights": {"cos": 1},}')
    assert "not valid JSON" in _bad(capsys, ["--config", str(path)])


def test_unknown_field(capsys, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"learning_rat": 1e-4}')
    err = _bad(capsys, ["--config", str(path)])
    assert "learning_rat" in err and "unknown" in err


def test_unknown_command_line_field(capsys):
    assert "--no_such_field" in _bad(capsys, ["--no_such_field", "3"])


def test_bad_value_type(capsys):
    assert "learning_rate" in _bad(capsys, ["--learning_rate", "fast"])


def test_missing_config_file(capsys, tmp_path):
    assert "does not exist" in _bad(capsys, ["--config", str(tmp_path / "nope.json")])
