"""Training and evaluation CLI for crosshead models: ``python -m crosshead.train --help``."""

from .cli import main, parser

__all__ = ["main", "parser"]
