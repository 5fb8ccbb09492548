"""distill: build compact students from large teachers by layer selection, and distil them.

Sub-packages, one room each, arrows pointing down only (tests/test_import_graph.py checks it):

- ``cli``: the faces (``distill-init``, ``distill-train``).
- ``train/``: the loop (one screen), its setup, the step module, batches, precision modes, checkpoints,
  the ELECTRA generator path, the saved student and its card.
- ``settings/``: the recipe (every field declared once, with ``common.declare.setting``) and the parser
  the CLIs share.
- ``objective/``: the loss-term registry, pure losses, the objective's own settings, the plan (settings ->
  one weighted scalar; every term called as ``loss(student, teacher, ctx)``), calibration.
- ``models/`` and ``data/`` (one floor, neither imports the other): the family registry, loading and
  feature extraction, students by layer selection, sentence-transformers pipelines, cards; corpora,
  token blocks and masking.
- ``common/``: errors, atomic writes, locks, the machine, offline assets.
"""

__version__ = "0.1.0"
