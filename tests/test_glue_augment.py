"""TinyBERT's task stage: augmentation, unlabelled rows, the teacher cache and stages, on tiny models.

Each behaviour is checked against an independent computation: candidates against the masked LM's own
top-k and a float64 cosine ranking, the loss against a float64 KL + cross-entropy written out here, the
cache against fresh teacher forwards.
"""

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from distill.common.errors import UsageError
from glue_eval import augment
from glue_eval.cli import main
from tests import tiny

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _tokenizer(vocab_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vocab_dir)


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(tiny.WORDS[:60]) for _ in range(rng.randint(4, 8))) + rng.choice([".", "!", " 42."])
            for _ in range(n)]


@pytest.fixture(scope="module")
def embedding_source(vocab_dir):
    model = tiny.build_model("bert_mlm", seed=3)
    return augment.CandidateSource(_tokenizer(vocab_dir), model.get_input_embeddings().weight, name="emb")


@pytest.fixture(scope="module")
def mlm_source(vocab_dir):
    model = tiny.build_model("bert_mlm", seed=4).eval()
    return augment.CandidateSource(_tokenizer(vocab_dir), model.get_input_embeddings().weight, mlm=model, name="mlm")


# ----------------------------------------------------------------------------- words and candidates


def test_words_are_letter_runs_outside_special_tokens():
    text = "the city [SEP] was 42, new-ish! 1930s snake_case [UNK]"
    spans = augment.word_spans(text, SPECIALS)
    assert [text[a:b] for a, b in spans] == ["the", "city", "was", "new", "ish"]


def test_candidates_are_whole_words_never_special_tokens_or_pieces(vocab_dir):
    tok = _tokenizer(vocab_dir)
    words = set(tok.convert_ids_to_tokens(augment.whole_word_ids(tok).tolist()))
    assert words == {t for t in tiny.vocab_tokens() if t.isalpha() and t not in SPECIALS}
    assert not words & set(SPECIALS) and not any(w.startswith("##") for w in words)


def test_masked_lm_candidates_are_its_top_k_at_the_mask(mlm_source, vocab_dir):
    tok = _tokenizer(vocab_dir)
    text = "the school was new"
    (cands,) = mlm_source.for_texts([text], k=5)
    # Independently: mask "school", run the LM, rank whole-word ids (other than "school") by its logits.
    enc = tok("the [MASK] was new", return_tensors="pt")
    with torch.no_grad():
        logits = mlm_source.mlm(**enc).logits[0, enc["input_ids"][0].tolist().index(tok.mask_token_id)].double()
    allowed = [i for i in augment.whole_word_ids(tok).tolist() if i != tok.convert_tokens_to_ids("school")]
    ranked = sorted(allowed, key=lambda i: -logits[i].item())[:5]
    assert cands[1] == tok.convert_ids_to_tokens(ranked)
    assert len(cands) == 4 and all(len(c) == 5 for c in cands)


def test_without_a_masked_lm_candidates_are_cosine_neighbours_in_the_embeddings(embedding_source, vocab_dir):
    tok = _tokenizer(vocab_dir)
    table = embedding_source.embeddings.double()
    allowed = augment.whole_word_ids(tok).tolist()

    def neighbours(vector, exclude):
        score = {i: float(vector @ table[i] / (vector.norm() * table[i].norm())) for i in allowed if i not in exclude}
        return tok.convert_ids_to_tokens(sorted(score, key=lambda i: -score[i])[:4])

    (cands,) = embedding_source.for_texts(["city zqx"], k=4)
    city = tok.convert_tokens_to_ids("city")
    assert cands[0] == neighbours(table[city], {city})
    pieces = tok("zqx", add_special_tokens=False)["input_ids"]
    assert len(pieces) == 3  # a word of several pieces: the mean of their embeddings
    assert cands[1] == neighbours(table[pieces].mean(0), set())


def test_the_candidate_source_is_the_named_lm_else_the_teachers_own_head_else_its_embeddings(tmp_path, bert_mlm_dir):
    classifier = _classifier(0, eager=False)
    classifier.save_pretrained(str(tmp_path / "classifier"))
    assert augment.has_mlm_head(bert_mlm_dir) and not augment.has_mlm_head(str(tmp_path / "classifier"))
    assert augment.describe_source(bert_mlm_dir, None)[:2] == ("mlm", bert_mlm_dir)
    classifier_dir = str(tmp_path / "classifier")
    assert augment.describe_source(classifier_dir, None)[:2] == ("embeddings", classifier_dir)
    kind, folder, name = augment.describe_source(str(tmp_path / "classifier"), bert_mlm_dir)
    assert (kind, folder) == ("mlm", bert_mlm_dir) and name == augment.describe_source(bert_mlm_dir, None)[2]


# ----------------------------------------------------------------------------- variants


def _replaced(original: str, variant: str):
    """(words replaced, words) of a variant; asserts that everything but words is unchanged."""
    a, b = augment.word_spans(original, SPECIALS), augment.word_spans(variant, SPECIALS)
    assert len(a) == len(b)
    gaps = lambda text, spans: [text[e:s] for (_, e), (s, _) in zip([(0, 0), *spans], [*spans, (len(text), 0)])]
    assert gaps(original, a) == gaps(variant, b)  # punctuation, digits, spaces and [SEP] stay where they were
    return sum(original[s:e] != variant[t:u] for (s, e), (t, u) in zip(a, b)), len(a)


def test_variants_replace_words_with_the_given_probability_and_nothing_else(embedding_source):
    texts = [t.replace(" ", " [SEP] ", 1) for t in _texts(300)]
    settings = augment.AugmentSettings(variants=2, seed=0)
    out = augment.augment_columns({"text": texts}, embedding_source, settings)
    assert out["origin"] == [i for i in range(300) for _ in range(2)]
    changed = total = 0
    for origin, variant in zip(out["origin"], out["text"]):
        assert variant.count("[SEP]") == texts[origin].count("[SEP]") == 1
        c, n = _replaced(texts[origin], variant)
        changed, total = changed + c, total + n
    assert total > 2500
    assert changed / total == pytest.approx(0.4, abs=0.04)  # binomial sd ~0.01 at this count
    few = augment.augment_columns({"text": texts}, embedding_source,
                                  augment.AugmentSettings(variants=1, seed=0, probability=0.1))
    rate = sum(_replaced(t, v)[0] for t, v in zip(texts, few["text"])) / (total / 2)
    assert rate == pytest.approx(0.1, abs=0.03)


def test_variants_are_deterministic_given_the_seed(embedding_source):
    columns = {"a": _texts(20), "b": _texts(20, seed=1)}
    first = augment.augment_columns(columns, embedding_source, augment.AugmentSettings(3, seed=7))
    again = augment.augment_columns(columns, embedding_source, augment.AugmentSettings(3, seed=7))
    other = augment.augment_columns(columns, embedding_source, augment.AugmentSettings(3, seed=8))
    assert first == again and first["a"] != other["a"]
    # an example's variants depend on the seed and its position alone, not on the rows after it
    head = augment.augment_columns({"a": columns["a"][:4], "b": columns["b"][:4]}, embedding_source,
                                   augment.AugmentSettings(3, seed=7))
    assert head["a"] == first["a"][:12] and head["b"] == first["b"][:12]


def test_variants_are_made_once_and_cached_by_content(embedding_source, tmp_path):
    columns = {"text": _texts(10)}
    settings = augment.AugmentSettings(2, seed=0)
    calls = []

    def load():
        calls.append(1)
        return embedding_source

    made, path, hit = augment.augment_texts(columns, settings, str(tmp_path), "emb", load)
    again, path2, hit2 = augment.augment_texts(columns, settings, str(tmp_path), "emb", load)
    assert (hit, hit2, len(calls), path2) == (False, True, 1, path) and again == made
    assert json.loads(Path(path).read_text())["variants"] == made
    edited = {"text": columns["text"][:-1] + ["the city was new"]}
    assert augment.augment_texts(edited, settings, str(tmp_path), "emb", load)[2] is False  # other content
    assert augment.augment_texts(columns, augment.AugmentSettings(2, seed=1), str(tmp_path), "emb", load)[2] is False
    assert augment.augment_texts(columns, settings, str(tmp_path), "other source", load)[2] is False
    assert len(calls) == 4


# ----------------------------------------------------------------------------- the loss and the cache


def _classifier(seed, eager=True):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny.make_config("bert_mlm", num_labels=2)
    if eager:
        config._attn_implementation = "eager"
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # confident heads: a random one is near uniform, and its KL near zero
        model.classifier.weight.mul_(40)
    return model


def _dataset(tokenizer, texts, labelled=None):
    import datasets

    enc = tokenizer(texts, truncation=True, max_length=32)
    n = len(texts)
    return datasets.Dataset.from_dict({**enc, "label": [i % 2 for i in range(n)], "row": list(range(n)),
                                       "labelled": labelled if labelled is not None else [1] * n})


def _trainer(tmp_path, student, teacher, tokenizer, weights, cache=None, temperature=2.0, student_layers=None):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from glue_eval.distillation import stage_objectives
    from glue_eval.trainer import DistillationTrainer

    from glue_eval.arguments import GlueArguments

    glue = GlueArguments(temperature=temperature, student_layers=student_layers)
    soft, hard = stage_objectives(weights, glue, student, teacher)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    return DistillationTrainer(model=student, args=args, teacher=teacher, soft=soft, hard=hard, teacher_cache=cache,
                               data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)


def test_unlabelled_and_augmented_rows_never_enter_hard_ce(tmp_path, vocab_dir):
    from transformers import DataCollatorWithPadding

    tok = _tokenizer(vocab_dir)
    student, teacher = _classifier(1), _classifier(2)
    texts = _texts(6)
    labelled = [1, 0, 1, 0, 0, 1]
    ds = _dataset(tok, texts, labelled)
    batch = DataCollatorWithPadding(tok)([ds[i] for i in range(len(ds))])
    # Rows that carry no gold label get deliberately wrong placeholders: they must not matter.
    batch["labels"] = torch.tensor([0, 1, 1, 0, 1, 0])
    trainer = _trainer(tmp_path, student, teacher, tok, {"kl": 0.7, "hard_ce": 1.3})
    loss, terms, _ = trainer.distillation_loss(student, dict(batch))

    with torch.no_grad():
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits.double()
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits.double()
    t = 2.0
    p_t = torch.softmax(zt / t, -1)
    kl = (p_t * (torch.log_softmax(zt / t, -1) - torch.log_softmax(zs / t, -1))).sum(-1).mean() * t * t
    keep = torch.tensor(labelled, dtype=torch.bool)
    ce = -torch.log_softmax(zs[keep], -1)[torch.arange(3), batch["labels"][keep]].mean()
    assert float(kl) > 0.05 and float(ce) > 0.05
    assert float(terms["kl"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(terms["hard_ce"]) == pytest.approx(float(ce), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(0.7 * float(kl) + 1.3 * float(ce), rel=1e-4)
    # Changing the placeholders changes nothing; changing a real row's label does.
    other = dict(batch, labels=torch.tensor([0, 0, 1, 1, 0, 0]))
    assert float(trainer.distillation_loss(student, other)[0].detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    real = dict(batch, labels=torch.tensor([1, 1, 1, 0, 1, 0]))
    assert float(trainer.distillation_loss(student, real)[0].detach()) != pytest.approx(float(loss.detach()), rel=1e-3)
    # A batch without labelled rows trains on the soft terms alone.
    none = dict(batch, labelled=torch.zeros(6, dtype=torch.long))
    loss_none, terms_none, _ = trainer.distillation_loss(student, none)
    assert "hard_ce" not in terms_none and float(loss_none.detach()) == pytest.approx(0.7 * float(kl), rel=1e-4)


def test_cached_teacher_outputs_equal_a_fresh_teacher_forward(tmp_path, vocab_dir):
    from transformers import DataCollatorWithPadding

    from glue_eval.teacher_cache import CachePlan, TeacherCache

    tok = _tokenizer(vocab_dir)
    teacher = _classifier(2)
    texts = _texts(9, seed=3)
    ds = _dataset(tok, texts)
    collate = DataCollatorWithPadding(tok)
    plan = CachePlan(hidden=(0, 2, 4), attentions=(2, 4), values=(4,))
    cache = TeacherCache.build(teacher, ds, collate, plan, batch_size=4)
    assert cache.has_representations and cache.logits.shape == (9, 2)
    for i, text in enumerate(texts):  # each example alone, no padding at all
        enc = tok(text, return_tensors="pt", truncation=True, max_length=32)
        with torch.no_grad():
            assert torch.allclose(cache.logits[i], teacher(**enc).logits[0], atol=1e-5)
    # A training batch in another order and with other padding gets the same as a forward on that batch.
    rows = [7, 0, 4, 2]
    batch = collate([ds[i] for i in rows])
    got = cache.features(torch.tensor(rows), batch["attention_mask"])
    from distill.models.loading import extract

    with torch.no_grad():
        fresh = extract(teacher, batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                        hidden=True, attentions=True, value_layers=(4,), sequence_logits=True)
    real = batch["attention_mask"].bool()
    assert torch.allclose(got.logits, fresh.logits, atol=1e-5)
    for layer in (0, 2, 4):
        assert torch.allclose(got.hidden_states[layer][real], fresh.hidden_states[layer][real], atol=1e-5)
    assert got.hidden_states[1] is None  # layers no term reads are not kept
    pair = real[:, None, :, None] & real[:, None, None, :]
    for layer in (2, 4):
        a, b = got.attentions[layer - 1], fresh.attentions[layer - 1]
        assert torch.allclose(a.masked_select(pair), b.masked_select(pair), atol=1e-5)
    assert torch.allclose(got.values[4].transpose(1, 2)[real], fresh.values[4].transpose(1, 2)[real], atol=1e-5)
    # Over the memory limit the representations are dropped; the logits stay.
    small = TeacherCache.build(teacher, ds, collate, plan, limit_mb=0.001)
    assert not small.has_representations and torch.allclose(small.logits, cache.logits, atol=1e-6)


def test_the_loss_is_the_same_with_and_without_the_cache(tmp_path, vocab_dir):
    from transformers import DataCollatorWithPadding

    from glue_eval.teacher_cache import TeacherCache, plan_for

    tok = _tokenizer(vocab_dir)
    student, teacher = _classifier(1), _classifier(2)
    ds = _dataset(tok, _texts(5, seed=4), [1, 0, 1, 1, 0])
    collate = DataCollatorWithPadding(tok)
    weights = {"kl": 1.0, "hard_ce": 1.0, "hid_mse": 1.0, "att_mse": 1.0}
    plain = _trainer(tmp_path / "a", student, teacher, tok, weights, student_layers="1,2,3,4")
    cache = TeacherCache.build(teacher, ds, collate, plan_for([plain.soft]))
    assert cache.plan.hidden == (1, 2, 3, 4) and cache.plan.attentions == (1, 2, 3, 4)
    cached = _trainer(tmp_path / "b", student, teacher, tok, weights, cache=cache, student_layers="1,2,3,4")
    batch = collate([ds[i] for i in (4, 1, 3)])
    a, terms_a, _ = plain.distillation_loss(student, dict(batch))
    b, terms_b, _ = cached.distillation_loss(student, dict(batch))
    assert set(terms_a) == set(terms_b) == set(weights)
    for name in weights:
        assert float(terms_b[name]) == pytest.approx(float(terms_a[name]), rel=1e-4, abs=1e-7)


# ----------------------------------------------------------------------------- glue-eval end to end


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, vocab_dir):
    folder = tmp_path_factory.mktemp("taskstage")
    rng = random.Random(0)
    rows = [(t, "yes" if "city" in t.split() else "no") for t in _texts(40)]
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    with open(folder / "dev.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows[:12]])
    spec = {"name": "kw", "train": "train.csv", "dev": "dev.csv", "text_columns": ["text"], "label_column": "label",
            "labels": ["no", "yes"], "metric": "accuracy"}
    (folder / "task.json").write_text(json.dumps(spec))
    (folder / "unlabelled.txt").write_text("\n".join(_texts(15, seed=rng.randint(0, 99))) + "\n")
    teacher = _classifier(5, eager=False)
    teacher.config.id2label, teacher.config.label2id = {0: "no", 1: "yes"}, {"no": 0, "yes": 1}
    teacher.save_pretrained(str(folder / "teacher"))
    _tokenizer(vocab_dir).save_pretrained(str(folder / "teacher"))
    return folder


def _run(task_dir, out, student, *extra):
    main(["--model", student, "--task", str(task_dir / "task.json"), "--output_dir", str(out),
          "--teacher", str(task_dir / "teacher"), "--use_cpu", "--disable_tqdm", "true",
          "--per_device_train_batch_size", "8", "--seed", "1", *extra])
    results = sorted(Path(out).rglob("result.json"))
    return [json.loads(p.read_text()) for p in results]


@pytest.mark.slow
def test_glue_eval_trains_on_augmented_and_unlabelled_rows(task_dir, bert_mlm_dir, tmp_path):
    out = tmp_path / "run"
    extra = ["--augment", "2", "--unlabelled_file", str(task_dir / "unlabelled.txt"), "--max_steps", "2",
             "--distill_weights", '{"kl": 1.0, "hard_ce": 1.0}']
    (record,) = _run(task_dir, out, bert_mlm_dir, *extra)
    train = record["train"]
    assert train["original_examples"] == 40 and train["unlabelled_examples"] == 15
    assert train["augmented"]["examples"] == 80 and train["augmented"]["source"] == "embeddings"
    assert train["augmented"]["cached"] is False and train["examples"] == 40 + 80 + 15
    assert train["teacher_cache"]["rows"] == 135 and train["teacher_cache"]["representations_requested"] is False
    assert record["settings"]["augment"]["variants"] == 2 and record["settings"]["unlabelled_file"]
    # A second cell of the same task and seed reuses the variants; an MLM named for them makes others.
    records = _run(task_dir, out, bert_mlm_dir, *extra, "--learning_rate", "1e-4")
    (second,) = [r for r in records if r["cell"].startswith("lr0.0001")]
    assert second["train"]["augmented"]["cached"] is True
    assert second["train"]["augmented"]["cache"] == train["augmented"]["cache"]
    (third,) = _run(task_dir, tmp_path / "mlm", bert_mlm_dir, *extra, "--augment_model", bert_mlm_dir)
    assert third["train"]["augmented"]["source"] == "mlm"
    assert third["train"]["augmented"]["cache"] != train["augmented"]["cache"]
    assert train["stages"][0]["teacher_forwards"] == 0
    (uncached,) = _run(task_dir, tmp_path / "uncached", bert_mlm_dir, *extra, "--no_teacher_cache")
    assert uncached["train"]["teacher_cache"] == {"enabled": False}
    assert uncached["train"]["stages"][0]["teacher_forwards"] == 2  # one per step


def test_stages_run_in_order_and_switch_weights_at_the_boundary(task_dir, bert_mlm_dir, tmp_path):
    stages = [{"weights": {"hid_mse": 1.0, "att_mse": 2.0}, "max_steps": 3},
              {"weights": {"kl": 1.0, "hard_ce": 0.5}, "max_steps": 2, "learning_rate": 1e-4}]
    (record,) = _run(task_dir, tmp_path / "staged", bert_mlm_dir, "--stages", json.dumps(stages),
                     "--student_layers", "1,2,3,4", "--logging_steps", "1", "--num_train_epochs", "1")
    first, second = record["train"]["stages"]
    assert (first["steps"], second["steps"], record["train"]["steps"]) == (3, 2, 5)
    assert second["learning_rate"] == 1e-4 and record["settings"]["stages"][1]["max_steps"] == 2
    assert [len(first["logs"]), len(second["logs"])] == [3, 2]
    # the teacher ran once per example before training, never per batch: its representations were cached
    assert record["train"]["teacher_cache"]["representations"] is True
    assert first["teacher_forwards"] == second["teacher_forwards"] == 0
    for log in first["logs"]:
        assert set(k for k in log if k.startswith("distill/")) == {"distill/hid_mse", "distill/att_mse"}
        # the logged loss is this stage's weighted sum: the weights in force are the first stage's
        assert log["loss"] == pytest.approx(log["distill/hid_mse"] + 2 * log["distill/att_mse"], rel=2e-3, abs=1e-4)
    for log in second["logs"]:
        assert set(k for k in log if k.startswith("distill/")) == {"distill/kl", "distill/hard_ce"}
        assert log["loss"] == pytest.approx(log["distill/kl"] + 0.5 * log["distill/hard_ce"], rel=2e-3, abs=1e-4)


def test_task_stage_settings_that_cannot_work_are_refused(task_dir, bert_mlm_dir, tmp_path, capsys):
    def refused(*extra, teacher=True):
        argv = ["--model", bert_mlm_dir, "--task", str(task_dir / "task.json"), "--output_dir", str(tmp_path / "x"),
                "--use_cpu", *(["--teacher", str(task_dir / "teacher")] if teacher else []), *extra]
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()
        return err

    assert "needs --teacher" in refused("--augment", "2", teacher=False)
    assert "stage 2 weights: term 'mlm'" in refused("--stages", '[{"weights": {"kl": 1}}, {"weights": {"mlm": 1}}]')
    assert "unknown keys ['epoch']" in refused("--stages", '[{"weights": {"kl": 1}, "epoch": 3}]')
    assert "epochs is -1" in refused("--stages", '[{"weights": {"kl": 1}, "epochs": -1}]')
    assert "--augment_probability 1.5" in refused("--augment", "1", "--augment_probability", "1.5")
    assert "does not exist" in refused("--unlabelled_file", str(tmp_path / "missing.txt"))
    assert "needs --teacher" in refused("--stages", '[{"weights": {"kl": 1}}]', teacher=False)
    assert "does not exist" in refused("--stages", str(tmp_path / "stages.json"))
    (tmp_path / "stages.json").write_text('[{"weights": {"kl": 1}, "max_steps": 0}]')
    assert f"--stages file {str(tmp_path / 'stages.json')!r}: stage 1: max_steps is 0" in refused(
        "--stages", str(tmp_path / "stages.json"))


def test_unlabelled_text_is_read_per_line_or_from_a_table(tmp_path):
    from distill.common.errors import UsageError
    from glue_eval.data import load_unlabelled
    from glue_eval.tasks import get_task

    rte = get_task("rte")
    (tmp_path / "pairs.txt").write_text("a city\tthe school\n\nthe world\tnew state\n")
    assert load_unlabelled(rte, str(tmp_path / "pairs.txt")) == {
        "sentence1": ["a city", "the world"], "sentence2": ["the school", "new state"]}
    (tmp_path / "bad.txt").write_text("a city\tthe school\nno tab here\n")
    with pytest.raises(UsageError, match="bad.txt line 2: 1 tab-separated texts where RTE has 2"):
        load_unlabelled(rte, str(tmp_path / "bad.txt"))
    with open(tmp_path / "sst.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("id", "sentence"), (1, "one, two"), (2, "three")])
    assert load_unlabelled(get_task("sst2"), str(tmp_path / "sst.csv")) == {"sentence": ["one, two", "three"]}
    with pytest.raises(UsageError, match="no column 'sentence1'"):
        load_unlabelled(rte, str(tmp_path / "sst.csv"))


def test_weights_and_stages_read_the_same_from_a_flag_and_from_an_arguments_file():
    # an arguments .json file holds the JSON values themselves, a flag holds their text
    from glue_eval.distillation import parse_stages, parse_weights

    assert parse_weights({"kl": 1, "hard_ce": 2}) == parse_weights('{"kl": 1, "hard_ce": 2}')
    stages = [{"weights": {"hid_mse": 1}, "epochs": 2}, {"weights": {"kl": 1}, "epochs": 1}]
    assert parse_stages(stages) == parse_stages(json.dumps(stages))
    with pytest.raises(UsageError, match="must be a JSON list of stages"):
        parse_stages(3)


def test_a_bad_teacher_temperature_is_refused_before_anything_loads(tmp_path):
    from glue_eval.distillation import check_task_stage
    from glue_eval.arguments import GlueArguments

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"^--temperature=0.0 is out of range: it must be a finite number in \(0, 100\]"):
        check_task_stage(GlueArguments(model="m", teacher=str(teacher), temperature=0.0), [])


def test_the_layer_map_flag_is_checked_first_and_reaches_the_objective_and_the_cell(tmp_path):
    from transformers import TrainingArguments

    from glue_eval.arguments import GlueArguments
    from glue_eval.distillation import check_task_stage, stage_objectives
    from glue_eval.record import describe

    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"^--layer_map: "):  # before any model loads
        check_task_stage(GlueArguments(model="m", teacher=str(teacher_dir), layer_map=[[1]]), [])
    with pytest.raises(UsageError, match=r"^--layer_map needs --teacher"):  # never silently ignored
        check_task_stage(GlueArguments(model="m", layer_map=[[1, 2]]), [])
    glue = GlueArguments(model="m", teacher=str(teacher_dir), layer_map=[[1, 3], [2, 4]])
    soft, _ = stage_objectives({"hid_mse": 1.0, "kl": 1.0}, glue, _classifier(1), _classifier(2))
    assert soft.layer_pairs["hid_mse"] == ((1, 3), (2, 4))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[])
    assert describe(glue, args)["layer_map"] == [[1, 3], [2, 4]]
    assert "layer_map" not in describe(GlueArguments(model="m", teacher=str(teacher_dir)), args)
