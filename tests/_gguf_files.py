"""Small GGUF files for error-path tests (written with the ``gguf`` package)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_tiny_gguf(path: Path, arch: str = "llama", n_tensors: int = 2) -> Path:
    """A syntactically valid GGUF with a couple of F32 tensors (not a runnable model)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(64)
    rng = np.random.default_rng(0)
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.standard_normal((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncated_copy(src: Path, dst: Path, keep_fraction: float) -> Path:
    """Copy the first ``keep_fraction`` of ``src`` to ``dst``."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst
