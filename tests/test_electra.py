"""The ELECTRA path: the generator corrupts each chunk, teacher and student discriminators judge the same input.

rtd / rtd_kl against float64 references (0 for identical logits, T^2 scaling) are in test_losses.py.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from distill.cli import train_main
from distill.common.errors import UsageError
from distill.data.masking import IGNORE_INDEX
from distill.models.loading import extract, load_model
from distill.models.student import build_student
from distill.objective.plan import Objective
from distill.settings.config import make_config
from distill.train.batches import (
    CorruptedBatches,
    chunk_generator,
    make_batches,
    uniform_weights,
)
from distill.train.electra import GENERATOR_DIR, sample_tokens, setup_generator
from distill.train.loop import Dist, StudentStep, train
from tests import tiny

HENTSCHEL = {"rtd": 1.0, "emb_mse": 1.0, "out_mse": 1.0, "hid_mse": 1.0, "att_mse": 1.0, "cos": 1.0, "rtd_kl": 1.0}
RECIPES = Path(__file__).parent.parent / "student_configs"


# --- fixtures: a tiny teacher whose RTD predictions are balanced, a tiny generator, a corpus -----------

def write_corpus(path: Path, lines: int = 240, seed: int = 0) -> str:
    """Random sentences in which "the" is common, so a generator that always says "the" often copies."""
    rng = random.Random(seed)
    words = lambda n: " ".join("the" if rng.random() < 0.3 else rng.choice(tiny.WORDS) for _ in range(n))  # noqa: E731
    path.write_text("\n".join(words(rng.randint(6, 20)) + " ." for _ in range(lines)) + "\n")
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster than on two when the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("electra_corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, vocab_dir):
    """An ElectraForPreTraining whose logits spread over a few units around 0 (a random head gives ~0 everywhere)."""
    model = tiny.build_model("electra_disc", seed=1)
    head = model.discriminator_predictions.dense_prediction
    ids, mask = tiny.random_batch(batch=16, seq=32, seed=1, pad_last=0)
    with torch.no_grad():
        head.weight.mul_(100.0)
        logits = model.eval()(input_ids=ids, attention_mask=mask).logits
        head.bias.sub_(logits.median())
    folder = tmp_path_factory.mktemp("electra_teacher")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("electra_work")


def recipe(teacher, generator, corpus, work, **overrides) -> dict:
    values = dict(teacher=teacher, generator=generator, corpus=corpus, student_layers=[2, 4], student_type="electra",
                  weights=HENTSCHEL, temperature=2.0, block_size=32, per_device_batch_size=8, learning_rate=2e-3,
                  max_steps=30, save_steps=0, logging_steps=5, precision="fp32", cache_dir=str(work / "cache"),
                  output_dir=str(work / "out"), progress=False, device="cpu", seed=3)
    values.update(overrides)
    return values


def electra_batches(cfg, tokenizer, teacher, objective=None, student=None) -> CorruptedBatches:
    """What run setup does: build the (frozen) generator's corruptor, hand it to the batches."""
    corruptor, trained = setup_generator(cfg, tokenizer, teacher, torch.device("cpu"))
    assert trained is None and corruptor is not None
    batches = make_batches(cfg, cfg.corpus, tokenizer, teacher, objective, Dist(), student, corruptor)
    assert isinstance(batches, CorruptedBatches)
    return batches


def batches_for(values: dict, tokenizer_dir: str) -> CorruptedBatches:
    cfg = make_config(values)
    return electra_batches(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), load_model(cfg.teacher))


def specials(tokenizer_dir) -> torch.Tensor:
    return torch.tensor(AutoTokenizer.from_pretrained(tokenizer_dir).all_special_ids)


cli_args, weights = tiny.cli_args, tiny.saved_weights


# --- corruption ---------------------------------------------------------------------------------

def test_replaced_labels_are_one_exactly_where_the_token_changed(teacher_dir, electra_gen_dir, corpus, work, vocab_dir):
    batches = batches_for(recipe(teacher_dir, electra_gen_dir, corpus, work, per_device_batch_size=64), vocab_dir)
    batch, original = batches.chunk(2, 0), batches.rows(2, 0)["input_ids"]
    ids, labels, chosen = batch["input_ids"], batch["replaced_labels"], batch["mlm_labels"] != IGNORE_INDEX
    assert set(batch) == {"input_ids", "attention_mask", "replaced_labels", "mlm_labels"}
    assert torch.equal(labels, (ids != original).long())
    assert not (labels.bool() & ~chosen).any()  # only chosen positions can change
    assert torch.equal(batch["mlm_labels"][chosen], original[chosen])
    special = torch.isin(original, specials(vocab_dir))
    assert special.any() and not (chosen & special).any()  # [CLS] / [SEP] are never chosen
    assert not torch.isin(ids[chosen], specials(vocab_dir)).any()  # nor sampled into the text
    # ELECTRA's rate: 15% of the real non-special tokens of the chunk, chosen uniformly
    maskable = int((~special & batch["attention_mask"].bool()).sum())
    assert maskable > 1500 and int(chosen.sum()) == round(0.15 * maskable)
    # a random generator mostly, but not always, replaces: it samples the original token back roughly once in
    # the vocabulary's 162, one or two times in a chunk's ~270 choices and none at all in some; counted over
    # ten chunks (some 17 expected), whatever the corpus packing puts in one chunk
    kept = replaced = 0
    for step in range(2, 12):
        b, orig = batches.chunk(step, 0), batches.rows(step, 0)["input_ids"]
        picked = b["mlm_labels"] != IGNORE_INDEX
        assert torch.equal(b["replaced_labels"], (b["input_ids"] != orig).long())
        replaced += int(b["replaced_labels"][picked].sum())
        kept += int((b["replaced_labels"][picked] == 0).sum())
    assert 3 <= kept and 0.5 < replaced / (replaced + kept) < 1.0, (kept, replaced)
    # the generator's input: 85% of the chosen tokens are [MASK], the rest keep their token
    masked = batches.masked(batches.rows(2, 0), chunk_generator(batches.seed, 2, 0))
    mask_id = AutoTokenizer.from_pretrained(vocab_dir).mask_token_id
    is_mask = masked["generator_input_ids"][chosen] == mask_id
    assert 0.78 < is_mask.float().mean() < 0.92
    assert torch.equal(masked["generator_input_ids"][chosen][~is_mask], original[chosen][~is_mask])


def test_corruption_is_a_function_of_seed_step_and_chunk(teacher_dir, electra_gen_dir, corpus, work, vocab_dir):
    values = recipe(teacher_dir, electra_gen_dir, corpus, work)
    a, b = batches_for(values, vocab_dir), batches_for(values, vocab_dir)
    first = a.chunk(5, 1)
    for again in (a.chunk(5, 1), b.chunk(5, 1)):
        assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(a.chunk(5, 0)["replaced_labels"], first["replaced_labels"])
    other_seed = batches_for({**values, "seed": 4}, vocab_dir)
    assert not torch.equal(other_seed.chunk(5, 1)["input_ids"], first["input_ids"])


def test_padding_and_special_tokens_are_never_corrupted(teacher_dir, electra_gen_dir, corpus, work, vocab_dir):
    batches = batches_for(recipe(teacher_dir, electra_gen_dir, corpus, work), vocab_dir)
    ids, mask = tiny.random_batch(batch=8, seq=24, seed=5, pad_last=12)
    out = batches.corrupt({"input_ids": ids, "attention_mask": mask}, torch.Generator().manual_seed(0))
    keep = (mask == 0) | torch.isin(ids, specials(vocab_dir))
    assert (mask == 0).sum() > 30 and torch.equal(out["input_ids"][keep], ids[keep])
    assert not out["replaced_labels"][keep].any() and out["replaced_labels"].any()
    # what sits in the padding changes nothing
    junk = torch.where(mask.bool(), ids, torch.randint(5, tiny.VOCAB_SIZE, ids.shape))
    again = batches.corrupt({"input_ids": junk, "attention_mask": mask}, torch.Generator().manual_seed(0))
    assert torch.equal(again["replaced_labels"], out["replaced_labels"])
    assert torch.equal(again["input_ids"][mask.bool()], out["input_ids"][mask.bool()])


def test_the_frozen_generator_runs_under_the_runs_autocast_not_a_dtype_of_its_own(teacher_dir, electra_gen_dir,
                                                                                   corpus, work, vocab_dir):
    from distill.train.precision import Precision

    cfg = make_config(recipe(teacher_dir, electra_gen_dir, corpus, work))
    tokenizer, teacher = AutoTokenizer.from_pretrained(vocab_dir), load_model(teacher_dir)
    ids, mask = tiny.random_batch(batch=4, seq=16, seed=2)
    masked = CorruptedBatches([], uniform_weights(tiny.VOCAB_SIZE, tokenizer.all_special_ids), tokenizer.mask_token_id,
                              batch_size=4, global_batch=4, seed=0, pad_id=0, grouped=False,
                              device=torch.device("cpu")).masked({"input_ids": ids, "attention_mask": mask},
                                                                 torch.Generator().manual_seed(0))
    seen = []
    for name in ("fp32", "bf16"):
        precision = Precision.from_config(name, device="cpu", cpu_flags=frozenset({"avx512_bf16"}))
        corruptor, trained = setup_generator(cfg, tokenizer, teacher, torch.device("cpu"), precision)
        layer = corruptor.generator_step.generator.electra.encoder.layer[0].output.dense
        hook = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        out = corruptor(masked)
        hook.remove()
        assert trained is None and set(out) == {"input_ids", "attention_mask", "replaced_labels", "mlm_labels"}
        assert not any(p.requires_grad for p in corruptor.generator_step.parameters())  # frozen
    assert seen == [torch.float32, torch.bfloat16]


def test_a_sample_equal_to_the_original_counts_as_original(electra_gen_dir, teacher_dir, corpus, work, vocab_dir):
    the = AutoTokenizer.from_pretrained(vocab_dir).convert_tokens_to_ids("the")
    generator = ElectraForMaskedLM.from_pretrained(electra_gen_dir)
    with torch.no_grad():
        generator.generator_lm_head.bias[the] += 50.0  # it (almost surely) always says "the"
    biased = work / "the_generator"
    generator.save_pretrained(biased)
    batches = batches_for(recipe(teacher_dir, str(biased), corpus, work, per_device_batch_size=32), vocab_dir)
    batch, original = batches.chunk(0, 0), batches.rows(0, 0)["input_ids"]
    chosen = batch["mlm_labels"] != IGNORE_INDEX
    assert (batch["input_ids"][chosen] == the).all()
    was_the = chosen & (original == the)
    assert was_the.sum() > 10 and (chosen & (original != the)).sum() > 10
    assert not batch["replaced_labels"][was_the].any()  # "the" -> "the" is not a replacement
    assert batch["replaced_labels"][chosen & ~was_the].all()


def test_sampling_follows_the_generator_softmax_and_skips_banned_ids():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]]).repeat(40_000, 1)
    g = torch.Generator().manual_seed(0)
    allowed = torch.tensor([True, True, True, True, False])
    drawn = sample_tokens(logits, torch.rand(40_000, generator=g, dtype=torch.float64), allowed)
    freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    expected = torch.softmax(logits[0, :4].double(), -1)
    assert freq[4] == 0 and torch.allclose(freq[:4], expected, atol=0.01)
    edges = sample_tokens(logits[:3], torch.tensor([0.0, 1.0 - 1e-12, 1.0], dtype=torch.float64), allowed)
    assert edges.tolist() == [0, 3, 3]  # u = 0 and u -> 1 land on the first and last allowed ids


# --- the objective through the real path -----------------------------------------------------------

def test_a_student_of_every_teacher_layer_has_zero_distillation_loss(teacher_dir, electra_gen_dir, corpus, work,
                                                                     vocab_dir):
    values = recipe(teacher_dir, electra_gen_dir, corpus, work, student_layers=[1, 2, 3, 4])
    cfg = make_config(values)
    teacher = load_model(teacher_dir, eager=True).eval()
    student = build_student(teacher, [1, 2, 3, 4])[0].eval()
    objective = Objective.from_config(cfg.weights, cfg.temperature, student_config=student, teacher_config=teacher,
                                      student_layers=[1, 2, 3, 4])
    batches = electra_batches(cfg, AutoTokenizer.from_pretrained(teacher_dir), teacher, objective, student)
    with torch.no_grad():
        loss, terms = StudentStep(student, objective, teacher)(batches.chunk(0, 0))
    assert set(terms) == set(HENTSCHEL)
    for name in ("emb_mse", "out_mse", "hid_mse", "att_mse"):
        assert float(terms[name]) < 1e-10, (name, float(terms[name]))
    assert float(terms["cos"]) < 1e-6 and float(terms["rtd_kl"]) < 1e-6
    assert float(terms["rtd"]) > 0.1  # the hard term: the teacher is not a perfect detector
    assert float(loss) == pytest.approx(float(sum(terms.values())), rel=1e-6)


def rtd_scores(student, teacher, objective, batches, steps=range(4)):
    """(objective, agreement of the student's replaced/original calls with the teacher's) on fixed batches."""
    total, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for step in steps:
            batch = batches.chunk(step, 0)
            loss, _ = StudentStep(student, objective, teacher)(batch)
            real = batch["attention_mask"].bool()
            zs = extract(student, batch["input_ids"], batch["attention_mask"], positions=real).logits
            zt = extract(teacher, batch["input_ids"], batch["attention_mask"], positions=real).logits
            total += float(loss)
            agree += int(((zs > 0) == (zt > 0)).sum())
            n += zs.numel()
    return total / len(steps), agree / n


def test_a_short_run_lowers_the_objective_and_agrees_more_with_the_teacher(teacher_dir, electra_gen_dir, corpus,
                                                                           work, vocab_dir):
    out = work / "short"
    values = recipe(teacher_dir, electra_gen_dir, corpus, work, output_dir=str(out))
    train(make_config(values))
    teacher = load_model(teacher_dir, eager=True).eval()
    before = build_student(teacher, [2, 4])[0].eval()
    after = ElectraForPreTraining.from_pretrained(out, attn_implementation="eager").eval()
    objective = Objective.from_config(HENTSCHEL, 2.0, student_config=after, teacher_config=teacher,
                                      student_layers=[2, 4])
    held_out = batches_for({**values, "seed": 99}, vocab_dir)  # batches the run never saw
    loss0, agree0 = rtd_scores(before, teacher, objective, held_out)
    loss1, agree1 = rtd_scores(after, teacher, objective, held_out)
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert agree1 > agree0 + 0.03, (agree0, agree1)
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert set(HENTSCHEL) <= set(log[-1]) and "gen_mlm" not in log[-1]
    # the saved student is an ordinary ELECTRA discriminator folder; the frozen generator is not saved
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ElectraForPreTraining"] and config["num_hidden_layers"] == 2
    assert not config.get("output_hidden_states") and not config.get("output_attentions")
    assert type(AutoModelForSequenceClassification.from_pretrained(out)).__name__ == "ElectraForSequenceClassification"
    assert not (out / GENERATOR_DIR).exists()
    assert "ELECTRA-corrupted sequences (frozen generator)" in (out / "README.md").read_text()


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run_with_a_trained_generator(teacher_dir, electra_gen_dir,
                                                                                      corpus, work):
    # dropout stays on; the generator trains, so its weights and Adam state must come back too
    base = recipe(teacher_dir, electra_gen_dir, corpus, work, output_dir=str(work / "whole"), train_generator=True,
                  generator_weight=0.5, max_steps=60, save_steps=5, logging_steps=5)
    train(make_config(base))
    killed = {**base, "output_dir": str(work / "killed")}
    tiny.kill_after_checkpoint(killed, 10)
    assert train_main(cli_args({**killed, "resume": True})) == 0
    for sub in ("", GENERATOR_DIR):
        whole, resumed = weights(work / "whole" / sub), weights(work / "killed" / sub)
        assert whole.keys() == resumed.keys()
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), (sub, key)
    # the generator trained: its MLM loss is logged and its weights moved
    log = [json.loads(line) for line in (work / "whole" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["gen_mlm"] < log[0]["gen_mlm"]
    start = weights(electra_gen_dir)
    trained = weights(work / "whole" / GENERATOR_DIR)
    assert sum(not torch.equal(trained[k], start[k]) for k in start if k in trained) > 10
    ElectraForMaskedLM.from_pretrained(work / "whole" / GENERATOR_DIR)


# --- bad input: one clear line each ------------------------------------------------------------------

def cli_error(values: dict, capsys, config: Path | None = None) -> str:
    argv = (["--config", str(config)] if config else []) + cli_args(values)
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_an_electra_recipe_with_a_bert_teacher_is_one_clear_error(bert_mlm_dir, corpus, work, capsys):
    line = cli_error({"teacher": bert_mlm_dir, "corpus": corpus, "output_dir": str(work / "bad1")}, capsys,
                     config=RECIPES / "electra_base_4l.json")
    assert line.startswith("error: ") and "ELECTRA discriminator" in line and "BertForMaskedLM" in line


def test_a_generator_with_another_vocabulary_is_one_clear_error(teacher_dir, corpus, work, capsys, vocab_dir):
    other = tiny.save_model("electra_gen", work / "big_vocab_gen", vocab_dir, vocab_size=tiny.VOCAB_SIZE + 10)
    line = cli_error(recipe(teacher_dir, other, corpus, work, output_dir=str(work / "bad2")), capsys)
    assert f"vocabulary of {tiny.VOCAB_SIZE + 10} ids" in line and f"one of {tiny.VOCAB_SIZE}" in line
    # the same check guards the batch source when it is built directly from loaded models
    with pytest.raises(UsageError, match=f"{tiny.VOCAB_SIZE + 10} ids.*{tiny.VOCAB_SIZE}"):
        batches_for(recipe(teacher_dir, other, corpus, work), vocab_dir)


def test_other_ill_formed_electra_recipes_are_one_clear_error(teacher_dir, electra_gen_dir, corpus, work, capsys,
                                                            tmp_path, bert_mlm_dir):
    base = recipe(teacher_dir, electra_gen_dir, corpus, work, output_dir=str(work / "bad3"))
    assert "needs corrupted input: set generator" in cli_error({**base, "generator": None}, capsys)
    assert "not an ELECTRA generator" in cli_error({**base, "generator": teacher_dir}, capsys)
    # a masked LM of a family without a discriminator head is not a generator either
    assert "BertForMaskedLM, not an ELECTRA generator" in cli_error({**base, "generator": bert_mlm_dir}, capsys)
    # a generator whose tokenizer numbers the special tokens differently
    vocab = tiny.vocab_tokens()
    vocab[1], vocab[4] = vocab[4], vocab[1]  # [UNK] <-> [MASK]
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(str(tmp_path / "gen")).save_pretrained(tmp_path / "gen")
    tiny.build_model("electra_gen").save_pretrained(tmp_path / "gen")
    gen = str(tmp_path / "gen")
    with pytest.raises(UsageError, match=r"teacher and generator tokenizers give \[MASK\] different ids \(4 vs 1\)"):
        batches_for({**base, "generator": gen}, teacher_dir)
