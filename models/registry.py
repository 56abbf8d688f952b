"""GGUF ``general.architecture`` -> the module that builds it (``args_from_gguf`` + ``build``).

Adding an architecture = one file in ``models/`` plus one row here plus one row in the
tiny-config test table (``tests/test_models.py``).
"""

from __future__ import annotations

from types import ModuleType

from edgeinfer.errors import InvalidModelError
from edgeinfer.models import deepseek2, gemma3, gemma3n, gemma4, llama

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": llama,
    "qwen3": llama,
    "qwen2moe": llama,
    "qwen3moe": llama,
    "gemma3": gemma3,
    "gemma3n": gemma3n,
    "deepseek2": deepseek2,
    "gemma4": gemma4,
}


def architecture(name: str, path: str = "") -> ModuleType:
    """The module for GGUF architecture ``name``; raises InvalidModelError naming the supported ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise InvalidModelError(f"{path}: architecture {name!r} is not supported by the torch engine "
                                f"(supported: {', '.join(ARCHITECTURES)}); use --backend llama.cpp") from None
