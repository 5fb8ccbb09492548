"""Shared fixtures: tiny random models saved with save_pretrained, so tests go through from_pretrained."""

import os

# Before transformers/datasets are imported anywhere: never look anything up on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and spinning OpenMP threads of parallel
# test processes (the 2-process DDP test) would fight over 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# Weight-loading/-writing progress bars on stderr would make "one clear line" tests depend on
# whether an earlier test (a CLI call) already switched them off.
hf_logging.disable_progress_bar()

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    """A folder holding a small WordPiece tokenizer (vocab.txt + tokenizer files)."""
    return tiny.save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def bert_mlm_dir(tmp_path_factory, vocab_dir):
    return tiny.save_model("bert_mlm", tmp_path_factory.mktemp("bert_mlm"), vocab_dir)


@pytest.fixture(scope="session")
def bert_base_dir(tmp_path_factory, vocab_dir):
    return tiny.save_model("bert_base", tmp_path_factory.mktemp("bert_base"), vocab_dir)


@pytest.fixture(scope="session")
def distilbert_mlm_dir(tmp_path_factory, vocab_dir):
    return tiny.save_model("distilbert_mlm", tmp_path_factory.mktemp("distilbert_mlm"), vocab_dir)


@pytest.fixture(scope="session")
def electra_disc_dir(tmp_path_factory, vocab_dir):
    return tiny.save_model("electra_disc", tmp_path_factory.mktemp("electra_disc"), vocab_dir)


@pytest.fixture(scope="session")
def electra_gen_dir(tmp_path_factory, vocab_dir):
    return tiny.save_model("electra_gen", tmp_path_factory.mktemp("electra_gen"), vocab_dir)
