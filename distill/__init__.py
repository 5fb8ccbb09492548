"""distill: build compact students from large teachers by layer selection, and distil them.

Modules, one idea each, arrows pointing down only (faces -> train/glue -> objective/data
-> terms/families -> losses/layers): ``cli``, ``config`` and ``arguments`` (the recipe and
its flags); ``train`` (the loop), ``calibrate`` (the weighting aid), ``electra`` (the
discriminator path); ``objective`` (weighted terms from a config), ``batches``, ``data``
and ``masking`` (corpus to masked batches); ``terms`` (the loss-term registry: every fact
of each term) and ``families`` (the family registry: every family-specific fact);
``models`` (loading and feature extraction), ``student`` (initialisation by layer
selection), ``sentence_models`` (sentence-transformers pipelines); ``losses`` (pure loss
functions), ``relations`` (Q/K/V capture), ``layers`` (1-based layer conventions);
``precision`` (one class per mode), ``hardware`` (what the machine is), ``locks``, ``io``,
``card``, ``reference`` (generated docs).
"""

__version__ = "0.1.0"
