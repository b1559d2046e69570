"""The export refusal type, apart from `export.py` so the format writers it calls can raise it
without an import cycle."""

from __future__ import annotations


class ExportError(ValueError):
    """The export cannot be made as asked; one line says why and what to do."""
