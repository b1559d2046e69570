"""pkdq: prune -> distill -> quantize, with an honest per-stage report."""

from importlib import metadata

__version__ = metadata.version("pkdq")  # one place: pyproject.toml's [project] version
