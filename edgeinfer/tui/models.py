"""The rows of the model picker: every model ``edgeinfer ls`` finds, with architecture, size, quant.

No backend is loaded here: :func:`edgeinfer.inspect_gguf.summarize` reads only the GGUF header and
tensor table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from edgeinfer.errors import EdgeinferError

log = logging.getLogger(__name__)


@dataclass
class ModelRow:
    """One model as the picker shows it."""

    name: str  # what -m takes (and what a conversation stores)
    path: str
    source: str
    size: int
    architecture: str = "?"
    parameters: int = 0
    quant: str = "?"


def describe_models(lister: Callable | None = None, summarize: Callable | None = None) -> list[ModelRow]:
    """List models with their architecture, parameter count and quant (unreadable files say why)."""
    if lister is None:
        from edgeinfer.resolve import list_models as lister
    if summarize is None:
        from edgeinfer.inspect_gguf import summarize
    rows = []
    for e in lister():
        row = ModelRow(e.name, str(e.path), e.source, e.size)
        try:
            s = summarize(e.path)
            row.architecture = s.get("architecture") or "?"
            row.parameters = int(s.get("parameters") or 0)
            row.quant = s.get("quant") or "?"  # inspect_gguf.quant_label, as the backends report it
        except (EdgeinferError, OSError, ValueError) as err:
            log.warning("%s: cannot read the GGUF header: %s", e.path, err)
            row.architecture = "unreadable"
        rows.append(row)
    return rows


def fmt_params(n: int) -> str:
    """``134515008`` -> ``'135M'``."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n) if n else "?"
