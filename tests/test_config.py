"""Recipes: JSON files + command-line overrides, and one clear line for each bad one."""

import json
from pathlib import Path

import pytest

from distill.cli import train_main
from distill.objective.terms import check_weights
from distill.settings.config import FIELDS, load_config_file, parse_config

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


# --------------------------------------------------------------------------- numeric fields, checked up front

RANGED = {name: f for name, f in FIELDS.items() if f.metadata["range"] is not None}


def _bad_values(name):
    """Values just outside the field's declared range, and NaN/inf for float fields."""
    f = RANGED[name]
    allowed, is_int = f.metadata["range"], str(f.type).startswith("int")
    values = [] if is_int else ["nan", "inf", "-inf"]
    values.append(str(int(allowed.low) if allowed.low_open and is_int else
                      allowed.low if allowed.low_open else (int(allowed.low) - 1 if is_int else allowed.low - 1e-3)))
    if allowed.high != float("inf"):
        values.append(str(allowed.high if allowed.high_open else
                          (int(allowed.high) + 1 if is_int else allowed.high + 1e-3)))
    return values


def test_every_numeric_field_declares_a_range():
    numeric = [n for n, f in FIELDS.items() if str(f.type).split(" |")[0] in ("int", "float")]
    assert numeric and sorted(numeric) == sorted(RANGED)


@pytest.mark.parametrize("name, value", [(n, v) for n in RANGED for v in _bad_values(n)])
def test_out_of_range_values_stop_before_anything_is_written(capsys, tmp_path, name, value):
    out = tmp_path / "out"
    err = _bad(capsys, [f"--{name}={value}", "--output_dir", str(out)])
    allowed = str(RANGED[name].metadata["range"])
    assert err.startswith(f"error: {name}=") and "out of range" in err and allowed in err, err
    assert repr(float(value) if "." in value or value.endswith("inf") or value == "nan" else int(value)) in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_range_message_reads_as_written(capsys):
    assert _bad(capsys, ["--learning_rate", "nan"]) == (
        "error: learning_rate=nan is out of range: it must be a finite number in (0, 1]")
    assert _bad(capsys, ["--adam_beta2", "1"]) == (
        "error: adam_beta2=1.0 is out of range: it must be a finite number in [0, 1)")
    assert _bad(capsys, ["--threads", "0"]) == (
        'error: threads=0 is out of range: it must be a finite number in [1, inf) or "auto"')


def test_values_inside_the_range_pass(tmp_path):
    cfg = parse_config(["--learning_rate", "1", "--adam_beta1", "0", "--warmup_ratio", "1", "--max_grad_norm", "0",
                        "--mlm_probability", "1", "--mask_smoothing", "0", "--max_steps", "-1", "--seed", "0"])
    assert cfg.learning_rate == 1.0 and cfg.adam_beta1 == 0.0 and cfg.max_grad_norm == 0.0


def test_nan_in_a_json_recipe_and_in_the_loss_weights(capsys, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"temperature": NaN}')
    assert "temperature=nan is out of range" in _bad(capsys, ["--config", str(path)])
    err = _bad(capsys, ["--weights", '{"cos": Infinity}'])
    assert "weights['cos']=inf is out of range" in err and "[0, inf)" in err
    assert "weights['cos']=-1.0" in _bad(capsys, ["--weights", '{"cos": -1}'])


def test_auto_fields_take_auto_or_a_number(capsys):
    cfg = parse_config(["--threads", "3", "--num_proc", "AUTO"])
    assert cfg.threads == 3 and cfg.num_proc == "auto"
    defaults = parse_config(["--config", str(RECIPES[0])])
    assert defaults.threads == "auto"
    assert parse_config([]).precision == "auto" and parse_config([]).num_proc == "auto"
    assert "threads" in _bad(capsys, ["--threads", "many"])


def test_help_shows_each_range(capsys):
    from distill.settings.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "peak AdamW learning rate; allowed: (0, 1] (default: 0.0005)" in text
    assert "AdamW beta2; allowed: [0, 1) (default: 0.98)" in text


def test_a_value_that_starts_with_a_minus_sign_reaches_its_own_check(capsys):
    """``--flag -1,2`` / ``--flag -1e-3``: argparse alone reads these as flags ("expected one argument"); the
    field's own check must word the error, as for ``--flag=-1,2``."""
    assert _bad(capsys, ["--learning_rate", "-1e-3"]) == (
        "error: learning_rate=-0.001 is out of range: it must be a finite number in (0, 1]")
    for argv in (["--teacher", "a", "--teacher", "b", "--teacher_weights", "-1,2"],
                 ["--teacher", "a", "--teacher", "b", "--teacher_weights=-1,2"]):
        assert _bad(capsys, argv).startswith("error: --teacher_weights '-1,2': give 2 numbers >= 0")
    assert "--no_such_field" in _bad(capsys, ["--max_steps", "3", "--no_such_field"])  # flags stay flags
