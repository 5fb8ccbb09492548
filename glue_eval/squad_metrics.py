"""SQuAD's official exact match and F1, as its evaluation scripts compute them.

v1.1 (``evaluate-v1.1.py``): an answer is normalised (lower case, punctuation removed, the articles
``a``/``an``/``the`` removed, whitespace collapsed); EM is 1 when the normalised prediction equals a
normalised gold answer, F1 is the harmonic mean of token precision and recall over the bag of normalised
tokens; each takes the max over the question's gold answers, and the set's score is the mean over questions.

v2.0 (``evaluate-v2.0.py``): the same normalisation; gold answers that normalise to nothing are dropped and a
question left with none is a no-answer question whose only gold answer is ``""``; when either side has no
tokens, F1 is 1 if both have none, else 0. It also reports the has-answer and no-answer subsets.

Values here are fractions (0.81), as everywhere in glue-eval; the scripts print percentages (81.0).
"""

from __future__ import annotations

import collections
import re
import string

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official ``normalize_answer``)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_v1(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_v1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match_v2(prediction: str, gold: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def f1_v2(prediction: str, gold: str) -> float:
    expected = normalize_answer(gold).split() if gold else []
    predicted = normalize_answer(prediction).split() if prediction else []
    if not expected or not predicted:  # a no-answer on either side: right only if both are
        return float(expected == predicted)
    return f1_v1(prediction, gold)


def gold_answers_v2(answers: list[str]) -> list[str]:
    """v2's gold list: answers that normalise to nothing are dropped; none left means the no-answer ``""``."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(predictions: dict, answers: dict, version_2: bool = False) -> dict[str, float]:
    """EM and F1 over the questions of ``answers``, as fractions.

    predictions: question id -> predicted text (``""`` = no answer; a missing id scores 0, as the scripts do).
    answers: question id -> the gold answer texts (an empty list: a v2 no-answer question).
    Returns ``{"exact_match", "f1"}``, and for v2 also ``HasAns_exact``, ``HasAns_f1``, ``NoAns_exact``,
    ``NoAns_f1`` over the questions of each kind that the set holds.
    """
    em_of, f1_of = (exact_match_v2, f1_v2) if version_2 else (exact_match_v1, f1_v1)
    exact, f1, has_answer = {}, {}, {}
    for qid, gold in answers.items():
        has_answer[qid] = bool(list(gold))  # the v2 script's split: any gold answer given, before normalising
        gold = gold_answers_v2(list(gold)) if version_2 else list(gold)
        prediction = predictions.get(qid)
        if prediction is None:
            exact[qid] = f1[qid] = 0.0
            continue
        exact[qid] = max(em_of(prediction, g) for g in gold)
        f1[qid] = max(f1_of(prediction, g) for g in gold)
    out = {"exact_match": _mean(exact.values()), "f1": _mean(f1.values())}
    if version_2:
        for name, wanted in (("HasAns", True), ("NoAns", False)):
            ids = [q for q in answers if has_answer[q] == wanted]
            if ids:
                out[f"{name}_exact"] = _mean(exact[q] for q in ids)
                out[f"{name}_f1"] = _mean(f1[q] for q in ids)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
