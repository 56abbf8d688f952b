"""Backends: every engine implements :class:`edgeinfer.backend.Backend`.

Imported lazily so ``edgeinfer --help`` never pays for torch or llama.cpp.
"""

from __future__ import annotations

import os

from edgeinfer.backend import Backend, LoadOptions
from edgeinfer.errors import EdgeinferError

BACKENDS = ("llama.cpp", "torch")
_ALIASES = {"llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "torch": "torch", "pytorch": "torch"}


def normalize_backend(name: str) -> str:
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise EdgeinferError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None


def load_backend(name: str, path: str | os.PathLike, opts: LoadOptions | None = None) -> Backend:
    """Load ``path`` (a GGUF) with backend ``name`` (``llama.cpp`` or ``torch``)."""
    name = normalize_backend(name)
    if name == "llama.cpp":
        from edgeinfer.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, opts)
    from edgeinfer.backends.torch_engine import TorchBackend

    return TorchBackend(path, opts)
