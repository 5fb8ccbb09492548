"""Serving the student: ONNX export with a parity check, int8 quantisation, and a small ONNX Runtime runner.

A room of its own, as sentence-transformers' ``backend/``; it imports ``distill.common`` and
``distill.models`` only, and nothing of the training path imports it (onnx and onnxruntime are the
``export`` extra).

- ``graphs``: the torch modules that are exported (bare encoder, sentence pipeline, classifier).
- ``onnx``: ``export_folder`` / ``export_model``: ``MODEL_DIR/onnx/model.onnx``, checked against torch.
- ``quantize``: ONNX Runtime int8 beside it (dynamic; static from a text file).
- ``runtime``: ``OnnxEncoder`` (``encode``) and ``OnnxClassifier`` (logits) on onnxruntime alone.
- ``cli``: ``distill-export``.
"""
