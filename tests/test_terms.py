"""The term registry: every list is derived from it, a new term is one entry, and each check exists once."""

import ast
import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from distill.common.errors import UsageError
from distill.objective import losses, terms
from distill.objective.plan import Objective
from distill.objective.terms import TermSpec
from distill.settings.config import make_config
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "glue_eval")


# ---------------------------------------------------------------------------------------------
# derived lists: the same answers the hand-kept lists gave before the registry


def test_derived_lists_reproduce_what_each_place_used_to_spell_out():
    # The lists as batches.py, card.py/objective.py, electra.py and glue-eval held them by hand (val_kl added to
    # glue-eval: the objective always accepted it at sequence level, the hand-kept list refused it).
    assert set(terms.select(input=terms.MASKED_INPUT)) == {"mlm", "ce", "kl", "out_mse"}
    assert terms.select(temperature=True) == ("ce", "kl", "rtd_kl")
    assert terms.select(input=terms.CORRUPTED_INPUT) == ("rtd", "rtd_kl")
    assert set(terms.level_terms(sequence_level=True)) == {
        "kl", "ce", "out_mse", "hard_ce", "hid_mse", "emb_mse", "cos", "att_mse", "att_kl", "val_kl"}
    assert set(terms.level_terms(sequence_level=False)) == set(terms.TERMS) - {"hard_ce"}
    assert terms.select(feature="attentions") == ("att_mse", "att_kl")
    assert terms.select(teacher=False) == ("mlm", "hard_ce", "rtd")


def test_glue_eval_accepts_exactly_the_registrys_sequence_level_terms():
    from glue_eval.distillation import parse_weights

    for key, spec in terms.TERMS.items():
        if spec.sequence_level:
            assert parse_weights(json.dumps({key: 1.0})) == {key: 1.0}
        else:
            with pytest.raises(UsageError, match=f"'{key}' is not a task-distillation term"):
                parse_weights(json.dumps({key: 1.0}))


def test_the_card_and_the_log_line_name_the_temperature_for_exactly_the_temperature_terms():
    model = tiny.build_model("bert_mlm", _attn_implementation="eager").eval()
    for key in ("ce", "kl", "mlm", "cos"):
        objective = Objective.from_config({key: 1.0}, 3.0, student_config=model, teacher_config=model,
                                          student_layers=[1, 2, 3, 4])
        assert ("(T=3)" in objective.describe()) == terms.TERMS[key].temperature, key
        assert terms.takes_temperature({key: 1.0}) == (key in ("ce", "kl"))
    assert not terms.takes_temperature({"ce": 0.0, "cos": 1.0})  # an inactive term takes nothing


def test_a_malformed_entry_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="feature 'logit'"):
        TermSpec("x", "logit", terms.masked(losses.hidden_mse), "doc", logits_at=terms.REAL)
    with pytest.raises(ValueError, match="needs layers"):
        TermSpec("x", "hidden", terms.masked(losses.hidden_mse), "doc")
    with pytest.raises(ValueError, match="width projection"):
        TermSpec("x", "attentions", terms.masked(losses.attention_mse), "doc", layers="map", projects=True)
    with pytest.raises(ValueError, match="already registered"):
        terms.register(TermSpec("cos", "hidden", terms.masked(losses.cosine_loss), "doc", layers="last"))
    with pytest.raises(TypeError, match="no field"):
        terms.select(temprature=True)


# ---------------------------------------------------------------------------------------------
# the docs page


def test_the_committed_docs_table_is_the_registry_now():
    page = (ROOT / "docs" / "objective.md").read_text(encoding="utf-8")
    assert page == terms.page_with_table(page), "docs/objective.md is stale: run python -m distill.objective.terms --write " \
                                                "docs/objective.md"
    for key, spec in terms.TERMS.items():  # every entry has its row, with its own one-line description
        assert f"| `{key}` | {spec.doc} |" in page


def test_markdown_command_prints_the_table_and_write_refreshes_a_page(tmp_path, capsys):
    assert terms.main(["--markdown"]) == 0
    assert capsys.readouterr().out == terms.markdown()
    page = tmp_path / "p.md"
    page.write_text(f"# head\n\n{terms.BEGIN}\nold table\n{terms.END}\n\ntail\n", encoding="utf-8")
    terms.main(["--write", str(page)])
    assert page.read_text(encoding="utf-8") == f"# head\n\n{terms.BEGIN}\n{terms.markdown()}{terms.END}\n\ntail\n"
    page.write_text("no markers\n")
    with pytest.raises(UsageError, match="BEGIN TERMS"):
        terms.main(["--write", str(page)])
    assert page.read_text() == "no markers\n"  # nothing half-written


# ---------------------------------------------------------------------------------------------
# proof 2: each term key is spelled in one package file, the registry


ROLE_NAMES = frozenset(terms.HEADS)  # "mlm" and "rtd" are also the names of model heads (distill.models.loading roles)


def term_spellings(source: str, keys) -> list[tuple[int, str]]:
    """``(line, key)`` where a string literal of ``source`` spells a term key as a term.

    Not counted: a key that is also a function name defined in the same file (losses.py's ``rtd_kl``, in
    ``__all__`` and in its own messages) and a head-role name used as a role (``role == "mlm"``,
    ``{"mlm": BertForMaskedLM}``). A role name counts as a term where it sits next to another term key in a
    tuple/list/set/dict, keys a dict of numbers (a weights dict), or meets a name that says weight or term.
    """
    tree = ast.parse(source)
    keys = set(keys)
    functions = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def is_key(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys

    def names_in(node):
        return {n.id.lower() for n in ast.walk(node) if isinstance(n, ast.Name)} | {
            n.attr.lower() for n in ast.walk(node) if isinstance(n, ast.Attribute)}

    def used_as_term(node):
        parent = parents.get(node)
        if isinstance(parent, (ast.Tuple, ast.List, ast.Set)):
            return any(is_key(e) and e.value not in ROLE_NAMES for e in parent.elts)
        if isinstance(parent, ast.Dict) and node in parent.keys:
            others = any(is_key(k) and k.value not in ROLE_NAMES for k in parent.keys)
            numeric = all(isinstance(v, ast.Constant) and isinstance(v.value, (int, float)) for v in parent.values)
            return others or numeric
        if isinstance(parent, (ast.Compare, ast.Subscript, ast.Call)):
            return any(word in name for name in names_in(parent) for word in ("weight", "term"))
        return False

    lines = []
    for node in ast.walk(tree):
        if not is_key(node) or node.value in functions:
            continue
        if node.value in ROLE_NAMES and not used_as_term(node):
            continue
        lines.append((node.lineno, node.value))
    return sorted(lines)


def test_the_scan_finds_the_spellings_it_is_meant_to_find():
    keys = ("ce", "mlm", "rtd", "rtd_kl", "cos")
    source = (
        'LISTED = ("mlm", "ce")\n'                      # a term list: both count
        'RTD = ("rtd", "rtd_kl")\n'                     # both count
        'if "ce" in weights: pass\n'                    # counts
        'if "mlm" in cfg.weights: pass\n'               # a role name next to "weights": counts
        'DEFAULT = {"mlm": 1.0}\n'                      # a weights dict: counts
        'ROLES = {"mlm": BertForMaskedLM, "rtd": X}\n'  # head roles: not counted
        'if role_of(m) == "rtd": pass\n'                # a role comparison: not counted
        'load(path, role="mlm")\n'                      # a role argument: not counted
        'def cos(): return check(x, "cos")\n'           # a function's own name: not counted
        'TEXT = "ce and cos"\n'                         # prose inside a longer string: not counted
    )
    assert term_spellings(source, keys) == [(1, "ce"), (1, "mlm"), (2, "rtd"), (2, "rtd_kl"), (3, "ce"), (4, "mlm"),
                                            (5, "mlm")]


def test_each_term_key_is_spelled_in_one_package_file_the_registry():
    spelled: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, key in term_spellings(path.read_text(encoding="utf-8"), terms.TERMS):
                spelled.setdefault(key, set()).add(f"{path.relative_to(ROOT)}:{line}")
    registry = "distill/objective/terms.py"
    outside = {k: sorted(p for p in places if not p.startswith(registry)) for k, places in spelled.items()}
    assert not {k: v for k, v in outside.items() if v}, outside
    assert set(spelled) == set(terms.TERMS)  # and the registry does spell every key


# ---------------------------------------------------------------------------------------------
# validation once: every entry point gives the same message, from the same function


def test_a_bad_temperature_reads_the_same_from_the_losses_the_objective_and_glue_eval(bert_mlm_dir):
    z = torch.zeros(2, 5)
    model = tiny.build_model("bert_mlm")
    for bad in (0.0, -2.0, float("nan"), True):
        with pytest.raises(UsageError) as from_loss:
            losses.kl_divergence(z, z, bad)
        with pytest.raises(UsageError) as from_objective:
            Objective.from_config({"kl": 1}, bad, student_config=model, teacher_config=model)
        with pytest.raises(UsageError) as from_check:
            losses.check_temperature(bad)
        assert str(from_loss.value) == str(from_objective.value) == str(from_check.value)
        assert repr(bad) in str(from_check.value)


def test_bad_weights_read_the_same_from_the_objective_and_glue_eval():
    from glue_eval.distillation import parse_weights

    model = tiny.build_model("bert_mlm")
    for bad in ({"kl": -1}, {"kl": "5"}, {"kl": float("inf")}, {"kl": 0}):
        with pytest.raises(UsageError) as from_objective:
            Objective.from_config(bad, 2.0, student_config=model, teacher_config=model)
        with pytest.raises(UsageError) as from_glue:
            parse_weights(json.dumps(bad))  # JSON's Infinity reads back as inf
        assert str(from_objective.value) == str(from_glue.value)


def test_a_malformed_layer_map_reads_the_same_from_the_recipe_and_the_objective():
    model = tiny.build_model("bert_mlm")
    for bad in ([[1]], [[1, "2"]], [[True, 1]], [], [[1, 2, 3]]):
        with pytest.raises(UsageError) as from_recipe:
            make_config({"layer_map": bad})
        with pytest.raises(UsageError) as from_objective:
            Objective.from_config({"hid_mse": 1}, 2.0, student_config=model, teacher_config=model, layer_map=bad)
        assert str(from_recipe.value) == str(from_objective.value)


# ---------------------------------------------------------------------------------------------
# proof 1: a term defined here, one function and one entry, runs through distill-train and glue-eval


class HiddenL1:
    """``mean |h_s - h_t|`` over real tokens and features; remembers each call's value and shapes."""

    def __init__(self):
        self.calls = []

    def __call__(self, student_hidden, teacher_hidden, ctx):
        keep = ctx.mask
        value = (student_hidden[keep].float() - teacher_hidden[keep].float()).abs().mean()
        self.calls.append((float(value.detach()), tuple(student_hidden.shape), tuple(teacher_hidden.shape)))
        return value


@pytest.fixture
def hid_l1():
    loss = HiddenL1()
    terms.register(TermSpec("hid_l1", "hidden", loss, "hidden-state L1 distance", layers="map", projects=True))
    try:
        yield loss
    finally:
        terms.unregister("hid_l1")


def test_a_term_defined_in_a_test_trains_through_distill_train(hid_l1, bert_mlm_dir, tmp_path):
    from distill.cli import train_main

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(tiny.WORDS) for _ in range(20)) for _ in range(200)) + "\n")
    out = tmp_path / "run"
    train_main(tiny.cli_args(dict(
        teacher=bert_mlm_dir, corpus=str(corpus), output_dir=str(out), cache_dir=str(tmp_path / "cache"),
        student_layers=[2, 4], weights={"hid_l1": 1.0}, block_size=32, per_device_batch_size=4,
        learning_rate=1e-3, max_steps=3, precision="fp32", save_steps=0, logging_steps=1, progress=False,
        device="cpu")))
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    # One call per step and layer pair (2 pairs: student 1<->teacher 2, 2<->4), on [B, S, H] hidden states.
    assert len(hid_l1.calls) == 3 * 2
    assert {c[1] for c in hid_l1.calls} == {c[2] for c in hid_l1.calls} == {(4, 32, 32)}  # batch 4, 32 tokens, width 32
    for step, record in enumerate(log):
        pair_values = [c[0] for c in hid_l1.calls[2 * step:2 * step + 2]]
        assert record["hid_l1"] == pytest.approx(sum(pair_values) / 2, rel=1e-4)  # the mean over the pairs
        assert record["loss"] == pytest.approx(record["hid_l1"], rel=1e-4)  # the only term, weight 1
    assert "1*hid_l1[s1=t2,s2=t4]" in (out / "README.md").read_text()


def toy_task_and_teacher(folder: Path) -> tuple[str, str]:
    """A two-label local task (random words, random labels) and an untrained classifier teacher for it."""
    rng = random.Random(0)
    for split, n in (("train", 32), ("dev", 16)):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *[(" ".join(rng.choice(tiny.WORDS) for _ in range(6)),
                                                           rng.choice(["no", "yes"])) for _ in range(n)]])
    spec = {"name": "toy", "train": "train.csv", "dev": "dev.csv", "text_columns": ["text"],
            "label_column": "label", "labels": ["no", "yes"], "metric": "accuracy"}
    (folder / "task.json").write_text(json.dumps(spec))
    torch.manual_seed(3)
    teacher = BertForSequenceClassification(tiny.make_config("bert_mlm", num_labels=2,
                                                             _attn_implementation="eager"))
    teacher.save_pretrained(folder / "teacher")
    return str(folder / "task.json"), str(folder / "teacher")


def glue_kd(student: str, task: str, teacher: str, out: Path, weights: dict) -> dict:
    from glue_eval.cli import main

    main(["--model", student, "--task", task, "--output_dir", str(out), "--teacher", teacher,
          "--distill_weights", json.dumps(weights), "--student_layers", "1,2,3,4", "--use_cpu", "--max_steps", "2",
          "--per_device_train_batch_size", "8", "--disable_tqdm", "true"])
    (result,) = out.rglob("result.json")
    return json.loads(result.read_text())


def test_a_term_defined_in_a_test_trains_through_glue_eval_with_a_teacher(hid_l1, bert_mlm_dir, tmp_path):
    task, teacher = toy_task_and_teacher(tmp_path)
    record = glue_kd(bert_mlm_dir, task, teacher, tmp_path / "kd", {"hid_l1": 1.0, "hard_ce": 1.0})
    assert record["settings"]["distill_weights"] == {"hid_l1": 1.0, "hard_ce": 1.0}
    # 2 steps x 4 layer pairs, on [8, S, 32] hidden states of both models, and a real distance each time
    assert len(hid_l1.calls) == 2 * 4
    assert all(c[1] == c[2] and c[1][0] == 8 and c[1][2] == 32 for c in hid_l1.calls)
    assert all(math.isfinite(c[0]) and c[0] > 0 for c in hid_l1.calls)


def test_every_term_glue_eval_accepts_also_runs_there(bert_mlm_dir, tmp_path):
    task, teacher = toy_task_and_teacher(tmp_path)
    weights = dict.fromkeys(terms.level_terms(sequence_level=True), 1.0)
    record = glue_kd(bert_mlm_dir, task, teacher, tmp_path / "kd", weights)
    assert record["settings"]["distill_weights"] == weights and math.isfinite(record["train"]["loss"])




def test_the_terms_command_says_in_one_line_when_the_page_is_missing(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "nope" / "objective.md"
    done = subprocess.run([sys.executable, "-m", "distill.objective.terms", "--write", str(missing)], capture_output=True,
                          text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --write") and "docs/objective.md" in lines[0]
    assert not missing.parent.exists()


def test_a_term_in_the_old_mask_form_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"term 'old_l1': its loss takes \(student, teacher, mask\).*terms.masked"):
        TermSpec("old_l1", "hidden", lambda student, teacher, mask: (student - teacher).abs().mean(), "L1",
                 layers="map")
    spec = TermSpec("new_l1", "hidden", terms.masked(losses.hidden_mse), "MSE through masked()", layers="map")
    assert spec.loss.__name__ == "hidden_mse"
