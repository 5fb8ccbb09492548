"""DistilBERT's masking: 15% targets drawn by count^-0.7 without replacement, 80/10/10, specials never."""

import numpy as np
import pytest
import torch

from distill.common.errors import UsageError
from distill.data.masking import IGNORE_INDEX, mask_tokens, masking_weights
from tests import tiny

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
V = tiny.VOCAB_SIZE


def gen(seed):
    return torch.Generator().manual_seed(seed)


def uniform_weights():
    return masking_weights(np.full(V, 100), SPECIALS)


def padded_batch(batch=64, seq=128, seed=0):
    """[CLS] tokens [SEP] then padding; row lengths vary from seq/4 to seq."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, n - 1] = CLS, SEP
        ids[row, n:] = PAD
        mask[row, :n] = 1
    return ids, mask


def maskable(ids, mask):
    return mask.bool() & ~torch.isin(ids, torch.tensor(SPECIALS))


def test_weights_are_count_to_the_minus_0_7_and_zero_for_specials():
    counts = np.arange(V) * 7
    w = masking_weights(counts, SPECIALS)
    assert w.dtype == torch.float32 and w.shape == (V,)
    assert torch.all(w[SPECIALS] == 0)
    expect = np.maximum(counts, 1).astype(np.float64) ** -0.7
    np.testing.assert_allclose(w[5:].numpy(), expect[5:], rtol=1e-6)
    assert masking_weights(np.zeros(V), [])[7] == 1.0  # unseen tokens count as seen once


def test_fifteen_percent_of_real_non_special_tokens_become_targets():
    ids, mask = padded_batch()
    _, labels = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(0))
    n = int(maskable(ids, mask).sum())
    assert int((labels != IGNORE_INDEX).sum()) == round(0.15 * n)
    assert n > 4000  # a large batch: the rate is not a small-number accident


def test_labels_are_the_original_ids_on_targets_and_minus_100_elsewhere():
    ids, mask = padded_batch(seed=3)
    masked, labels = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(1))
    target = labels != IGNORE_INDEX
    assert torch.equal(labels[target], ids[target])
    assert torch.all(labels[~target] == IGNORE_INDEX)
    assert torch.equal(masked[~target], ids[~target])  # nothing off-target changes
    assert masked.dtype == labels.dtype == torch.long and masked.shape == ids.shape


def test_special_and_padded_positions_are_never_chosen():
    ids, mask = padded_batch(batch=16, seq=32, seed=5)
    ids[:, 5] = MASK  # an already-masked token and an [UNK] are special too
    ids[:, 6] = UNK
    never = ~maskable(ids, mask)
    # rare weights on the specials' neighbours do not matter: weight 0 is never drawn
    for seed in range(200):
        _, labels = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(seed), mlm_probability=0.9)
        assert torch.all(labels[never] == IGNORE_INDEX)


def test_padding_tokens_that_look_real_are_never_chosen():
    """Whatever sits in padding (here ordinary word ids) is never a target: the mask decides."""
    ids, mask = padded_batch(batch=8, seq=40, seed=7)
    ids[mask == 0] = 50
    for seed in range(50):
        _, labels = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(seed), mlm_probability=1.0)
        assert torch.all(labels[mask == 0] == IGNORE_INDEX)
        assert torch.all((labels != IGNORE_INDEX) == maskable(ids, mask))  # p=1: every real token


def test_eighty_ten_ten_split():
    ids, mask = padded_batch(batch=128, seq=128, seed=11)
    n_mask = n_keep = n_rand = 0
    for seed in range(40):
        masked, labels = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(seed))
        t = labels != IGNORE_INDEX
        new, old = masked[t], labels[t]
        n_mask += int((new == MASK).sum())
        n_keep += int((new == old).sum())
        rand = new[(new != MASK) & (new != old)]
        n_rand += rand.numel()
        assert not torch.isin(rand, torch.tensor(SPECIALS)).any()  # random tokens are never special
    total = n_mask + n_keep + n_rand
    assert total > 50_000
    # a random draw equals the original with chance 1/(V-5); tolerances are ~6 standard deviations
    assert abs(n_mask / total - 0.8) < 0.01
    assert abs(n_keep / total - 0.1 - 0.1 / (V - 5)) < 0.008
    assert abs(n_rand / total - 0.1) < 0.008


def test_one_target_is_drawn_with_chance_proportional_to_count_to_the_minus_0_7():
    counts = np.full(V, 1000)
    rare = {10: 1, 11: 3, 12: 10, 13: 30}
    for tok, c in rare.items():
        counts[tok] = c
    w = masking_weights(counts, SPECIALS)
    ids = torch.tensor([[CLS, 10, 11, 12, 13, SEP, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    draws = 6000
    hits = dict.fromkeys(rare, 0)
    g = gen(0)
    for _ in range(draws):
        _, labels = mask_tokens(ids, mask, w, MASK, V, g)  # round(0.15 * 4) -> at least one target
        (pos,) = torch.nonzero(labels[0] != IGNORE_INDEX).flatten().tolist()
        hits[int(ids[0, pos])] += 1
    formula = {t: c ** -0.7 for t, c in rare.items()}
    total = sum(formula.values())
    for tok in rare:
        expect = formula[tok] / total
        assert abs(hits[tok] / draws - expect) < 4 * np.sqrt(expect * (1 - expect) / draws) + 1e-3, (tok, hits)


def test_rare_tokens_are_chosen_more_often_as_the_without_replacement_formula_says():
    """15% of a large batch: selection frequency per token follows 1 - exp(-w t), w = count^-0.7.

    Drawing k of N positions without replacement with chance proportional to w includes a
    position of weight w with probability 1 - exp(-w t), t fixed by the expected total k;
    for small w t that is proportional to w.
    """
    counts = np.full(V, 10)
    kinds = {20: 1, 21: 10, 22: 100, 23: 1000, 24: 10_000}
    for tok, c in kinds.items():
        counts[tok] = c
    w = masking_weights(counts, SPECIALS).double()
    toks = torch.tensor(list(kinds))
    ids = toks.repeat(64 * 100 // len(kinds)).reshape(64, 100)
    mask = torch.ones_like(ids)
    k = round(0.15 * ids.numel())
    lo, hi = 0.0, 1e6
    for _ in range(200):  # solve sum_i n_i (1 - exp(-w_i t)) = k for t
        t = (lo + hi) / 2
        if float((1 - torch.exp(-w[ids] * t)).sum()) < k:
            lo = t
        else:
            hi = t
    chosen = torch.zeros(len(kinds))
    runs = 40
    for seed in range(runs):
        _, labels = mask_tokens(ids, mask, w.float(), MASK, V, gen(seed))
        sel = labels != IGNORE_INDEX
        chosen += torch.stack([sel[ids == tok].float().mean() for tok in toks])
    freq = chosen / runs
    predicted = 1 - torch.exp(-w[toks] * t)
    assert torch.all(freq[:-1] > freq[1:])  # rarer is chosen more often, strictly
    torch.testing.assert_close(freq, predicted.float(), rtol=0.05, atol=6e-4)


def test_fewer_maskable_tokens_than_targets_or_none_at_all_does_not_crash():
    w = uniform_weights()
    only_specials = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, MASK, SEP, PAD]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    masked, labels = mask_tokens(only_specials, mask, w, MASK, V, gen(0))
    assert torch.all(labels == IGNORE_INDEX) and torch.equal(masked, only_specials)

    one = torch.tensor([[CLS, 40, SEP, PAD]])
    _, labels = mask_tokens(one, torch.tensor([[1, 1, 1, 0]]), w, MASK, V, gen(0), mlm_probability=1.0)
    assert labels.tolist() == [[IGNORE_INDEX, 40, IGNORE_INDEX, IGNORE_INDEX]]

    # mostly special ids: DistilBERT's code asked multinomial for more targets than non-zero weights
    ids = torch.full((4, 50), SEP)
    ids[:, 0], ids[0, 1] = CLS, 33
    _, labels = mask_tokens(ids, torch.ones_like(ids), w, MASK, V, gen(0), mlm_probability=1.0)
    assert int((labels != IGNORE_INDEX).sum()) == 1

    empty = torch.zeros(0, 8, dtype=torch.long)
    masked, labels = mask_tokens(empty, empty, w, MASK, V, gen(0))
    assert masked.shape == labels.shape == (0, 8)


def test_the_same_generator_seed_gives_the_same_masking():
    ids, mask = padded_batch(batch=8, seq=64)
    a = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(123))
    b = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(123))
    c = mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    g = gen(5)  # masking is redone per batch: the generator moves on
    first = mask_tokens(ids, mask, uniform_weights(), MASK, V, g)
    second = mask_tokens(ids, mask, uniform_weights(), MASK, V, g)
    assert not torch.equal(first[1], second[1])


def test_input_is_not_modified_in_place():
    ids, mask = padded_batch(batch=4, seq=32)
    before = ids.clone()
    mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(0), mlm_probability=0.5)
    assert torch.equal(ids, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"mlm_probability": 0.0}, "mlm_probability"),
    ({"mlm_probability": 1.5}, "mlm_probability"),
    ({"mask_frac": 0.9, "random_frac": 0.2}, "sum to at most 1"),
])
def test_bad_fractions_are_clear_errors(kwargs, message):
    ids, mask = padded_batch(batch=2, seq=8)
    with pytest.raises(UsageError, match=message):
        mask_tokens(ids, mask, uniform_weights(), MASK, V, gen(0), **kwargs)
