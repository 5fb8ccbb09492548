"""Extractive QA's parts: SQuAD's EM/F1 on hand-computed cases, windows with doc stride for every tokenizer kind
the families use, and span decoding over all windows (n-best, max answer length, v2's no-answer threshold)."""

import random

import numpy as np
import pytest

from distill.common.errors import UsageError
from glue_eval.qa import decode, encode_splits, span_positions
from glue_eval.qa_data import FEATURES
from glue_eval.squad_metrics import f1_v1, f1_v2, normalize_answer, squad_scores
from glue_eval.tasks import get_task
from tests import qa_sets, tiny

# --- the official formulas, by hand --------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, an  icon! ") == "eiffeltower icon"
    assert normalize_answer("A theatre") == "theatre"  # "the" inside a word stays


def test_v1_exact_match_and_f1_take_the_best_gold_answer():
    # prediction "the big red dog" -> tokens [big, red, dog]; gold 1 "red dog" -> [red, dog]: 2 common,
    # precision 2/3, recall 1, F1 = 2 * (2/3) / (5/3) = 0.8; gold 2 "a cat" -> 0. Max: 0.8, EM 0.
    # q2: "Paris." against "paris" -> EM 1, F1 1. q3: no prediction -> 0. Means: EM 1/3, F1 (0.8 + 1) / 3.
    predictions = {"q1": "the big red dog", "q2": "Paris."}
    answers = {"q1": ["red dog", "a cat"], "q2": ["paris"], "q3": ["x"]}
    scores = squad_scores(predictions, answers)
    assert scores == pytest.approx({"exact_match": 1 / 3, "f1": 1.8 / 3})
    # repeated tokens count as a bag: "dog dog" vs "dog": common 1, P 1/2, R 1 -> F1 2/3
    assert f1_v1("dog dog", "dog") == pytest.approx(2 / 3)


def test_v2_no_answer_questions_score_only_an_empty_prediction():
    # q1 has an answer; q2's only gold answer normalises to nothing (dropped: scored as no-answer, but counted
    # among HasAns, as the v2 script splits on the raw answers); q3 none.
    predictions = {"q1": "1871", "q2": "", "q3": "in 1871"}
    answers = {"q1": ["1871", "May 1871"], "q2": ["the"], "q3": []}
    scores = squad_scores(predictions, answers, version_2=True)
    # q1: EM 1, F1 1; q2: "" vs "" -> EM 1, F1 1; q3: "in 1871" vs "" -> 0, 0.
    assert scores == pytest.approx({"exact_match": 2 / 3, "f1": 2 / 3, "HasAns_exact": 1.0, "HasAns_f1": 1.0,
                                    "NoAns_exact": 0.0, "NoAns_f1": 0.0})
    # v2's F1 when one side has no tokens: 1 only if both are empty; v1 gives 0 for empty against empty
    assert f1_v2("", "") == 1.0 and f1_v2("a", "") == 1.0  # "a" normalises to nothing
    assert f1_v2("x", "") == 0.0 and f1_v1("", "") == 0.0


# --- windows: every kind of tokenizer the families use ----------------------------------------------------


def _sentencepiece_tokenizer(folder):
    """A SentencePiece (Unigram, Metaspace) tokenizer as XLM-R uses, trained here on the tiny words."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaTokenizer

    rng = random.Random(0)
    lines = [" ".join(rng.choice(tiny.WORDS) for _ in range(12)) + f" {rng.randint(1500, 2030)} ." for _ in range(400)]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(lines, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                           unk_token="<unk>")
    tok = XLMRobertaTokenizer(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                              model_max_length=64)
    tok.save_pretrained(str(folder))
    return str(folder)


def _left_padded(folder):
    """A WordPiece tokenizer that pads on the left: the context then comes first in the pair."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.save_tokenizer(folder))
    tok.padding_side = "left"
    return tok


TOKENIZERS = {
    "wordpiece (bert, distilbert, electra)": lambda d: tiny.save_tokenizer(d),
    "byte-level BPE (roberta)": lambda d: tiny.save_bpe_tokenizer(d),
    "wordpiece with <s> (mpnet)": lambda d: tiny.save_mpnet_tokenizer(d),
    "sentencepiece (xlm-roberta)": _sentencepiece_tokenizer,
    "left padding": _left_padded,
}


@pytest.fixture(scope="module")
def passages():
    return qa_sets.year_paragraphs(count=6)


def _tokenizer(kind, folder):
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    made = TOKENIZERS[kind](folder)
    return made if not isinstance(made, str) else AutoTokenizer.from_pretrained(made)


def _encoded(tokenizer, tmp_path, paragraphs, **kw):
    folder = qa_sets.write_squad(tmp_path / "data", paragraphs, paragraphs, **kw)
    from glue_eval.qa_data import read_squad_file

    name = "v2.0" if kw.get("version_2") else "v1.1"
    splits = {"train": read_squad_file(str(folder / f"train-{name}.json")),
              "validation": read_squad_file(str(folder / f"dev-{name}.json"))}
    return splits, encode_splits(get_task("squad"), splits, tokenizer, max_seq_length=40, doc_stride=12)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_windows_point_at_the_answer_wherever_it_falls(kind, tmp_path, passages):
    tokenizer = _tokenizer(kind, tmp_path / "tok")
    splits, data = _encoded(tokenizer, tmp_path, passages)
    train, windows, examples = data["train"], data["validation"], splits["validation"]
    assert len(train) == len(windows) > 3 * len(examples)  # long contexts: several windows each
    assert set(FEATURES) <= set(examples.features)
    found_later = 0
    for w in range(len(windows)):
        example = examples[windows[w]["example"]]
        answer, start_char = example["answers"]["text"][0], example["answers"]["answer_start"][0]
        offsets, s, e = windows[w]["offsets"], train[w]["start_positions"], train[w]["end_positions"]
        inside = [o for o in offsets if o[0] >= 0]
        holds = inside[0][0] <= start_char and inside[-1][1] >= start_char + len(answer)
        if holds:  # the target tokens are the answer's, read back through the tokenizer's own offsets
            assert example["context"][offsets[s][0]:offsets[e][1]].strip() == answer
            found_later += windows[w - 1]["example"] == windows[w]["example"] if w else 0
        else:  # no whole answer in this window: the classifier token
            assert s == e == windows[w]["cls_index"]
            assert windows[w]["input_ids"][s] in (tokenizer.cls_token_id, tokenizer.bos_token_id)
    assert found_later > 0  # some answers sit in a window after an example's first


def test_collated_windows_keep_their_labels_on_the_answer_when_the_tokenizer_pads_left(tmp_path, passages):
    """A batch of windows of different lengths, collated for training: the span labels still index the answer's
    tokens (left padding would shift every shorter window's tokens under its labels); the tokenizer is unchanged."""
    from glue_eval.qa import window_collator

    from glue_eval.qa_data import read_squad_file

    tokenizer = _tokenizer("left padding", tmp_path / "tok")
    folder = qa_sets.write_squad(tmp_path / "data", passages, passages)
    splits = {"train": read_squad_file(str(folder / "train-v1.1.json")),
              "validation": read_squad_file(str(folder / "dev-v1.1.json"))}
    data = encode_splits(get_task("squad"), splits, tokenizer, max_seq_length=256, doc_stride=64)
    train, windows, examples = data["train"], data["validation"], splits["validation"]
    answered = [w for w in range(len(train)) if train[w]["start_positions"] != windows[w]["cls_index"]]
    lengths = {len(train[w]["input_ids"]) for w in answered}
    assert len(lengths) > 2  # whole contexts of different lengths: the shorter ones get padded
    batch = window_collator(tokenizer)([train[w] for w in answered])
    assert tokenizer.padding_side == "left"
    for row, w in enumerate(answered):
        example = examples[windows[w]["example"]]
        s, e = int(batch["start_positions"][row]), int(batch["end_positions"][row])
        ids = batch["input_ids"][row].tolist()
        assert ids[s:e + 1] == train[w]["input_ids"][s:e + 1]  # the same tokens under the labels
        offsets = windows[w]["offsets"]
        assert example["context"][offsets[s][0]:offsets[e][1]].strip() == example["answers"]["text"][0]


@pytest.mark.parametrize("kind", ["wordpiece (bert, distilbert, electra)", "sentencepiece (xlm-roberta)"])
def test_decoding_recovers_the_answer_from_any_window_that_holds_it(kind, tmp_path, passages):
    tokenizer = _tokenizer(kind, tmp_path / "tok")
    splits, data = _encoded(tokenizer, tmp_path, passages)
    train, windows, examples = data["train"], data["validation"], splits["validation"]
    rng = np.random.default_rng(0)
    length = max(len(ids) for ids in windows["input_ids"])
    holding = [w for w in range(len(windows)) if train[w]["start_positions"] != windows[w]["cls_index"]]
    for chosen in holding:  # the oracle's logits in one window only; noise everywhere else
        start = rng.normal(0, 1, (len(windows), length))
        end = rng.normal(0, 1, (len(windows), length))
        start[chosen, train[chosen]["start_positions"]] = 20
        end[chosen, train[chosen]["end_positions"]] = 20
        predicted = decode(examples, windows, start, end)
        example = examples[windows[chosen]["example"]]
        assert predicted[example["id"]].strip() == example["answers"]["text"][0]


def _one_window():
    """A hand-made window: tokens 0 (classifier) and 1 (question) outside the context, 2..5 over 'ab cd ef gh'."""
    examples = {"id": ["q"], "context": ["ab cd ef gh"], "idx": [0]}
    windows = {"example": [0], "cls_index": [0], "offsets": [[[-1, -1], [-1, -1], [0, 2], [3, 5], [6, 8], [9, 11]]]}
    return examples, windows


def test_the_best_pair_respects_order_length_and_the_context():
    examples, windows = _one_window()
    # best start 5 ('gh') but the best end 2 lies before it; question token 1 has the highest start of all
    start = np.array([[0, 9, 1, 0.5, 0, 3]], float)
    end = np.array([[0, 9, 4, 1, 2, 0]], float)
    # valid pairs: (2,2)=5, (2,3)=2, (2,4)=3, (2,5)=1, (3,3)=1.5, (3,4)=2.5, (4,4)=2, (5,5)=3: best (2,2) 'ab'
    assert decode(examples, windows, start, end) == {"q": "ab"}
    end = np.array([[0, 9, 0, 1, 6, 0]], float)  # best (2,4) = 7: 'ab cd ef', three tokens
    assert decode(examples, windows, start, end) == {"q": "ab cd ef"}
    # at most two tokens: (3,4) = 6.5 beats (4,4) = 6 and (5,5) = 3
    assert decode(examples, windows, start, end, max_answer_length=2) == {"q": "cd ef"}
    assert decode(examples, windows, start, end, n_best_size=1) == {"q": ""}  # top-1 start is the question token


def test_v2_answers_nothing_when_the_null_score_wins_by_more_than_the_threshold():
    examples, windows = _one_window()
    start = np.array([[3, 0, 2, 0, 0, 0]], float)
    end = np.array([[3, 0, 0, 2, 0, 0]], float)  # null 6, best span (2,3) 'ab cd' = 4: difference 2
    assert decode(examples, windows, start, end, version_2=True) == {"q": ""}
    assert decode(examples, windows, start, end, version_2=True, null_score_diff_threshold=2.5) == {"q": "ab cd"}
    assert decode(examples, windows, start, end, version_2=False) == {"q": "ab cd"}  # v1 always answers


def test_a_slow_tokenizer_and_a_stride_past_the_window_are_refused_in_one_line(tmp_path):
    tokenizer = _tokenizer("wordpiece (bert, distilbert, electra)", tmp_path / "tok")
    with pytest.raises(UsageError, match="--doc_stride 40: give the overlap"):
        encode_splits(get_task("squad"), {}, tokenizer, max_seq_length=40, doc_stride=40)

    class Slow:
        is_fast = False

    with pytest.raises(UsageError, match="needs a fast tokenizer"):
        encode_splits(get_task("squad"), {}, Slow(), max_seq_length=40, doc_stride=8)


def test_span_positions_is_none_for_a_span_cut_by_the_window():
    offsets = [(0, 0), (0, 2), (3, 5), (0, 0)]
    assert span_positions(offsets, [None, 1, 1, None], 1, 3, 5) == (2, 2)
    assert span_positions(offsets, [None, 1, 1, None], 1, 3, 8) is None
