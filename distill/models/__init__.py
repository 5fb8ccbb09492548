"""Models: the family registry (every family-specific fact), loading and feature extraction (``loading``:
the one adaptor), students by layer selection (``student``), sentence-transformers pipelines (``sentence``),
model cards, and the model-side captures that losses read (``qkv``, ``vocab_head``).
"""
