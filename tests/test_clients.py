"""Students load in the client their teacher loaded in, and their cards carry the Hub's metadata.

The sentence-transformers proofs use the real ``sentence-transformers`` package (a test
dependency) on the real all-MiniLM-L6-v2 and on a tiny pipeline built in the test.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoTokenizer

from distill.cli import train_main
from distill.common.assets import minilm_dir
from distill.models.card import card_metadata, front_matter
from distill.models.student import init_student
from tests import tiny
from tests.test_train import run_config, write_corpus

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

SENTENCES = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog near the river bank today.",
             "distillation", "Sentence embeddings compare meaning across two texts of different lengths."]


def load_st(folder) -> SentenceTransformer:
    return SentenceTransformer(str(folder), device="cpu")


def pipeline_of(model: SentenceTransformer) -> list:
    """Each module's class and settings (the Transformer's settings, and a Dense's weights, aside)."""
    out = []
    for module in model:
        entry = {"class": type(module).__name__}
        if isinstance(module, Pooling):
            entry["config"] = module.get_config_dict()
        elif isinstance(module, Dense):
            entry["config"] = {k: v for k, v in module.get_config_dict().items()}
        out.append(entry)
    return out


def encode(model, sentences=SENTENCES) -> np.ndarray:
    return model.encode(sentences, convert_to_numpy=True, batch_size=2)


def card_data(folder) -> dict:
    return ModelCard.load(str(Path(folder) / "README.md")).data.to_dict()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", lines=120)


# --- the real all-MiniLM-L6-v2 ----------------------------------------------------------------

@pytest.mark.slow
def test_an_all_layer_student_of_all_minilm_gives_the_teachers_sentence_embeddings(tmp_path):
    teacher = load_st(minilm_dir())
    out = tmp_path / "student"
    init_student(minilm_dir(), "1,2,3,4,5,6", str(out))
    student = load_st(out)
    assert pipeline_of(student) == pipeline_of(teacher)
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Normalize"]
    assert student.max_seq_length == teacher.max_seq_length == 256
    expected, got = encode(teacher), encode(student)
    assert np.abs(got - expected).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # normalised, as the teacher's are


def test_the_card_names_the_hub_teacher_and_parses_as_a_hub_card(tmp_path):
    out = tmp_path / "student"
    init_student(minilm_dir(), "2,4,6", str(out))
    data = card_data(out)
    teacher_card = ModelCard.load(str(Path(minilm_dir()) / "README.md"))
    # the teacher's own card shows how it is loaded from the hub: that id, not the offline alias
    assert "SentenceTransformer('sentence-transformers/all-MiniLM-L6-v2')" in teacher_card.text
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert {"distillation", "sentence-transformers", "bert"} <= set(data["tags"])
    assert data["license"] == teacher_card.data.license and data["language"] == teacher_card.data.language
    assert "offline:" not in (out / "README.md").read_text()
    student = load_st(out)  # a subset student keeps the pipeline too
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Normalize"]


@pytest.mark.slow
def test_distill_train_from_the_offline_teacher_writes_a_sentence_transformers_student(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    values = run_config("offline:all-MiniLM-L6-v2", corpus, out, tmp_path, student_layers=[1, 6], student_type="bert",
                        weights={"cos": 1.0}, max_steps=2, per_device_batch_size=2)
    assert train_main(tiny.cli_args(values)) == 0
    teacher, student = load_st(minilm_dir()), load_st(out)
    assert pipeline_of(student) == pipeline_of(teacher) and student.max_seq_length == 256
    data = card_data(out)
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["library_name"] == "sentence-transformers"
    assert "| teacher | `sentence-transformers/all-MiniLM-L6-v2` (given as `offline:all-MiniLM-L6-v2`) |" in (
        out / "README.md").read_text()


# --- a tiny pipeline with CLS pooling, a Dense layer and normalisation (sentence-transformers 6 layout) ----

@pytest.fixture(scope="module")
def st_teacher(tmp_path_factory, vocab_dir):
    folder = tmp_path_factory.mktemp("st_teacher")
    hf = tiny.save_model("bert_base", folder / "hf", vocab_dir, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    modules = [Transformer(hf, max_seq_length=48), Pooling(32, pooling_mode="cls"), Dense(32, 16), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "st"))
    return str(folder / "st")


def reference_embeddings(folder, sentences=SENTENCES) -> np.ndarray:
    """The pipeline computed by hand, in float64: CLS hidden state -> tanh(W h + b) -> unit length."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).double().eval()
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "2_Dense" / "model.safetensors"))
    w, b = weights["linear.weight"].double(), weights["linear.bias"].double()
    batch = tok(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        cls = model(**batch).last_hidden_state[:, 0]
    emb = torch.tanh(cls @ w.T + b)
    return (emb / emb.norm(dim=1, keepdim=True)).numpy()


def test_init_carries_a_cls_dense_normalize_pipeline_and_the_student_computes_it(st_teacher, tmp_path):
    out = tmp_path / "student"
    init_student(st_teacher, "1,2,3,4", str(out))
    teacher, student = load_st(st_teacher), load_st(out)
    assert pipeline_of(student) == pipeline_of(teacher)
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert student[1].get_config_dict()["pooling_mode"] == "cls" and student.max_seq_length == 48
    assert np.abs(encode(student) - encode(teacher)).max() < 1e-5
    np.testing.assert_allclose(encode(student), reference_embeddings(out), atol=1e-5)


def test_distill_train_keeps_the_pipeline_and_the_teachers_dense_layer(st_teacher, corpus, tmp_path):
    out = tmp_path / "run"
    values = run_config(st_teacher, corpus, out, tmp_path, student_layers=[2, 4], weights={"cos": 1.0, "hid_mse": 1.0},
                        max_steps=3)
    assert train_main(tiny.cli_args(values)) == 0
    teacher, student = load_st(st_teacher), load_st(out)
    assert pipeline_of(student) == pipeline_of(teacher)
    assert torch.equal(student[2].linear.weight, teacher[2].linear.weight)  # no term trains it: the teacher's, as is
    np.testing.assert_allclose(encode(student), reference_embeddings(out), atol=1e-5)
    assert card_data(out)["library_name"] == "sentence-transformers"


def test_a_plain_teacher_gives_a_plain_transformers_student_and_card(bert_mlm_dir, corpus, tmp_path):
    out = tmp_path / "run"
    assert train_main(tiny.cli_args(run_config(bert_mlm_dir, corpus, out, tmp_path, max_steps=2))) == 0
    assert not (out / "modules.json").exists()
    data = card_data(out)
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "fill-mask"
    assert "base_model" not in data  # a local folder with no hub id: none is made up
    assert "distillation" in data["tags"] and "bert" in data["tags"]


@pytest.mark.parametrize("corpus_spec, dataset", [("wikitext:wikitext-103-raw-v1", "Salesforce/wikitext"),
                                                   ("hub:allenai/c4:en", "allenai/c4"), ("./my_text.txt", None)])
def test_card_datasets_name_hub_corpora_only(corpus_spec, dataset):
    meta = card_metadata("bert-base-uncased", "DistilBertForMaskedLM", corpus=corpus_spec)
    assert meta.get("datasets") == ([dataset] if dataset else None)
    assert meta["base_model"] == "bert-base-uncased" and meta["tags"][:3] == ["distillation", "knowledge-distillation",
                                                                              "distilbert"]
    card = ModelCard("\n".join([*front_matter(meta), "", "# card"]))
    assert card.data.to_dict() == meta


# --- GLUE's diagnostic set (AX.tsv) with the MNLI model -------------------------------------------

AX_ROWS = [(0, "The cat sat on the mat.", "A cat sat."), (1, "He was at the school.", "He was not at the school."),
           (2, "Some were new.", "All were new."), (7, "The city has two universities.", "The city has a university."),
           (12, "She had known him for years.", "They met yesterday.")]


def glue_with_diagnostic(root: Path, with_ax: bool) -> str:
    from glue_eval.samples import write_glue_sample

    data = write_glue_sample(str(root / "glue"), "tsv", tasks=["mnli"], sizes=(16, 8, 6))
    if with_ax:  # GLUE's download: diagnostic/diagnostic.tsv, columns index, sentence1, sentence2
        (root / "glue" / "diagnostic").mkdir()
        lines = ["index\tsentence1\tsentence2"] + [f"{i}\t{a}\t{b}" for i, a, b in AX_ROWS]
        (root / "glue" / "diagnostic" / "diagnostic.tsv").write_text("\n".join(lines) + "\n")
    return data


def run_mnli(model, data, out) -> None:
    from glue_eval.cli import main

    assert main(["--model", model, "--task", "mnli", "--data_dir", data, "--output_dir", str(out), "--use_cpu",
                 "--predict_test", "--save_model", "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
                 "--learning_rate", "1e-3", "--seed", "3", "--disable_tqdm", "true"]) == 0


def test_mnli_test_predictions_come_with_ax_predicted_by_the_mnli_model(bert_mlm_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    run_mnli(bert_mlm_dir, glue_with_diagnostic(tmp_path, with_ax=True), out)
    cell = next((out / "mnli").iterdir())
    record = json.loads((cell / "result.json").read_text())
    assert "submission/AX.tsv" in record["test_predictions"]
    lines = (cell / "submission" / "AX.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(i) for i, _ in rows] == [i for i, _, _ in AX_ROWS]  # the file's own index column
    # the same predictions, computed independently from the saved MNLI model
    model = AutoModelForSequenceClassification.from_pretrained(str(cell / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(cell / "model"))
    batch = tok([a for _, a, _ in AX_ROWS], [b for _, _, b in AX_ROWS], padding=True, truncation=True,
                max_length=128, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1).tolist()
    assert [p for _, p in rows] == [("entailment", "neutral", "contradiction")[i] for i in ids]
    assert "AX.tsv skipped" not in capsys.readouterr().err


def test_without_diagnostic_data_ax_is_skipped_in_one_line(bert_mlm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_mnli(bert_mlm_dir, glue_with_diagnostic(tmp_path, with_ax=False), out)
    notes = [line for line in capsys.readouterr().err.splitlines() if "AX.tsv" in line]
    assert len(notes) == 1 and "AX.tsv skipped" in notes[0] and "diagnostic/diagnostic.tsv" in notes[0]
    cell = next((out / "mnli").iterdir())
    assert sorted(p.name for p in (cell / "submission").iterdir()) == ["MNLI-m.tsv", "MNLI-mm.tsv"]


# --- transformers clients: a student loads exactly as cleanly as its teacher ------------------------

@pytest.mark.parametrize("teacher_fixture, student_type, auto", [
    ("bert_mlm_dir", "bert", "AutoModelForMaskedLM"), ("bert_mlm_dir", "distilbert", "AutoModelForMaskedLM"),
    ("distilbert_mlm_dir", "distilbert", "AutoModelForMaskedLM"), ("electra_disc_dir", "electra", "AutoModelForPreTraining"),
])
def test_a_student_loads_in_its_teachers_auto_class_as_cleanly_as_the_teacher(teacher_fixture, student_type, auto,
                                                                              request, tmp_path):
    import transformers

    teacher = request.getfixturevalue(teacher_fixture)
    out = tmp_path / "student"
    init_student(teacher, "1,3", str(out), student_type)
    cls = getattr(transformers, auto)

    def info(folder):
        model, loading = cls.from_pretrained(str(folder), output_loading_info=True)
        return type(model).__name__.split("For")[1], {k: sorted(v) for k, v in loading.items() if k != "error_msgs"}

    (t_head, t_info), (s_head, s_info) = info(teacher), info(out)
    assert s_head == t_head and s_info == t_info
    assert not s_info["missing_keys"]
