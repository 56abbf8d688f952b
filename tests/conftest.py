"""Shared test set-up: offline guard, the default model, helper modules on sys.path.

Helper modules that several test files share live next to this file with a leading underscore
(``tests/_something.py``) and are imported as ``import _something``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# `python -m pytest` puts the repo root on sys.path, where kernels/, models/ and quant/ (installed as
# edgeinfer.kernels, ...) would shadow same-named PyPI packages: transformers >= 5.25 imports the
# `kernels` package (huggingface/kernels) when it is installed. The tests import edgeinfer as installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != TESTS_DIR.parent]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# Offline means offline: nothing in the test run may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or str(host) in ("127.0.0.1", "::1", "localhost"):
        return _real_connect(self, address)
    raise RuntimeError(f"test tried to open a network connection to {address!r}")


socket.socket.connect = _guarded_connect


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1)."""
    from edgeinfer.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llama_default(default_gguf):
    """The default model loaded once in the llama.cpp backend (2 threads)."""
    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(default_gguf, LoadOptions(n_ctx=2048, n_threads=2, seed=0))
    yield b
    b.close()


@pytest.fixture
def cli_env(tmp_path):
    """Environment for CLI subprocesses: offline, isolated caches and models folder."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), EDGEINFER_MODELS_DIR=str(tmp_path / "models"),
               PYTHONUNBUFFERED="1")
    return env


# --- convert (issue 3): the default model exported as a real Hugging Face checkpoint, once per session
@pytest.fixture(scope="session")
def hf_default_checkpoint(tmp_path_factory) -> Path:
    """The default GGUF turned into an HF checkpoint folder (safetensors + tokenizer) by transformers."""
    import _hf_export

    return _hf_export.export_default_checkpoint(tmp_path_factory.mktemp("hf_default") / "SmolLM2-135M-Instruct")
