"""pkdq: prune -> distill -> quantize, with an honest per-stage report."""

__version__ = "0.1.0"
