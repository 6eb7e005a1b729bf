"""Benchmark suite for crosshead's iMHSA: speed, peak memory and scaling in N against the
attentions a user would otherwise pick (``python -m bench --help``; see bench/README.md).

Kept free of heavy imports so that ``python -m bench.worker`` and the tests start quickly.
"""
