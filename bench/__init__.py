"""The benches: speed, peers, the offline study and the focused two-way timings, run as modules from the
repository root (``python -m bench.speed --quick``; ``bench/README.md`` lists them).

``common`` holds what they share: timing in interleaved rounds, the machine record and thread choice, the
command line a report records, the atomic JSON write, the BERT-base workload; ``two_way`` the flags, setup,
step and ending of the benches that time one way against another (``relations``, ``logit_grad``).
"""
