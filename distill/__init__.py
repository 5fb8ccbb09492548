"""distill: build compact students from large teachers by layer selection, and distil them.

Sub-packages, one room each, arrows pointing down only (tests/test_import_graph.py checks it):

- ``cli``: the faces (``distill-init``, ``distill-train``).
- ``train/``: the loop, batches, precision modes, the ELECTRA generator path, the training card.
- ``settings/``: the recipe, every field declared once, and the parser the CLIs share.
- ``objective/``: the loss-term registry, pure losses, the plan (config -> one weighted scalar), calibration.
- ``models/`` and ``data/`` (one floor, neither imports the other): the family registry, loading and
  feature extraction, students by layer selection, sentence-transformers pipelines, cards; corpora,
  token blocks and masking.
- ``common/``: errors, atomic writes, locks, the machine, offline assets.
"""

__version__ = "0.1.0"
