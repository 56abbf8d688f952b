"""Offline natural-language text for calibration (imatrix) and evaluation (perplexity, KL).

Both come from docstrings of the Python standard library: real English prose written long before
and independently of edgeinfer, present on every machine, and identical for a given Python
version. The two sets are drawn from disjoint module lists, so calibration never sees evaluation
text. Pass them as ``--text @stdlib-eval`` / ``--text @stdlib-calib``, or any text file.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from edgeinfer.errors import EdgeinferError

EVAL_MODULES = (
    "json", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
    "datetime", "decimal", "fractions", "statistics", "textwrap", "string", "csv",
)
CALIB_MODULES = (
    "email.message", "http.client", "urllib.parse", "logging", "unittest.case", "doctest", "heapq",
    "bisect", "random", "zipfile", "tarfile", "shutil", "tempfile", "calendar", "configparser",
)
BUILTIN_TEXTS = {"@stdlib-eval": EVAL_MODULES, "@stdlib-calib": CALIB_MODULES}


def stdlib_docstrings(modules: tuple[str, ...]) -> str:
    """Concatenate the docstrings of ``modules`` and their public classes, functions and methods."""
    parts: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d:
                    parts.append(d)
                if inspect.isclass(obj):
                    for mname, meth in sorted(vars(obj).items()):
                        if not mname.startswith("_") and inspect.isfunction(meth) and meth.__doc__:
                            parts.append(inspect.cleandoc(meth.__doc__))
    return "\n\n".join(parts)


def load_text(spec: str) -> str:
    """Read ``spec``: a built-in corpus name (``@stdlib-eval``, ``@stdlib-calib``) or a text file."""
    if spec in BUILTIN_TEXTS:
        return stdlib_docstrings(BUILTIN_TEXTS[spec])
    p = Path(spec).expanduser()
    if not p.is_file():
        raise EdgeinferError(f"{spec}: no such text file (or use {' / '.join(BUILTIN_TEXTS)})")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgeinferError(f"{p}: not UTF-8 text ({e})") from None
