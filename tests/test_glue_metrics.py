"""GLUE metrics against independent computations (formulas and ranks by hand) on fixed predictions."""

import math

import numpy as np
import pytest

from glue_eval.metrics import compute_metrics, task_score
from glue_eval.tasks import get_task, resolve_tasks

PRED = [1, 1, 0, 1, 0, 0, 1, 0, 1, 1]
GOLD = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1]
# By hand: TP = 4 (idx 0, 3, 6, 9), FP = 2 (1, 8), FN = 1 (5), TN = 3 (2, 4, 7).
TP, FP, FN, TN = 4, 2, 1, 3


def test_matthews_correlation_is_the_confusion_matrix_formula():
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    got = compute_metrics(get_task("cola"), PRED, GOLD)
    assert set(got) == {"matthews_correlation"}
    assert got["matthews_correlation"] == pytest.approx(expected)  # 10 / sqrt(6*5*5*4) = 0.408


def test_mrpc_and_qqp_report_f1_of_the_positive_class_and_accuracy():
    precision, recall = TP / (TP + FP), TP / (TP + FN)
    f1 = 2 * precision * recall / (precision + recall)
    for task in ("mrpc", "QQP"):
        got = compute_metrics(get_task(task), PRED, GOLD)
        assert got == pytest.approx({"f1": f1, "accuracy": (TP + TN) / 10})
    # F1 of class 1, not of class 0 and not a macro average: swapping classes changes it.
    swapped = compute_metrics(get_task("mrpc"), [1 - p for p in PRED], [1 - g for g in GOLD])["f1"]
    assert swapped == pytest.approx(2 * TN / (2 * TN + FN + FP))
    assert swapped != pytest.approx(f1)


def test_logits_are_turned_into_predicted_classes():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert compute_metrics(get_task("sst2"), logits, [1, 0, 0]) == {"accuracy": pytest.approx(2 / 3)}


def _ranks(x):
    """Average ranks (1-based), ties sharing the mean of their positions: by hand, no scipy."""
    x = list(x)
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_stsb_pearson_and_spearman_match_the_formulas_with_tied_ranks():
    pred = [0.5, 2.0, 2.0, 3.1, 4.8, 1.0, 3.1, 0.2]
    gold = [0.0, 2.4, 1.8, 3.0, 5.0, 1.6, 2.8, 0.8]
    got = compute_metrics(get_task("STS-B"), np.array(pred)[:, None], gold)  # [N, 1] regression logits
    assert set(got) == {"pearson", "spearmanr"}
    assert got["pearson"] == pytest.approx(_pearson(pred, gold))
    assert got["spearmanr"] == pytest.approx(_pearson(_ranks(pred), _ranks(gold)))
    assert _ranks(pred)[1] == _ranks(pred)[2] == 4.5  # the tie really is exercised


def test_a_constant_regressor_scores_zero_not_nan():
    got = compute_metrics(get_task("stsb"), [2.5] * 4, [0.0, 1.0, 4.0, 5.0])
    assert got == {"pearson": 0.0, "spearmanr": 0.0}


def test_mnli_matched_and_mismatched_are_computed_separately_never_pooled():
    matched = compute_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 2, 0])
    mismatched = compute_metrics(get_task("mnli"), [0, 0], [1, 1])
    assert matched == {"accuracy": 0.75} and mismatched == {"accuracy": 0.0}
    mnli = get_task("mnli")
    assert mnli.dev_splits == ("validation_matched", "validation_mismatched")
    assert mnli.selection_split == "validation_matched"


def test_task_score_is_the_mean_of_a_tasks_metrics():
    assert task_score({"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert task_score({"accuracy": 0.7}) == pytest.approx(0.7)


def test_registry_has_the_nine_tasks_with_glue_metrics_and_hub_label_order():
    tasks = {t.name: t for t in resolve_tasks("all")}
    assert list(tasks) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert tasks["cola"].metrics == ("matthews_correlation",)
    assert tasks["stsb"].metrics == ("pearson", "spearmanr") and tasks["stsb"].is_regression
    assert tasks["mrpc"].metrics == tasks["qqp"].metrics == ("f1", "accuracy")
    assert tasks["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert tasks["qnli"].labels == tasks["rte"].labels == ("entailment", "not_entailment")
    assert tasks["wnli"].labels == ("not_entailment", "entailment")
    assert get_task("SST-2") is get_task("sst2") is get_task("sst_2")
