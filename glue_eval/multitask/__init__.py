"""One student, many tasks: a shared encoder with a head per task (hard parameter sharing), MT-DNN style.

- ``config``: the tasks of a run from one JSON file (each task's data, head, loss weight, optional teacher) and
  how they are trained together.
- ``sampling``: which task a batch comes from (proportional, uniform, temperature-scaled, annealed) and the
  hybrid schedule (meta-batch sums until the loss plateaus, then one task per batch with a sum step every N).
- ``combine`` and ``pcgrad``: the weighted sum of task losses, and PCGrad (Yu et al. 2020) on one process
  or under DDP.
- ``model``: the shared encoder and its heads; one folder that ``from_pretrained`` reads as the encoder, with
  the heads beside it, and :func:`glue_eval.multitask.model.load_multitask`.
- ``train``, ``run``: the loop (one task per batch, meta-batches, hybrid; plain or PCGrad; soft targets of each
  task's own teacher) and ``glue-eval --multitask CONFIG.json``.
- ``qa``: an extractive-QA task among them: its windows, span loss (or its teacher's span terms), and EM/F1 by
  the single-task decoding.

Pure parts (config, sampling, combine, pcgrad) import no model code. docs/multitask.md is the user's page.
"""
