"""glue_eval: fine-tune students on GLUE with transformers' Trainer, over grids, and report one table.

Modules: ``tasks`` (registry), ``data`` (loading), ``metrics``, ``finetune`` (Trainer),
``distillation`` (task-specific distillation terms), ``grid``, ``report``, ``cli``.
"""
