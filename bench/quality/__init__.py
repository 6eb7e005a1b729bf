"""The quality benchmark: does cross-head interaction help? ``python -m bench.quality --help``."""
