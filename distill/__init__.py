"""distill: build compact students from large teachers by layer selection, and distil them.

Modules, one idea each: ``layers`` (1-based layer conventions), ``families`` (the
family registry: every family-specific fact), ``models`` (loading and feature extraction), ``student`` (initialisation by layer selection),
``losses`` (pure loss functions), ``objective`` (weighted terms from a config),
``data`` and ``masking`` (corpus to masked batches), ``precision`` (fp32/bf16/fp16
O1-O3), ``train`` (the loop), ``electra`` (the discriminator path), ``cli``.
"""

__version__ = "0.1.0"
