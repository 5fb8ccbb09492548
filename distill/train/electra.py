"""The ELECTRA path: a generator corrupts each batch; teacher and student discriminators judge the same input.

Corruption, as ELECTRA pre-training does it (Clark et al. 2020), redone for every chunk:

1. choose 15% (``mlm_probability``) of the chunk's real, non-special tokens, uniformly
   (:func:`distill.data.masking.mask_tokens` with flat weights, so never [CLS], [SEP], [PAD]
   or padding);
2. the generator's input: 85% of the chosen tokens become [MASK], 15% keep their token;
3. at every chosen position, sample a token from the generator's softmax (inverse CDF
   with one uniform per position drawn from the chunk's generator; special tokens are
   never sampled) and put it in place of the original;
4. ``replaced_labels`` is 1 exactly where the corrupted token differs from the original:
   a sample equal to the original counts as original, as in ELECTRA.

Steps 1-2 and the uniforms are data (:class:`distill.train.batches.CorruptedBatches`, all
randomness from ``chunk_generator(seed, step, chunk)``, so resume and DDP stay exact);
steps 3-4 are the generator's (:class:`GeneratorStep`). Run setup builds the generator
(:func:`setup_generator`), so the data layer owns no model: a frozen generator is handed
to the batches as a :class:`Corruptor` (no gradients, the run's autocast); a trained one
(``train_generator``) corrupts inside the training step (a submodule of
``distill.train.loop.StudentStep``), so its MLM loss backpropagates, is synchronised by DDP
and its weights go into the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from distill.common.errors import UsageError
from distill.data.masking import IGNORE_INDEX
from distill.models.families import FAMILIES
from distill.models.loading import (
    extract,
    load_config,
    load_model,
    role_from_architectures,
    role_of,
)
from distill.objective import losses
from distill.objective.terms import CORRUPTED_INPUT, select

GENERATOR_DIR = "generator"  # where a trained generator is saved, inside the output folder


# --- pure functions ---------------------------------------------------------------------------

def sampling_allowed(vocab_size: int, tokenizer_size: int, special_ids) -> Tensor:
    """Bool ``[vocab_size]``: ids the generator may put into the text (no special tokens, no unused rows)."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[:min(tokenizer_size, vocab_size)] = True
    for i in special_ids:
        if i is not None and 0 <= int(i) < vocab_size:
            allowed[int(i)] = False
    return allowed


def sample_tokens(logits: Tensor, uniforms: Tensor, allowed: Tensor | None = None) -> Tensor:
    """One draw per row from ``softmax(logits)``, by inverse CDF: row ``n`` takes the first id whose
    cumulative probability exceeds ``uniforms[n] * total``.

    ``logits``: ``[N, V]``; ``uniforms``: ``[N]`` in ``[0, 1)``; ``allowed``: bool ``[V]``
    (disallowed ids have probability 0 and are never drawn). Returns long ``[N]``.
    Deterministic given its inputs, so the randomness stays in the caller's generator.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if allowed is not None:
        probs = probs * allowed.to(probs.device)
    cdf = probs.double().cumsum(-1)
    target = (uniforms.to(cdf.device).double() * cdf[:, -1]).unsqueeze(-1)
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # u * total can round up to total: then take the last id of positive probability, never one past it
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(drawn, last)


def replace_tokens(generator_input_ids: Tensor, mlm_labels: Tensor, sampled: Tensor) -> tuple[Tensor, Tensor]:
    """Put ``sampled`` (``[N]``, in ``(mlm_labels != -100).nonzero()`` order) at the chosen positions.

    Returns ``(input_ids, replaced_labels)``, both long ``[B, S]``: the corrupted ids, and 1
    exactly where they differ from the original (``mlm_labels`` at chosen positions,
    ``generator_input_ids`` elsewhere).
    """
    chosen = mlm_labels != IGNORE_INDEX
    original = torch.where(chosen, mlm_labels, generator_input_ids)
    corrupted = original.clone()
    corrupted[chosen] = sampled.to(corrupted.dtype)
    return corrupted, (corrupted != original).long()


# --- the generator as a module ------------------------------------------------------------------

class GeneratorStep(nn.Module):
    """Run the generator on a masked chunk, sample the replacements, return the corrupted batch.

    Input batch: ``generator_input_ids``, ``attention_mask``, ``mlm_labels`` (original id at
    chosen positions, -100 elsewhere), ``sample_noise`` (uniforms ``[B, S]``). Output
    batch: ``input_ids`` (corrupted), ``attention_mask``, ``replaced_labels``, ``mlm_labels``.
    ``forward`` also returns the generator's MLM loss (nats per chosen token) when
    ``with_loss``: the term ``gen_mlm`` of a run with ``train_generator``.
    """

    def __init__(self, generator: nn.Module, allowed: Tensor, weight: float = 1.0):
        super().__init__()
        self.generator = generator
        self.weight = float(weight)
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, batch: Mapping, with_loss: bool = True) -> tuple[dict, Tensor | None]:
        ids, mask, labels = batch["generator_input_ids"], batch["attention_mask"], batch["mlm_labels"]
        chosen = labels != IGNORE_INDEX
        logits = extract(self.generator, ids, mask, positions=chosen).logits  # [N, V]
        sampled = sample_tokens(logits, batch["sample_noise"][chosen], self.allowed)
        corrupted, replaced = replace_tokens(ids, labels, sampled)
        out = {"input_ids": corrupted, "attention_mask": mask, "replaced_labels": replaced, "mlm_labels": labels}
        loss = losses.mlm_loss(logits, labels[chosen]) if with_loss else None
        return out, loss


# --- checks -----------------------------------------------------------------------------------

def _weighted(cfg, names) -> list[str]:
    weights = cfg.weights if isinstance(cfg.weights, Mapping) else {}
    return [n for n in names if isinstance(weights.get(n), (int, float)) and weights.get(n) > 0]


def check_recipe(cfg, teacher_config) -> None:
    """Config-level checks of an ELECTRA recipe, before any weight is loaded. No-op for other recipes.

    The teacher must be an ELECTRA discriminator when ``generator`` is set; ``rtd`` terms
    need a generator; the generator must be an ELECTRA masked LM with the teacher's vocabulary.
    """
    rtd = _weighted(cfg, select(input=CORRUPTED_INPUT))  # the terms that read a generator's corrupted input
    if not cfg.generator:
        if rtd:
            raise UsageError(
                f"term {rtd[0]!r} needs corrupted input: set generator to an ELECTRA generator "
                "(ElectraForMaskedLM, e.g. google/electra-base-generator); see student_configs/electra_base_4l.json")
        if cfg.train_generator:
            raise UsageError("train_generator is set but generator is not: give an ELECTRA generator, "
                             "or drop train_generator")
        return
    check_discriminator(teacher_config, cfg.teacher)
    if isinstance(cfg.generator_weight, bool) or not isinstance(cfg.generator_weight, (int, float)) \
            or not math.isfinite(cfg.generator_weight) or cfg.generator_weight < 0:
        raise UsageError(f"generator_weight={cfg.generator_weight!r} must be a finite number >= 0")
    check_generator(load_config(cfg.generator, "generator"), teacher_config, cfg.generator)


def check_discriminator(config_or_model, name: str = "the teacher") -> None:
    """One error unless this is an ELECTRA discriminator (``ElectraForPreTraining``)."""
    config = getattr(config_or_model, "config", config_or_model)
    family = _discriminator_family(config)
    if isinstance(config_or_model, nn.Module):
        is_disc = family is not None and _role(config_or_model) == "rtd"
        what = type(config_or_model).__name__
    else:
        arch = (getattr(config, "architectures", None) or [None])[0]
        is_disc = family is not None and (arch is None or family.role_of_class(arch) == "rtd")
        what = arch or f"{getattr(config, 'model_type', None)} model"
    if not is_disc:
        raise UsageError(
            f"an ELECTRA recipe (generator is set) distils an ELECTRA discriminator, but the teacher {name!r} is "
            f"{what}: use an ElectraForPreTraining teacher (e.g. google/electra-base-discriminator), or drop "
            "generator and the rtd terms for a masked-LM recipe")


def _discriminator_family(config):
    """The config's family when the registry gives it a replaced-token-detection head ("rtd"), else None."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    return family if family is not None and "rtd" in family.classes else None


def _role(model: nn.Module) -> str | None:
    try:
        return role_of(model)
    except UsageError:
        return None


def check_generator(gen_config, disc_config, name: str = "generator") -> None:
    """The generator must be an ELECTRA masked LM that shares the discriminator's vocabulary."""
    gen_type = getattr(gen_config, "model_type", None)
    arch = (getattr(gen_config, "architectures", None) or [None])[0]
    # a masked LM of a family with a discriminator head (ELECTRA: the generator is a masked LM of that family)
    if _discriminator_family(gen_config) is None or (arch is not None and role_from_architectures(gen_config) != "mlm"):
        raise UsageError(
            f"generator {name!r} is {arch or gen_type}, not an ELECTRA generator: give an ElectraForMaskedLM "
            "checkpoint (e.g. google/electra-base-generator)")
    vg, vd = getattr(gen_config, "vocab_size", None), getattr(disc_config, "vocab_size", None)
    if vg != vd:
        raise UsageError(
            f"the generator {name!r} has a vocabulary of {vg} ids and the discriminator (teacher) one of {vd}: "
            "the generator's samples must be the discriminator's tokens; use the generator trained with that "
            "discriminator (same tokenizer)")
    pg, pd = getattr(gen_config, "pad_token_id", None), getattr(disc_config, "pad_token_id", None)
    if pg != pd:
        raise UsageError(f"the generator {name!r} pads with id {pg} and the discriminator with {pd}: "
                         "they must share one tokenizer")


def _generator_tokenizer(path: str):
    """The generator's own tokenizer if it has one (a folder may hold weights only)."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").exists() \
            and not (Path(path) / "vocab.txt").exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


# --- run setup: the generator, and the corruptor the batches get --------------------------------------

class Corruptor:
    """A frozen generator as the batches see it: a masked chunk in, the corrupted chunk out.

    Runs :class:`GeneratorStep` without gradients under ``autocast`` (the run's
    ``precision.autocast``, so the generator's forward has the student's dtype).
    """

    def __init__(self, generator_step: GeneratorStep, autocast=contextlib.nullcontext):
        self.generator_step = generator_step
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, masked: Mapping) -> dict:
        with self.autocast():
            out, _ = self.generator_step(masked, with_loss=False)
        return out


def setup_generator(cfg, tokenizer, teacher, device: torch.device, precision=None
                    ) -> tuple[Corruptor | None, GeneratorStep | None]:
    """Load ``cfg.generator``, check it against the teacher and tokenizer, and put it where the run needs it.

    Returns ``(corruptor, trained)``: for a frozen generator a :class:`Corruptor` for the
    batches and None; with ``train_generator`` None and the :class:`GeneratorStep` the
    training step runs and the optimiser trains; ``(None, None)`` for other recipes.
    ``precision``: the run's, whose autocast the frozen generator runs under (None: none).
    """
    if not cfg.generator:
        return None, None
    check_discriminator(teacher, cfg.teacher)
    if tokenizer.mask_token_id is None:
        raise UsageError("the tokenizer has no [MASK] token, which the ELECTRA generator's input needs")
    generator = load_model(cfg.generator, role="mlm", what="generator")
    check_generator(generator.config, teacher.config, cfg.generator)
    gen_tokenizer = _generator_tokenizer(cfg.generator)
    if gen_tokenizer is not None:
        from distill.data.corpus import check_same_tokenizer

        check_same_tokenizer(tokenizer, gen_tokenizer, names=("teacher", "generator"))
    vocab = teacher.config.vocab_size
    if len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer)} ids but the models' vocabulary only {vocab}")
    allowed = sampling_allowed(vocab, len(tokenizer), tokenizer.all_special_ids)
    generator.to(device)
    if cfg.train_generator:
        generator.train()
    else:
        generator.eval().requires_grad_(False)
    step = GeneratorStep(generator, allowed, cfg.generator_weight).to(device)
    if cfg.train_generator:
        return None, step
    return Corruptor(step, precision.autocast if precision is not None else contextlib.nullcontext), None


def save_generator(out, generator_step: GeneratorStep, precision, tokenizer) -> str:
    """Save a trained generator (fp32) as a transformers folder ``OUT/generator``."""
    folder = Path(out) / GENERATOR_DIR
    export = precision.export_model(generator_step.generator)
    export.config.output_hidden_states = False
    export.config.output_attentions = False
    export.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
