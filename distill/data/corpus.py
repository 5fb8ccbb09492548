"""Corpus -> token blocks: read text, tokenise once, cache on disk, pack or group by length.

Sources (:func:`parse_source`):

- ``wikitext:<config>``: the wikitext hub dataset (``Salesforce/wikitext``), e.g.
  ``wikitext:wikitext-103-raw-v1`` or ``wikitext:wikitext-2-raw-v1``.
- ``hub:<dataset id>[:<config>]``: any hub dataset with a ``text`` column, e.g.
  ``hub:Salesforce/wikitext:wikitext-2-raw-v1``.
- either hub form may end in ``@<revision>`` (a branch, tag or commit), which is loaded
  and is part of the cache key; without one, the newest revision is loaded and the
  cache, keyed by id, config and split, is not rebuilt when the dataset changes.
- anything else is a local path: a file, a folder (its files, sorted) or a glob.
  A file that starts as MediaWiki XML (``<mediawiki ...>``, e.g. ``*.xml``,
  ``*.xml.bz2``) is a raw Wikipedia dump; ``*.raw`` / ``*.tokens`` is wikitext's own
  layout (``wiki.train.raw``); anything else is plain text with one document or
  paragraph per line. ``.bz2``, ``.gz`` and ``.xz`` files are read compressed.

Pipeline (all Arrow-backed, memory flat however big the corpus):
text rows (one paragraph each) -> token ids (``datasets.map``, batched, ``num_proc`` processes,
each batch split over the process's share of the cores as tokenizer threads)
-> cached under ``<cache_dir>/tokens-<key>/`` -> blocks, cached under
``<cache_dir>/blocks-<key>/``:

- ``pack`` (default): the token stream, in corpus order, each paragraph followed by
  ``[SEP]``, cut into blocks of exactly ``block_size`` tokens ``[CLS] t1 ... tn [SEP]``;
  no padding anywhere; the tail shorter than one block is dropped.
- ``group``: each paragraph on its own, split into pieces of at most ``block_size``
  tokens ``[CLS] ... [SEP]`` (no text is dropped); a ``length`` column lets
  :func:`length_grouped_order` batch similar lengths together.

The training loop builds each optimiser step's GLOBAL batch from
:func:`epoch_order` (or :func:`length_grouped_order`), takes its rank's slice and
calls :func:`collate`.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from distill.common.assets import WIKITEXT_HUB_ID
from distill.common.errors import UsageError
from distill.common.hardware import AUTO, resolve_num_proc, usable_cores

CACHE_VERSION = 1  # bump when the cached layout or the text cleaning changes
WIKITEXT_CONFIGS = ("wikitext-103-raw-v1", "wikitext-2-raw-v1", "wikitext-103-v1", "wikitext-2-v1")
MODES = ("pack", "group")
LOCKS_DIR = ".locks"  # under the cache dir: one lock file per cache entry ever built or checked
_READ_ROWS = 10_000  # rows per Arrow batch read while packing / grouping / counting
_SOURCE_HELP = (
    "give a text file, a wikitext wiki.train.raw, a MediaWiki .xml/.xml.bz2 dump, a folder or a glob of "
    "such files, or a hub dataset such as wikitext:wikitext-103-raw-v1"
)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class CorpusSource:
    """A parsed source spec: either a hub dataset or a sorted list of local files."""

    spec: str
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    revision: str | None = None  # a hub dataset's branch, tag or commit (``@<revision>``); None: its newest
    files: tuple[str, ...] = ()

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None

    @property
    def is_wikitext(self) -> bool:
        """Whether wikitext's cleaning applies: the wikitext hub dataset, or a local file in its layout."""
        if self.is_hub:
            return self.hub_id.rstrip("/").split("/")[-1].lower() == "wikitext"
        return any(file_format(f) == "wikitext" for f in self.files)

    def fingerprint(self) -> dict:
        """What the cache key depends on: the hub id, or each file's path, size and mtime."""
        if self.is_hub:
            key = {"hub": self.hub_id, "config": self.hub_config, "split": self.split}
            return key | ({"revision": self.revision} if self.revision else {})  # unpinned keys stay as they were
        files = []
        for f in self.files:
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        return {"files": files}


def parse_source(spec: str, split: str = "train") -> CorpusSource:
    """Turn a source spec (see the module docstring) into a :class:`CorpusSource`.

    Raises UsageError for an unknown wikitext config or a path that matches no file.
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise UsageError(f"corpus source {spec!r} is empty: {_SOURCE_HELP}")
    spec = str(spec).strip()
    revision = None
    if spec.startswith(("wikitext:", "hub:")) and "@" in spec:
        spec_body, _, revision = spec.rpartition("@")
        if not revision or "@" in spec_body:
            raise UsageError(f"corpus source {spec!r}: write one @<revision> (a branch, tag or commit) at the end")
    else:
        spec_body = spec
    if spec_body.startswith("wikitext:"):
        config = spec_body.split(":", 1)[1]
        if config not in WIKITEXT_CONFIGS:
            raise UsageError(
                f"unknown wikitext config {config!r} in {spec!r}: use one of {', '.join(WIKITEXT_CONFIGS)}"
            )
        return CorpusSource(spec, WIKITEXT_HUB_ID, config, split, revision=revision)
    if spec_body.startswith("hub:"):
        rest = spec_body[4:]
        hub_id, _, config = rest.partition(":")
        if not hub_id:
            raise UsageError(f"corpus source {spec!r} names no dataset: write hub:<dataset id>[:<config>]")
        return CorpusSource(spec, hub_id, config or None, split, revision=revision)
    return CorpusSource(spec, files=tuple(_resolve_files(spec)))


def _resolve_files(spec: str) -> list[str]:
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UsageError(f"corpus folder {spec!r} holds no files: {_SOURCE_HELP}")
        return files
    if glob.has_magic(spec):
        files = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
        if not files:
            raise UsageError(f"corpus glob {spec!r} matches no file: {_SOURCE_HELP}")
        return files
    raise UsageError(f"corpus path {spec!r} does not exist: {_SOURCE_HELP}")


def file_format(path: str) -> str:
    """``"mediawiki"``, ``"wikitext"`` or ``"text"`` for one local file.

    A file whose (decompressed) start holds ``<mediawiki`` is a MediaWiki dump, whatever
    its name (Wikipedia's own names end in ``-shortened.bz2``, ``.xml-p10p30302.bz2``...);
    otherwise ``*.raw`` / ``*.tokens`` (compression suffix aside) is wikitext's layout and
    anything else plain text.
    """
    try:
        with _open_binary(path) as f:
            head = f.read(4096)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise UsageError(f"corpus file {path!r} cannot be read: {err}") from None
    if b"<mediawiki" in head:
        return "mediawiki"
    name = os.path.basename(path).lower()
    for suffix in (".bz2", ".gz", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(".raw") or name.endswith(".tokens"):
        return "wikitext"
    return "text"


def _open_binary(path: str):
    lower = path.lower()
    if lower.endswith(".bz2"):
        return bz2.open(path, "rb")
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _iter_lines(path: str) -> Iterator[str]:
    with _open_binary(path) as raw:
        for number, line in enumerate(raw, 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UsageError(
                    f"{path}: line {number} is not UTF-8 ({err.reason}): convert the file to UTF-8"
                ) from None


# --------------------------------------------------------------------------- cleaning: wikitext layout

_WIKITEXT_HEADING = re.compile(r"(= )+.*?( =)+")
_WIKITEXT_JOINERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def clean_wikitext_line(line: str, unk: str = "[UNK]") -> str | None:
    """One line of wikitext's layout (``wiki.train.raw`` or the hub's ``text`` column) -> a paragraph or None.

    Empty lines and headings (`` = Title = ``, `` = = Sub = = ``) give None. wikitext's
    split markers are joined back (``1 @,@ 000`` -> ``1,000``, ``well @-@ known`` ->
    ``well-known``) so the tokenizer sees ordinary text, and the ``<unk>`` of the
    non-raw configs becomes ``unk``: the tokenizer's own unknown token (``[UNK]`` for
    BERT's WordPiece, which would cut ``<unk>`` into four pieces; ``<unk>`` itself for
    RoBERTa's), so the placeholder stays one unknown token.
    """
    text = line.strip()
    if not text or _WIKITEXT_HEADING.fullmatch(text):
        return None
    for marker, joined in _WIKITEXT_JOINERS:
        text = text.replace(marker, joined)
    return text.replace("<unk>", unk)


def _clean_wikitext_batch(texts: list[str], unk: str = "[UNK]") -> dict:
    kept = []
    for line in texts:
        text = clean_wikitext_line(line, unk)
        if text is not None:
            kept.append(text)
    return {"text": kept}


def _clean_lines_batch(texts: list[str]) -> dict:
    """Any other hub dataset's ``text`` column: each row stripped, empty rows dropped (nothing else touched)."""
    return {"text": [t.strip() for t in texts if t and t.strip()]}


# --------------------------------------------------------------------------- cleaning: MediaWiki dumps

# Tags whose contents are not running prose (references, tables, formulas, galleries...).
_DROP_TAGS = frozenset(
    "ref references table gallery timeline math chem ce imagemap score graph syntaxhighlight source pre "
    "templatedata inputbox categorytree section hiero mapframe maplink ul ol dl".split()
)
_LIST_ITEM_TAGS = frozenset(("li", "dt", "dd"))
_DROP_LINK_NAMESPACES = frozenset(("file", "image", "category", "media"))
_INTERWIKI_PREFIX = re.compile(r"[a-z][a-z-]*")
_LINE_DROP = "\x00"  # marks a rendered line to drop (list items)
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_REDIRECT = re.compile(r"\s*#redirect", re.IGNORECASE)
# References go before parsing: unbalanced '' inside a <ref> makes the parser keep the whole
# ref as literal text. Tags left literal for the same reason go after rendering.
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_STRAY_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")


def _render_wikicode(code, out: list[str]) -> None:
    """Append the visible prose of ``code`` to ``out``: strip_code's rules, with more left out.

    Like mwparserfromhell's ``strip_code`` (templates, comments and markup go, links
    keep their text, entities are decoded), and also drops what is not prose:
    references, tables, galleries, formulas, headings, list items, file/category and
    interlanguage links, bare URLs.
    """
    from mwparserfromhell.definitions import is_visible
    from mwparserfromhell.nodes import (
        ExternalLink,
        Heading,
        HTMLEntity,
        Tag,
        Text,
        Wikilink,
    )

    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            leading_colon = title.startswith(":")
            bare = title.lstrip(":")
            prefix = bare.split(":", 1)[0].strip().lower() if ":" in bare else ""
            if not leading_colon and prefix in _DROP_LINK_NAMESPACES:
                continue
            if node.text is not None:
                _render_wikicode(node.text, out)
            elif not leading_colon and prefix and _INTERWIKI_PREFIX.fullmatch(prefix):
                continue  # [[de:Anarchismus]], [[wikt:word]]: links to other wikis
            else:
                _render_wikicode(node.title, out)
        elif isinstance(node, ExternalLink):
            if node.brackets and node.title is not None:
                _render_wikicode(node.title, out)
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in _LIST_ITEM_TAGS:
                if node.wiki_markup:
                    out.append(_LINE_DROP)
            elif tag == "br":
                out.append(" ")
            elif tag in _DROP_TAGS or not is_visible(tag):
                continue
            elif node.contents is not None:
                _render_wikicode(node.contents, out)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Heading):
            continue
        # Template, Comment, Argument and anything else: no visible prose


def wikicode_to_paragraphs(markup: str) -> list[str]:
    """MediaWiki markup of one article -> its prose paragraphs, markup-free, in order."""
    import mwparserfromhell

    out: list[str] = []
    _render_wikicode(mwparserfromhell.parse(_REF.sub("", markup)), out)
    paragraphs = []
    for line in "".join(out).split("\n"):
        if _LINE_DROP in line:
            continue
        line = _STRAY_TAG.sub("", _BOLD_ITALIC.sub("", line))
        line = _MAGIC_WORD.sub("", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _SPACES.sub(" ", line).strip()
        if not line or line[0] in "|!{}[" or not any(c.isalpha() for c in line):
            continue  # table-markup leftovers and lines without words
        paragraphs.append(line)
    return paragraphs


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_mediawiki_articles(path: str) -> Iterator[tuple[str, str]]:
    """Stream ``(title, markup)`` of the articles in a MediaWiki XML dump (.xml or .xml.bz2/.gz/.xz).

    Redirects and pages outside the article namespace (talk, user, Wikipedia...) are
    skipped. Memory stays flat: each page is freed once read.
    """
    ns_names: set[str] = set()
    root = None
    try:
        with _open_binary(path) as f:
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem
                if event != "end":
                    continue
                tag = _local(elem.tag)
                if tag == "namespace" and elem.get("key") not in (None, "0") and elem.text:
                    ns_names.add(elem.text.strip().lower())
                elif tag == "page":
                    title = elem.findtext("{*}title") or ""
                    ns = elem.findtext("{*}ns")
                    text = elem.findtext("{*}revision/{*}text") or ""
                    redirect = elem.find("{*}redirect") is not None or _REDIRECT.match(text) is not None
                    if ns is None:  # very old dumps: no <ns>, the title's prefix tells
                        prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
                        article = prefix not in ns_names
                    else:
                        article = ns.strip() == "0"
                    if article and not redirect and text.strip():
                        yield title, text
                    root.clear()  # drop the finished page (and its siblings) from the tree
    except ET.ParseError as err:
        raise UsageError(f"{path} is not a readable MediaWiki XML dump: {err}") from None
    except (OSError, EOFError) as err:
        raise UsageError(f"{path} could not be read as a MediaWiki dump: {err}") from None


# --------------------------------------------------------------------------- documents


def iter_documents(path: str, fmt: str | None = None, unk: str = "[UNK]") -> Iterator[list[str]]:
    """Documents of one local file, each a list of clean paragraphs (never empty).

    text: one document per non-empty line. wikitext: one per line that
    :func:`clean_wikitext_line` keeps (its ``<unk>`` becoming ``unk``). mediawiki: one per
    article, split into paragraphs.
    """
    fmt = fmt or file_format(path)
    if fmt == "mediawiki":
        from mwparserfromhell.parser import ParserError

        for _title, markup in iter_mediawiki_articles(path):
            try:
                paragraphs = wikicode_to_paragraphs(markup)
            except ParserError:  # pathological markup in one article must not stop a dump of millions
                continue
            if paragraphs:
                yield paragraphs
    elif fmt == "wikitext":
        for line in _iter_lines(path):
            text = clean_wikitext_line(line, unk)
            if text is not None:
                yield [text]
    elif fmt == "text":
        for line in _iter_lines(path):
            text = line.strip()
            if text:
                yield [text]
    else:
        raise UsageError(f"unknown corpus format {fmt!r}: use mediawiki, wikitext or text")


def iter_paragraphs(files: Sequence[str], max_documents: int | None = None, unk: str = "[UNK]") -> Iterator[str]:
    """Clean paragraphs of ``files`` in order; at most ``max_documents`` documents."""
    if max_documents is not None and max_documents <= 0:
        return
    seen = 0
    for path in files:
        for doc in iter_documents(path, unk=unk):
            yield from doc
            seen += 1
            if max_documents is not None and seen >= max_documents:
                return  # before the next document is read (and, for a dump, parsed)


def _generate_text_rows(files: list[str], max_documents: int | None = None, unk: str = "[UNK]"):
    for text in iter_paragraphs(files, max_documents, unk):
        yield {"text": text}


# --------------------------------------------------------------------------- tokenisation and the cache


def _backend(tokenizer):
    """A copy of the fast tokenizer's Rust backend with truncation and padding off.

    tokenizer.json files often carry ``truncation: max_length 128`` (all-MiniLM-L6-v2
    does): a whole paragraph must be tokenised, so those settings are removed.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: load one with a tokenizer.json "
            "(AutoTokenizer.from_pretrained(folder))"
        )
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads) -> pool; a forked worker makes its own


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="distill-tokenize")
    return _POOLS[key]


def _tokenize_batch(texts: list[str], backend, threads: int = 1) -> dict:
    """One ``datasets.map`` batch: paragraphs -> token ids without special tokens.

    With ``threads`` > 1 the batch is cut into that many contiguous slices encoded at
    once: the Rust tokenizer releases the GIL, so the cores work even where
    ``TOKENIZERS_PARALLELISM=false`` turns its own parallelism off (users set it to
    silence the fork warning, and that made this step single-core). Order is kept.
    """
    def encode(part):
        return [enc.ids for enc in backend.encode_batch_fast(part, add_special_tokens=False)]

    if threads <= 1 or len(texts) < 2 * threads:
        return {"ids": encode(texts)}
    step = -(-len(texts) // threads)
    parts = _thread_pool(threads).map(encode, [texts[i:i + step] for i in range(0, len(texts), step)])
    return {"ids": [ids for part in parts for ids in part]}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _special_id(tokenizer, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise UsageError(f"the tokenizer has no {name} token: blocks open and close with the cls and sep tokens "
                         "([CLS]/[SEP], <s>/</s>); use the tokenizer the model was trained with")
    return int(value)


def _unwrap_usage_error(err: BaseException) -> UsageError | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, UsageError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _open_lock(path: Path) -> int | None:
    """A descriptor of the lock file ``path`` (created if need be), or None where locks cannot be had: no
    ``fcntl`` (not POSIX), or a cache folder this user may not write to and that holds no lock file yet.
    Opened for writing where it may be (NFS emulates ``flock`` with write locks, which need it), else
    read-only (a local ``flock`` needs no more), so a cache shared between users locks for all of them."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - POSIX everywhere this runs
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY | os.O_CREAT):
        try:
            return os.open(path, flags, 0o666)
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _cache_lock(cache_dir: Path, name: str):
    """Hold ``<cache_dir>/.locks/<name>.lock`` (an exclusive ``flock``; the files stay, as flock needs) while
    one cache entry is checked again, rebuilt and published: a second process (another run on the same
    cache) waits, then finds the entry whole. Without it, two processes that both found an entry damaged
    could delete the one the other had just rebuilt. Where no lock can be had (see :func:`_open_lock`, or
    a file system without ``flock``) the entry is built without one, as before locks existed."""
    fd = _open_lock(cache_dir / LOCKS_DIR / f"{name}.lock")
    problem = None
    if fd is not None:
        import fcntl  # there: _open_lock gives a descriptor only where fcntl imports

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: another process is building corpus cache {cache_dir / name}: waiting for it",
                  file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # e.g. Lustre mounted without flock, some FUSE and NFS setups
            problem = err.strerror or str(err)
    if problem is not None:
        print(f"note: corpus cache {cache_dir}: this file system gives no file locks ({problem}); building "
              f"{name} without one", file=sys.stderr)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases its lock


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place in one rename; a concurrent twin's result wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def _write_meta(folder: Path, meta: dict) -> None:
    """meta.json, with each data file's size and sha256 (checked before the cache is read); everything synced
    to disk first, so a crash after the rename cannot leave a cache of empty files that looks whole."""
    sums = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "meta.json"):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            sums[path.name] = {"size": os.fstat(f.fileno()).st_size, "sha256": digest}
            os.fsync(f.fileno())
    with open(folder / "meta.json", "w", encoding="utf-8") as f:
        f.write(json.dumps({**meta, "checksums": sums}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _cache_problem(folder: Path, meta: dict, contents: bool) -> str | None:
    """None when every file meta.json lists has its size (and, with ``contents``, its sha256), else what is wrong.

    A cache written before checksums were recorded is checked for its files only.
    """
    names = meta.get("checksums") or {name: None for name in meta.get("files", ["blocks.arrow"])}
    for name, want in names.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if want is None:
            continue
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, meta.json says {want['size']}"
        if contents:
            with open(path, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != want["sha256"]:
                    return f"{name} does not match the sha256 in meta.json"
    return None


def _whole_meta(folder: Path, contents: bool, repair: bool = True) -> dict | None:
    """The cache's meta.json if the cache is whole, else None. A damaged one is never read; with ``repair``
    (only under the entry's lock) it is reported in one line and removed, and the caller rebuilds it."""
    meta = _read_meta(folder)
    problem = "its meta.json is missing or unreadable" if meta is None else _cache_problem(folder, meta, contents)
    if problem is None or not folder.exists():
        return meta
    if not repair:
        return None
    print(f"note: corpus cache {folder} is damaged ({problem}): rebuilding it", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _open_arrow_files(folder: Path, names: Sequence[str]):
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(folder / name)) for name in names]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _no_text_error(source: CorpusSource) -> UsageError:
    return UsageError(f"corpus {source.spec!r} yielded no text: after cleaning, every line was empty (or a "
                      "heading, redirect or non-article page); check the path and the file format")


def _load_text_dataset(source: CorpusSource, workdir: Path, num_proc, max_documents: int | None,
                       unk: str = "[UNK]"):
    """An Arrow dataset with one ``text`` row per clean paragraph (nothing held in RAM); ``unk`` replaces
    wikitext's ``<unk>``. A hub dataset gets wikitext's cleaning only if it is wikitext.

    ``num_proc``: processes, or ``"auto"`` (hardware.resolve_num_proc: from the hub
    split's rows, or the local files' bytes)."""
    import datasets
    from datasets import Features, Value

    if source.is_hub:
        try:
            ds = datasets.load_dataset(source.hub_id, source.hub_config, split=source.split, revision=source.revision)
        except Exception as err:  # offline, unknown id or config: one line for the user
            raise UsageError(
                f"could not load hub dataset {source.hub_id!r} (config {source.hub_config!r}, split "
                f"{source.split!r}, revision {source.revision or 'newest'!r}): {type(err).__name__}: {err}. "
                "Offline, give a local path instead"
            ) from err
        if "text" not in ds.column_names:
            raise UsageError(f"hub dataset {source.hub_id!r} has no 'text' column (it has {ds.column_names})")
        num_proc = resolve_num_proc(num_proc, num_rows=len(ds))
        wikitext = source.is_wikitext
        ds = ds.map(
            _clean_wikitext_batch if wikitext else _clean_lines_batch, batched=True, input_columns="text",
            fn_kwargs={"unk": unk} if wikitext else None, remove_columns=ds.column_names,
            num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(workdir / "text.arrow"),
            new_fingerprint=_sha(["text", source.fingerprint(), unk if wikitext else None]),
            features=Features({"text": Value("string")}),
            desc="cleaning wikitext lines" if wikitext else "dropping empty lines",
        )
        if max_documents is not None and len(ds) > max_documents:
            ds = ds.select(range(max_documents)).flatten_indices(cache_file_name=str(workdir / "text-head.arrow"))
        return ds

    files = list(source.files)
    if next(iter_paragraphs(files, max_documents, unk), None) is None:  # datasets cannot build an empty split
        raise _no_text_error(source)
    num_proc = resolve_num_proc(num_proc, num_bytes=sum(os.path.getsize(f) for f in files))
    gen_procs = 1 if max_documents is not None else max(1, min(num_proc, len(files)))
    try:
        if gen_procs == 1:  # in this process: straight to Arrow, without the builder machinery (a second of imports)
            return _write_text_rows(files, max_documents, workdir / "text.arrow", unk)
        return datasets.Dataset.from_generator(
            _generate_text_rows, features=Features({"text": Value("string")}), cache_dir=str(workdir / "gen"),
            gen_kwargs={"files": files, "max_documents": max_documents, "unk": unk},
            num_proc=gen_procs if gen_procs > 1 else None,
            fingerprint=_sha(["gen", source.fingerprint(), max_documents, unk]),
        )
    except Exception as err:
        usage = _unwrap_usage_error(err)
        if usage is not None:
            raise usage from None
        raise


def _write_text_rows(files: list[str], max_documents: int | None, path: Path, unk: str = "[UNK]"):
    """The clean paragraphs of ``files`` as a one-column Arrow file, written ``_READ_ROWS`` rows at a time."""
    from datasets import Dataset

    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        rows: list[str] = []
        for row in _generate_text_rows(files, max_documents, unk):
            rows.append(row["text"])
            if len(rows) == _READ_ROWS:
                writer.write_batch(pa.record_batch([pa.array(rows, pa.string())], schema=schema))
                rows = []
        if rows:
            writer.write_batch(pa.record_batch([pa.array(rows, pa.string())], schema=schema))
    return Dataset.from_file(str(path))


def tokenized_corpus(source, tokenizer, cache_dir, num_proc="auto", max_documents: int | None = None,
                     split: str = "train", verify_contents: bool = True):
    """The corpus tokenised once: a Dataset with an ``ids`` column (one row per paragraph, no specials).

    ``num_proc``: ``datasets.map`` processes, or ``"auto"`` (:func:`distill.common.hardware.resolve_num_proc`:
    this process for small corpora, one per usable core for large ones); either way each
    process tokenises with threads over its share of the usable cores. The result does
    not depend on it.

    Cached under ``<cache_dir>/tokens-<key>/``, key = corpus (files with size and mtime,
    or hub id/config/split and a pinned revision) + tokenizer (its tokenizer.json) + ``max_documents``
    (see :func:`tokens_key_payload`). A cache whose files do not match the sizes (and, with
    ``verify_contents``, the sha256) in its meta.json is reported in one line and rebuilt, by one process
    at a time (:func:`_cache_lock`).
    """
    src = source if isinstance(source, CorpusSource) else parse_source(source, split)
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise UsageError(f"max_documents {max_documents!r} must be a positive integer (or None for all)")
    if num_proc != AUTO:
        num_proc = max(1, int(num_proc or 1))
    backend = _backend(tokenizer)
    tok_hash = hashlib.sha256(backend.to_str().encode()).hexdigest()[:20]
    unk = getattr(tokenizer, "unk_token", None) or "<unk>"  # no unknown token: wikitext's placeholder kept as text
    key_payload = tokens_key_payload(src, tok_hash, max_documents, unk)
    key = _sha(key_payload)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tokens-{key}"
    meta = _whole_meta(final, contents=verify_contents, repair=False)  # whole: read, no lock needed
    if meta is None:
        with _cache_lock(cache_dir, f"tokens-{key}"):  # checked again, rebuilt, published: one process at a time
            meta = _whole_meta(final, contents=verify_contents)
            if meta is None:
                _build_tokens(src, tokenizer, backend, key_payload, final, num_proc, max_documents, unk)
                meta = _read_meta(final)
    return _open_arrow_files(final, meta["files"])


def tokens_key_payload(src: CorpusSource, tok_hash: str, max_documents: int | None, unk: str) -> dict:
    """What a tokenised corpus is keyed by: the source, the tokenizer, ``max_documents``, and what changes the
    text beyond those: a hub dataset that is not wikitext (stripped lines, not wikitext's cleaning) and a
    wikitext ``<unk>`` written other than ``[UNK]``. Keys of the sources that had caches before those two
    were told apart (wikitext for a BERT-style tokenizer, local text) are what they were, so their caches stay."""
    payload = {"v": CACHE_VERSION, "source": src.fingerprint(), "tokenizer": tok_hash, "max_documents": max_documents}
    if src.is_hub and not src.is_wikitext:
        payload["cleaning"] = "lines"
    if unk != "[UNK]" and src.is_wikitext:  # (checked in this order: is_wikitext reads each local file's head)
        payload["unk"] = unk
    return payload


def _build_tokens(src: CorpusSource, tokenizer, backend, key_payload: dict, final: Path, num_proc,
                  max_documents: int | None, unk: str) -> None:
    """Tokenise ``src`` into a temporary folder beside ``final``, then publish it there in one rename."""
    from datasets import Features, List, Value

    key, cache_dir = final.name.split("-", 1)[1], final.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tokens-{key}.tmp-"))
    try:
        started = time.time()
        text = _load_text_dataset(src, tmp, num_proc, max_documents, unk)
        if len(text) == 0:
            raise _no_text_error(src)
        procs = resolve_num_proc(num_proc, num_rows=len(text))
        threads = max(1, usable_cores() // procs)  # each process's share of the cores
        tokens = text.map(
            _tokenize_batch, batched=True, batch_size=1000, input_columns="text", remove_columns=["text"],
            fn_kwargs={"backend": backend, "threads": threads}, num_proc=procs if procs > 1 else None,
            cache_file_name=str(tmp / "tokens.arrow"), new_fingerprint=key,
            features=Features({"ids": List(Value("int32"))}), desc="tokenising",
        )
        files = sorted(os.path.basename(f["filename"]) for f in tokens.cache_files)
        num_rows, num_tokens = len(tokens), _count_tokens(tokens)
        del tokens, text
        for leftover in tmp.iterdir():  # the text rows and datasets' builder files: not needed again
            if leftover.name not in files:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        meta = {**key_payload, "kind": "tokens", "spec": src.spec,
                "tokenizer_name": getattr(tokenizer, "name_or_path", ""), "files": files,
                "num_rows": num_rows, "num_tokens": num_tokens, "seconds": round(time.time() - started, 2),
                "num_proc": procs, "threads_per_process": threads}
        _write_meta(tmp, meta)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _count_tokens(dataset) -> int:
    total = 0
    for column in _iter_list_column(dataset, dataset.column_names[0]):
        total += len(column.flatten())
    return total


def _iter_list_column(dataset, name: str) -> Iterator[pa.ListArray]:
    """The list column ``name`` as Arrow ListArrays, batch by batch (respects selections)."""
    for table in dataset.with_format("arrow").iter(batch_size=_READ_ROWS):
        for chunk in table.column(name).chunks:
            yield chunk


# --------------------------------------------------------------------------- blocks


_BLOCK_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
_GROUP_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32, copy=False)))


def _write_packed(tokens, path: Path, block_size: int, cls_id: int, sep_id: int) -> dict:
    """Cut the token stream into ``[CLS] + (block_size - 2) tokens + [SEP]`` blocks; carry the rest over.

    Each paragraph in the stream ends with ``[SEP]`` (``</s>``), as Hugging Face's run_mlm and RoBERTa's
    FULL-SENTENCES packing mark where one text ends and the next, unrelated, begins."""
    inner = block_size - 2
    carry = np.empty(0, dtype=np.int32)
    blocks = separators = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _BLOCK_SCHEMA) as writer:
        for chunk in _iter_list_column(tokens, "ids"):
            values = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            doc_len = np.diff(chunk.offsets.to_numpy().astype(np.int64))
            doc_len = doc_len[doc_len > 0]  # a paragraph the tokenizer emptied gets no separator of its own
            ends = np.cumsum(doc_len)  # each paragraph's end in the stream of its tokens
            stream = np.insert(values, ends, sep_id)  # one [SEP] after each paragraph's tokens
            separators += len(ends)
            flat = np.concatenate([carry, stream])
            n = len(flat) // inner
            carry = flat[n * inner:].copy()
            if n == 0:
                continue
            out = np.empty((n, block_size), dtype=np.int32)
            out[:, 0] = cls_id
            out[:, -1] = sep_id
            out[:, 1:-1] = flat[: n * inner].reshape(n, inner)
            offsets = np.arange(n + 1, dtype=np.int64) * block_size
            writer.write_batch(pa.record_batch([_list_array(out.ravel(), offsets)], schema=_BLOCK_SCHEMA))
            blocks += n
    return {"num_rows": blocks, "dropped_tail_tokens": int(len(carry)), "padding_tokens": 0,
            "paragraph_separators": int(separators)}


def _write_grouped(tokens, path: Path, block_size: int, cls_id: int, sep_id: int) -> dict:
    """Each paragraph in pieces of at most ``block_size - 2`` tokens, each wrapped in [CLS] ... [SEP]."""
    inner = block_size - 2
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _GROUP_SCHEMA) as writer:
        for chunk in _iter_list_column(tokens, "ids"):
            flat = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            offsets = chunk.offsets.to_numpy().astype(np.int64)
            doc_len = np.diff(offsets)
            pieces = -(-doc_len // inner)  # ceil; an empty paragraph gives no piece
            if pieces.sum() == 0:
                continue
            piece_doc = np.repeat(np.arange(len(doc_len)), pieces)
            first_piece = np.cumsum(pieces) - pieces
            piece_rank = np.arange(len(piece_doc)) - first_piece[piece_doc]
            piece_len = np.minimum(inner, doc_len[piece_doc] - piece_rank * inner)
            # the pieces tile the token stream in order: token t lies in piece piece_of_token[t]
            piece_of_token = np.repeat(np.arange(len(piece_len)), piece_len)
            out_len = piece_len + 2
            out_off = np.concatenate([[0], np.cumsum(out_len)])
            out = np.empty(out_off[-1], dtype=np.int32)
            out[out_off[:-1]] = cls_id
            out[out_off[1:] - 1] = sep_id
            out[np.arange(len(flat)) + 2 * piece_of_token + 1] = flat
            columns = [_list_array(out, out_off), pa.array(out_len.astype(np.int32))]
            writer.write_batch(pa.record_batch(columns, schema=_GROUP_SCHEMA))
            rows += len(piece_len)
    return {"num_rows": rows, "dropped_tail_tokens": 0}


def load_corpus_blocks(source, tokenizer, block_size: int, cache_dir, mode: str = "pack", num_proc="auto",
                       max_documents: int | None = None, split: str = "train"):
    """The single entry point: corpus -> cached ``datasets.Dataset`` of training sequences.

    ``source``: a spec (see module docstring). ``mode``: ``"pack"`` (``input_ids`` rows of
    exactly ``block_size`` tokens, ``[CLS] ... [SEP]``, no padding) or ``"group"``
    (``input_ids`` of at most ``block_size`` tokens, one paragraph piece each, plus
    ``length``). ``max_documents`` keeps the first N documents (lines of text/wikitext
    files, articles of MediaWiki dumps). ``split`` applies to hub datasets.

    Tokenisation runs once per corpus and tokenizer (``tokens-<key>``); blocks once per
    block settings as well (``blocks-<key>``); a later call with the same settings only
    memory-maps the cached Arrow file.
    """
    if mode not in MODES:
        raise UsageError(f"data mode {mode!r} is unknown: use 'pack' (fixed blocks) or 'group' (by length)")
    _check_block_holds_a_token(block_size)
    src = parse_source(source, split)
    cls_id, sep_id = _special_id(tokenizer, "cls"), _special_id(tokenizer, "sep")
    # the token files' sizes are checked here, their contents only when blocks are built from them
    tokens = tokenized_corpus(src, tokenizer, cache_dir, num_proc=num_proc, max_documents=max_documents,
                              verify_contents=False)
    tokens_dir = Path(tokens.cache_files[0]["filename"]).parent
    tokens_key = tokens_dir.name.split("-", 1)[1]
    payload = {"v": CACHE_VERSION, "tokens": tokens_key, "block_size": block_size, "mode": mode,
               "cls": cls_id, "sep": sep_id}
    if mode == "pack":
        payload["paragraph_end"] = "sep"  # blocks packed before paragraphs ended with [SEP] are not reused
    key = _sha(payload)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"blocks-{key}"
    if _whole_meta(final, contents=True, repair=False) is not None:  # whole: read, no lock needed
        return _open_arrow_files(final, ["blocks.arrow"])
    with _cache_lock(cache_dir, f"blocks-{key}"):  # checked again, rebuilt, published: one process at a time
        if _whole_meta(final, contents=True) is None:
            # the tokens' contents checked now, under their own lock: damaged, they are rebuilt
            tokens = tokenized_corpus(src, tokenizer, cache_dir, num_proc=num_proc, max_documents=max_documents)
            tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".blocks-{key}.tmp-"))
            try:
                started = time.time()
                write = _write_packed if mode == "pack" else _write_grouped
                stats = write(tokens, tmp / "blocks.arrow", block_size, cls_id, sep_id)
                if stats["num_rows"] == 0:
                    total = _read_meta(tokens_dir)["num_tokens"]
                    raise UsageError(
                        f"corpus {src.spec!r} has {total} tokens, fewer than one block of {block_size} "
                        f"({block_size - 2} between [CLS] and [SEP]): add text or lower block_size"
                    )
                meta = {**payload, "kind": "blocks", "spec": src.spec, "tokens_dir": tokens_dir.name, **stats,
                        "seconds": round(time.time() - started, 2)}
                _write_meta(tmp, meta)
                _publish(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return _open_arrow_files(final, ["blocks.arrow"])


def sequence_lengths(dataset) -> np.ndarray:
    """Length of every row's ``input_ids`` (int64 ``[N]``); reads the ``length`` column when present."""
    if "length" in dataset.column_names:
        parts = [t.column("length").to_numpy() for t in dataset.with_format("arrow").iter(batch_size=_READ_ROWS)]
    else:
        parts = [np.diff(c.offsets.to_numpy()) for c in _iter_list_column(dataset, "input_ids")]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- token counts


def token_counts(dataset, vocab_size: int) -> np.ndarray:
    """How often each id occurs in ``dataset['input_ids']``: int64 ``[vocab_size]``.

    Counted in Arrow batches with ``np.bincount``. For a dataset returned by
    :func:`load_corpus_blocks` (not a selection of it) the result is cached beside the
    blocks as ``token_counts-<vocab_size>.npy``.
    """
    if vocab_size < 1:
        raise UsageError(f"vocab_size {vocab_size} must be positive")
    cache = None
    files = dataset.cache_files
    if dataset._indices is None and len(files) == 1:  # a contiguous select() is a slice: compare sizes too
        folder = Path(files[0]["filename"]).parent
        meta = _read_meta(folder) or {}
        if meta.get("kind") == "blocks" and meta.get("num_rows") == len(dataset):
            cache = folder / f"token_counts-{vocab_size}.npy"
    if cache is not None and cache.is_file():
        try:
            counts = np.load(cache)  # allow_pickle stays False: a count file holds numbers only
            if counts.shape == (vocab_size,) and counts.dtype == np.int64:
                return counts
            problem = f"shape {counts.shape} of {counts.dtype}, not ({vocab_size},) int64"
        except (OSError, ValueError, EOFError) as err:
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"note: token count cache {cache} is damaged ({problem}): counting again", file=sys.stderr)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in _iter_list_column(dataset, "input_ids"):
        ids = chunk.flatten().to_numpy(zero_copy_only=False)
        if len(ids) == 0:
            continue
        if int(ids.max()) >= vocab_size:
            raise UsageError(f"token id {int(ids.max())} is outside vocab_size {vocab_size}: "
                             "the corpus was tokenised with a different tokenizer")
        counts += np.bincount(ids, minlength=vocab_size)
    if cache is not None:
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, counts)
        os.replace(tmp, cache)
    return counts


# --------------------------------------------------------------------------- checks


def _check_block_holds_a_token(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 3:
        raise UsageError(f"block_size {block_size!r} is too small: a block holds [CLS], at least one token and "
                         "[SEP]; use e.g. 128 or 512")


def check_block_size(block_size: int, max_position_embeddings: int) -> None:
    """A block must fit the model's position embeddings (and hold [CLS] x [SEP])."""
    _check_block_holds_a_token(block_size)
    if block_size > max_position_embeddings:
        raise UsageError(
            f"block_size {block_size} is larger than the model's position limit "
            f"(max_position_embeddings = {max_position_embeddings}): use block_size <= {max_position_embeddings}"
        )


_PROBE_TEXT = "Héllo WORLD, it's 1,234.5 km² — naïve café 東京 @user #tag"


def check_same_tokenizer(tok_a, tok_b, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Teacher and student must share one tokenizer: same size, special ids, vocabulary and splitting."""
    a, b = names
    if len(tok_a) != len(tok_b):
        raise UsageError(
            f"the {a} tokenizer has {len(tok_a)} ids and the {b} tokenizer {len(tok_b)}: distillation needs one "
            f"shared tokenizer; copy the {a}'s tokenizer files into the {b} folder"
        )
    for special in ("cls", "sep", "pad", "mask", "unk"):
        ia, ib = getattr(tok_a, f"{special}_token_id", None), getattr(tok_b, f"{special}_token_id", None)
        if ia != ib:
            raise UsageError(
                f"the {a} and {b} tokenizers give [{special.upper()}] different ids ({ia} vs {ib}): "
                f"use the {a}'s tokenizer for the {b}"
            )
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[0]
        raise UsageError(
            f"the {a} and {b} vocabularies differ (first at id {diff[1]}, token {diff[0]!r}): "
            f"use the {a}'s tokenizer for the {b}"
        )
    ea = tok_a.encode(_PROBE_TEXT, add_special_tokens=False)
    eb = tok_b.encode(_PROBE_TEXT, add_special_tokens=False)
    if ea != eb:
        raise UsageError(
            f"the {a} and {b} tokenizers split the same text differently (e.g. lower-casing or accents): "
            f"use the {a}'s tokenizer for the {b}"
        )


# --------------------------------------------------------------------------- batch order and collation


def _check_order_args(num_examples: int, seed: int, epoch: int) -> None:
    if num_examples < 0 or seed < 0 or epoch < 0:
        raise UsageError(f"num_examples {num_examples}, seed {seed} and epoch {epoch} must be non-negative")


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation of ``range(num_examples)``, int64.

    A function of ``(seed, epoch)`` only, so every rank computes the same order (no
    sampler state, nothing to forget to ``set_epoch``).
    """
    _check_order_args(num_examples, seed, epoch)
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)


def length_grouped_order(lengths, batch_size: int, seed: int, epoch: int, megabatch_mult: int = 50) -> np.ndarray:
    """An epoch order whose consecutive ``batch_size`` slices hold similar lengths.

    As HF's LengthGroupedSampler: shuffle, cut into megabatches of ``megabatch_mult *
    batch_size``, sort each by length (longest first), cut into batches; then the full
    batches are shuffled, the one holding the longest sequence goes first (an
    out-of-memory shows at step 0), and the one short batch, if any, goes last.
    ``batch_size`` is the GLOBAL batch of one optimiser step. Returns int64 ``[N]``.
    """
    lengths = np.asarray(lengths)
    _check_order_args(len(lengths), seed, epoch)
    if batch_size < 1 or megabatch_mult < 1:
        raise UsageError(f"batch_size {batch_size} and megabatch_mult {megabatch_mult} must be positive")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    mega = batch_size * megabatch_mult
    full, short = [], []
    for start in range(0, len(perm), mega):
        idx = perm[start:start + mega]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        for b in range(0, len(idx), batch_size):
            (full if len(idx[b:b + batch_size]) == batch_size else short).append(idx[b:b + batch_size])
    if full:
        full = [full[i] for i in rng.permutation(len(full))]
        longest = int(np.argmax([lengths[b].max() for b in full]))
        full[0], full[longest] = full[longest], full[0]
    batches = full + short
    return np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, dtype=np.int64)


def collate(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences -> ``{"input_ids": LongTensor[B, S], "attention_mask": LongTensor[B, S]}``.

    ``batch``: a list of id sequences (lists, arrays, tensors), a list of examples with
    ``input_ids``, a dict ``{"input_ids": [...]}`` (what ``dataset[indices]`` gives), or a
    2-D array. Right-pads with ``pad_id`` to the longest row; packed blocks are all
    ``block_size`` long, so only grouped batches get padding.
    """
    if isinstance(batch, Mapping):
        batch = batch["input_ids"]
    if isinstance(batch, (np.ndarray, torch.Tensor)) and batch.ndim == 2:
        ids = torch.as_tensor(batch).long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seqs = [ex["input_ids"] if isinstance(ex, Mapping) else ex for ex in batch]
    if not seqs:
        raise UsageError("cannot collate an empty batch")
    lengths = [len(s) for s in seqs]
    if min(lengths) == max(lengths):  # packed blocks: one array copy, no padding
        ids = torch.as_tensor(np.asarray([np.asarray(s) for s in seqs]), dtype=torch.long).reshape(len(seqs), -1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = torch.full((len(seqs), max(lengths)), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), max(lengths)), dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        ids[row, :n] = torch.as_tensor(np.asarray(seq), dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}
