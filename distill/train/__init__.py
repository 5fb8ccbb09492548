"""Training: the loop (``loop``), batches (``batches``), the ELECTRA generator path (``electra``), the
precision modes (``precision``) and the training card (``card``).
"""
