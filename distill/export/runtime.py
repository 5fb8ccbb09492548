"""A small ONNX Runtime runner for exported students: tokenise, run, and read the head's output.

``OnnxEncoder(folder).encode(texts)`` gives what ``SentenceTransformer(folder).encode(texts)``
gives (the pooling and normalisation of the model's ``modules.json`` are inside the exported
graph), with onnxruntime and the folder's tokenizer alone: no torch on the serving path, and no
``optimum``, which cannot be installed beside transformers 5. ``OnnxClassifier`` returns a
fine-tuned classifier's logits. Both read ``onnx/export.json`` to know the head, the inputs and
the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from distill.common.errors import UsageError

ONNX_DIR = "onnx"  # where sentence-transformers' backend="onnx" and optimum look inside a model folder
FP32_FILE = "model.onnx"
REPORT_FILE = "export.json"
WRITTEN_BY = "distill-export"


def session(path: str | os.PathLike, threads: int | None = None, spinning: bool = False):
    """An ``InferenceSession`` on the CPU; ``threads`` intra-op threads (None: ORT's default, every core).

    ``spinning=False`` stops ORT's worker threads busy-waiting after each run: with it on, they hold
    the cores for a while and slow down any torch work interleaved with them (measured in bench/deploy).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_report(folder: str | os.PathLike) -> dict:
    """``MODEL_DIR/onnx/export.json``; one clear line when the folder was never exported."""
    path = Path(folder) / ONNX_DIR / REPORT_FILE
    if not path.is_file():
        raise UsageError(f"{str(folder)!r} has no {ONNX_DIR}/{REPORT_FILE}: export it first with "
                         f"`distill-export {folder}`")
    return json.loads(path.read_text(encoding="utf-8"))


def model_file(folder: str | os.PathLike, which: str = "fp32") -> Path:
    """The exported file of kind ``which`` (``fp32``, ``int8``, ``int8_static``) inside ``folder/onnx``."""
    report = read_report(folder)
    name = report["files"].get(which)
    if name is None:
        raise UsageError(f"{str(folder)!r} has no {which} ONNX file (it has {', '.join(report['files'])}): "
                         f"export it with `distill-export {folder} --quantize "
                         f"{'static --calibration_file TEXTS' if which == 'int8_static' else 'dynamic'}`")
    return Path(folder) / ONNX_DIR / name


class _Runner:
    """Tokenizer + session of one exported file; ``run`` feeds a tokenised batch and returns named outputs."""

    def __init__(self, folder: str | os.PathLike, which: str = "fp32", threads: int | None = None,
                 spinning: bool = False, tokenizer=None):
        from transformers import AutoTokenizer

        self.folder = str(folder)
        self.report = read_report(folder)
        self.session = session(model_file(folder, which), threads, spinning)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.folder)
        self.max_length = self.report.get("max_seq_length") or 512
        self.lowercase = bool(self.report.get("do_lower_case"))

    def tokenize(self, texts, pairs=None) -> dict[str, np.ndarray]:
        if self.lowercase:
            texts = [t.lower() for t in texts]
            pairs = None if pairs is None else [t.lower() for t in pairs]
        args = (list(texts),) if pairs is None else (list(texts), list(pairs))
        encoded = self.tokenizer(*args, padding=True, truncation="longest_first", max_length=self.max_length,
                                 return_tensors="np")
        return self.feed(encoded)

    def feed(self, encoded) -> dict[str, np.ndarray]:
        """The session's inputs from a tokenised batch (zeros for segment ids a tokenizer did not give)."""
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        out = {"input_ids": ids, "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int64)}
        if "token_type_ids" in self.inputs:
            types = encoded.get("token_type_ids")
            out["token_type_ids"] = np.zeros_like(ids) if types is None else np.asarray(types, dtype=np.int64)
        return out

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, feed)))


class OnnxEncoder(_Runner):
    """``encode`` on ONNX Runtime: the sentence embedding of a ``sentence`` export, else mean pooling.

    A bare ``encoder`` export has no pipeline: its embedding is the mean of the last hidden states over
    the real tokens (what sentence-transformers does for a plain transformers folder).
    """

    def encode(self, sentences, batch_size: int = 32, normalize_embeddings: bool = False) -> np.ndarray:
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        order = np.argsort([-len(s) for s in sentences], kind="stable")  # like encode: similar lengths per batch
        out = [None] * len(sentences)
        for start in range(0, len(sentences), batch_size):
            chosen = order[start:start + batch_size]
            feed = self.tokenize([sentences[i] for i in chosen])
            for i, row in zip(chosen, self.embed(feed)):
                out[i] = row
        embeddings = np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)
        if normalize_embeddings:
            embeddings = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
        return embeddings[0] if single else embeddings

    def embed(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        outputs = self.run(feed)
        if "sentence_embedding" in outputs:
            return outputs["sentence_embedding"]
        if "last_hidden_state" not in outputs:
            raise UsageError(f"{self.folder!r} was exported as a {self.report.get('head')}: it has no embedding; "
                             "use OnnxClassifier")
        mask = feed["attention_mask"][..., None].astype(np.float32)
        return (outputs["last_hidden_state"] * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)


class OnnxClassifier(_Runner):
    """Logits of an exported sequence classifier: ``predict(texts[, pairs])`` -> ``[N, num_labels]``."""

    def predict(self, texts, pairs=None, batch_size: int = 32) -> np.ndarray:
        texts = list(texts)
        pairs = None if pairs is None else list(pairs)  # once: a generator would be spent after the first batch
        if pairs is not None and len(pairs) != len(texts):
            raise UsageError(f"predict: {len(texts)} texts but {len(pairs)} pairs: give one second text per text")
        rows = []
        for start in range(0, len(texts), batch_size):
            part = None if pairs is None else pairs[start:start + batch_size]
            rows.append(self.logits(self.tokenize(texts[start:start + batch_size], part)))
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def logits(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        outputs = self.run(feed)
        if "logits" not in outputs:
            raise UsageError(f"{self.folder!r} was exported as a {self.report.get('head')}, not a classifier: "
                             "use OnnxEncoder")
        return outputs["logits"]


__all__ = ["OnnxClassifier", "OnnxEncoder", "model_file", "read_report", "session"]
