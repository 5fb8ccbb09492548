"""Training: the loop (``loop``: one screen, top to bottom), its setup (``setup``: the models, objective,
precision and batches a run is handed once), the step module (``step``), the batches (``batches``), the
logs (``logs``), checkpoints and exact resume (``checkpoints``), signals (``signals``), one process or many
(``distributed``), the saved student and its card (``save``, ``card``), the ELECTRA generator path
(``electra``) and the precision modes (``precision/``).
"""
