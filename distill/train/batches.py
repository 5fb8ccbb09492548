"""Training batches: which sequences step k sees, and how they are masked.

Chunk ``c`` of step ``k`` is a pure function of ``(seed, k, c)``: the rows come from
the epoch's order, the masking from a generator seeded with ``(seed, k, c)``. That
is what makes resume exact and N processes equal to one (see :mod:`distill.train.loop`).

The data layer owns no model: ELECTRA's batches are masked here and corrupted by a
*corruptor* that run setup builds around the generator (:mod:`distill.train.electra`).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import torch

from distill.common.errors import UsageError
from distill.data.corpus import (
    check_block_size,
    collate,
    epoch_order,
    length_grouped_order,
    load_corpus_blocks,
    sequence_lengths,
    token_counts,
)
from distill.data.masking import mask_tokens, masking_weights
from distill.models.families import max_positions
from distill.objective.terms import MASKED_INPUT, TERMS

ELECTRA_MASK_FRAC = 0.85  # ELECTRA: of the chosen tokens, 85% become [MASK] in the generator's input, 15% stay


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "distill")


def chunk_generator(seed: int, step: int, chunk: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, chunk)."""
    state = np.random.SeedSequence([seed, step, chunk]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class Batches:
    """Rows of a tokenised corpus, served as the chunks of each optimiser step.

    ``global_batch`` = per-device batch x accumulation x world size; chunk ``c`` of step
    ``k`` is rows ``order[k*G + c*B : k*G + (c+1)*B]`` of epoch ``k // steps_per_epoch``.
    """

    def __init__(self, dataset, batch_size: int, global_batch: int, seed: int, pad_id: int, grouped: bool,
                 device: torch.device):
        self.dataset = dataset
        self.batch_size = batch_size
        self.global_batch = global_batch
        self.seed = seed
        self.pad_id = pad_id
        self.device = device
        self.num_sequences = len(dataset)
        self.steps_per_epoch = max(self.num_sequences // global_batch, 1)
        self._lengths = sequence_lengths(dataset) if grouped else None
        self._order_epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self._lengths is None:
                self._order = epoch_order(self.num_sequences, self.seed, epoch)
            else:
                self._order = length_grouped_order(self._lengths, self.global_batch, self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def rows(self, step: int, chunk: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + chunk * self.batch_size
        idx = self.order(epoch)[start:start + self.batch_size]
        return collate(self.dataset[idx.tolist()], self.pad_id)

    def chunk(self, step: int, chunk: int) -> dict[str, torch.Tensor]:
        batch = self.rows(step, chunk)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def describe(self) -> str:
        return f"{self.num_sequences:,} sequences"


class MaskedLMBatches(Batches):
    """DistilBERT's batches: 15% targets drawn by count^-0.7, 80/10/10, redone every chunk."""

    def __init__(self, dataset, weights: torch.Tensor, mask_id: int, vocab_size: int, mlm_probability: float,
                 **kwargs):
        super().__init__(dataset, **kwargs)
        self.weights, self.mask_id, self.vocab_size = weights, mask_id, vocab_size
        self.mlm_probability = mlm_probability

    def chunk(self, step: int, chunk: int) -> dict[str, torch.Tensor]:
        batch = self.rows(step, chunk)
        ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.weights, self.mask_id,
                                  self.vocab_size, chunk_generator(self.seed, step, chunk),
                                  mlm_probability=self.mlm_probability)
        batch = {"input_ids": ids, "attention_mask": batch["attention_mask"], "mlm_labels": labels}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def uniform_weights(vocab_size: int, special_ids) -> torch.Tensor:
    """Masking weights that choose every non-special token with the same chance (ELECTRA's uniform masking)."""
    return masking_weights(np.ones(vocab_size), special_ids, smoothing=0.0)


class CorruptedBatches(Batches):
    """ELECTRA's batches: the generator's masked input for every chunk, corrupted by ``corruptor``.

    ``masked(rows, g)``: 15% (``mlm_probability``) of the real, non-special tokens chosen
    uniformly, 85% of them [MASK] and 15% kept (``generator_input_ids``, ``attention_mask``,
    ``mlm_labels``), plus ``sample_noise``, the uniforms ``[B, S]`` the generator samples
    with. ``corruptor`` (a callable, :class:`distill.train.electra.Corruptor`) turns that into
    ``input_ids`` (corrupted), ``attention_mask``, ``replaced_labels``, ``mlm_labels``.
    ``corruptor=None``: the generator trains, so the training step corrupts, and
    ``chunk`` returns the masked input.
    """

    def __init__(self, dataset, weights: torch.Tensor, mask_id: int, mlm_probability: float = 0.15,
                 corruptor: Callable[[Mapping], dict] | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.weights, self.mask_id, self.mlm_probability = weights, mask_id, mlm_probability
        self.corruptor = corruptor

    def masked(self, batch: Mapping, generator: torch.Generator) -> dict:
        """The generator's inputs for ``batch`` (``input_ids``, ``attention_mask`` ``[B, S]``)."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        masked, labels = mask_tokens(ids, mask, self.weights, self.mask_id, self.weights.numel(), generator,
                                     mlm_probability=self.mlm_probability, mask_frac=ELECTRA_MASK_FRAC,
                                     random_frac=0.0)
        noise = torch.rand(ids.shape, generator=generator, dtype=torch.float64).to(self.device)
        return {"generator_input_ids": masked, "attention_mask": mask, "mlm_labels": labels, "sample_noise": noise}

    def corrupt(self, batch: Mapping, generator: torch.Generator) -> dict:
        """The corrupted batch: ``batch`` masked, then passed through the corruptor."""
        if self.corruptor is None:
            raise ValueError("these batches have no corruptor: the training step corrupts (a trained generator)")
        return self.corruptor(self.masked(batch, generator))

    def chunk(self, step: int, chunk: int) -> dict[str, torch.Tensor]:
        rows = self.rows(step, chunk)
        g = chunk_generator(self.seed, step, chunk)
        if self.corruptor is None:
            return self.masked(rows, g)
        return self.corrupt(rows, g)

    def describe(self) -> str:
        how = "trained" if self.corruptor is None else "frozen"
        return f"{self.num_sequences:,} ELECTRA-corrupted sequences ({how} generator)"


def corpus_dataset(cfg, corpus: str, tokenizer, env):
    """Tokenise (once, cached) on the main process first; the others then read the cache."""
    import torch.distributed as dist

    cache = cfg.cache_dir or default_cache_dir()
    os.makedirs(cache, exist_ok=True)
    kwargs = dict(mode=cfg.data_mode, num_proc=cfg.num_proc, max_documents=cfg.max_documents)
    if env.world > 1 and not env.main:
        dist.barrier()
    dataset = load_corpus_blocks(corpus, tokenizer, cfg.block_size, cache, **kwargs)
    if env.world > 1 and env.main:
        dist.barrier()
    return dataset


def make_batches(cfg, corpus: str, tokenizer, teacher, objective, env, student=None, corruptor=None) -> Batches:
    """The batch source for a run: plain, masked-LM, or ELECTRA-corrupted.

    ``corruptor``: for an ELECTRA recipe (``cfg.generator``), what run setup built around
    a frozen generator (:func:`distill.train.electra.setup_generator`); None when it trains.
    """
    check_block_size(cfg.block_size, max_positions(teacher))  # RoBERTa: padding_idx + 1 rows before position 0
    if student is not None:
        check_block_size(cfg.block_size, max_positions(student))
    dataset = corpus_dataset(cfg, corpus, tokenizer, env)
    common = dict(batch_size=cfg.per_device_batch_size,
                  global_batch=cfg.per_device_batch_size * cfg.gradient_accumulation_steps * env.world,
                  seed=cfg.seed, pad_id=tokenizer.pad_token_id, grouped=cfg.data_mode == "group", device=env.device)
    if cfg.generator:
        if tokenizer.mask_token_id is None:
            raise UsageError("the tokenizer has no [MASK] token, which the ELECTRA generator's input needs")
        weights = uniform_weights(teacher.config.vocab_size, tokenizer.all_special_ids)
        return CorruptedBatches(dataset, weights, tokenizer.mask_token_id, cfg.mlm_probability, corruptor, **common)
    # DistilBERT feeds both models the masked input when a term needs it (the registry's input kind)
    if not any(TERMS[term].input == MASKED_INPUT for term in objective.weights):
        return Batches(dataset, **common)
    if tokenizer.mask_token_id is None:
        raise UsageError("the tokenizer has no [MASK] token, which masked-LM terms need")
    counts = token_counts(dataset, max(len(tokenizer), teacher.config.vocab_size))
    weights = masking_weights(counts, tokenizer.all_special_ids, cfg.mask_smoothing)
    return MaskedLMBatches(dataset, weights, tokenizer.mask_token_id, len(tokenizer), cfg.mlm_probability, **common)
