"""Load a GGUF into a :class:`edgeinfer.models.base.Transformer` without dequantizing it.

Steps (STYLE.md's data flow): validate the header -> pick the architecture entry -> build the
model on ``meta`` -> memory-map the file (copy-on-write ``np.memmap``: nothing is read until
used) -> swap every ``nn.Linear`` for a :class:`~edgeinfer.kernels.qlinear.QuantLinear` of the
tensor's GGML type, the embedding for a :class:`~edgeinfer.kernels.qlinear.QuantEmbedding` ->
``load_state_dict(assign=True)`` for the float 1-D tensors (norms, biases). Load time and RSS
grow with the file size, not with the dequantized size.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from edgeinfer.errors import BackendError, InvalidModelError
from edgeinfer.gguf_check import GGUFFile, validate_gguf
from edgeinfer.kernels import ggml_numerics
from edgeinfer.kernels.dequant import SUPPORTED, dequantize, row_bytes
from edgeinfer.kernels.qlinear import QuantEmbedding, QuantLinear, fuse
from edgeinfer.models.base import Transformer, gguf_name, module_path
from edgeinfer.models.registry import architecture

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA, then MPS, then CPU; an explicit device that is absent raises BackendError."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise BackendError(f"--device {name} requested but torch reports no {name.upper()} device; "
                           "use --device cpu or auto")
    if name not in ("cuda", "mps", "cpu"):
        raise BackendError(f"unknown device {name!r}; choose auto, cuda, mps or cpu")
    return torch.device(name)


@dataclass
class LoadReport:
    """What the loader did: kernel path per tensor type, weight bytes on the device."""

    paths: Counter = field(default_factory=Counter)
    weight_bytes: int = 0


def _raw(mm: np.ndarray, h: GGUFFile, name: str, t) -> torch.Tensor:
    """The tensor's bytes as a uint8 [rows, row_bytes] view of the memory map (no copy)."""
    k = t.shape[0]
    rows = t.n_elements // k
    rb = row_bytes(t.qtype, k)
    if rows * rb != t.nbytes:
        raise InvalidModelError(f"{h.path}: tensor {name} has {t.nbytes} bytes, expected {rows * rb}")
    return torch.from_numpy(mm[t.offset:t.offset + t.nbytes]).view(rows, rb)


def _release_pages(mm: np.memmap) -> None:
    """Drop the mapped pages read while repacking/copying (the mapping is private and never
    written, so they are re-read from the file if used again, e.g. embedding rows)."""
    m = getattr(mm, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError) as e:
            log.debug("madvise failed: %s", e)


def load_model(path: str | os.PathLike, device: torch.device, n_ctx: int,
               header: GGUFFile | None = None, numerics: str = "fast") -> tuple[Transformer, LoadReport]:
    """Build the model of GGUF ``path`` on ``device`` with caches for ``n_ctx`` positions.

    ``numerics="llama.cpp"`` swaps in llama.cpp's roundings instead of the fast kernels
    (:mod:`edgeinfer.kernels.ggml_numerics`): 8-bit activation blocks in every quantized
    matmul, an fp16 KV cache, fp16 Q and softmax in attention.

    Raises:
        InvalidModelError: unsupported architecture or tensor type, missing or misshapen tensors.
    """
    path = Path(path)
    h = header or validate_gguf(path)
    arch = architecture(h.architecture, str(path))
    tensors = {t.name: t for t in h.tensors}
    for t in h.tensors:
        if t.qtype not in SUPPORTED:
            raise InvalidModelError(f"{path}: tensor {t.name} is {t.qtype.name}, which the torch engine cannot "
                                    f"read (supported: {', '.join(q.name for q in SUPPORTED)}); "
                                    "use --backend llama.cpp or re-quantize")
    args = arch.args_from_gguf(h.metadata, {n: t.shape for n, t in tensors.items()}, str(path))
    with torch.device("meta"):
        model = Transformer(args, arch.Block)
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file never touched
    report = LoadReport()
    floats: dict[str, torch.Tensor] = {}
    used = set()

    modules = dict(model.named_modules())
    for mod_name, mod in list(modules.items()):
        if isinstance(mod, nn.Linear):
            gname = gguf_name(mod_name) + ".weight"
            if gname == "output.weight" and gname not in tensors:
                gname = "token_embd.weight"  # tied embeddings
            t = tensors.get(gname)
            if t is None:
                raise InvalidModelError(f"{path}: tensor {gname} is missing (architecture {h.architecture})")
            if tuple(t.shape[:2]) != (mod.in_features, mod.out_features):
                raise InvalidModelError(f"{path}: tensor {gname} has shape {t.shape}, expected "
                                        f"({mod.in_features}, {mod.out_features})")
            bias = None
            if mod.bias is not None:
                bname = gname.replace(".weight", ".bias")
                if bname not in tensors:
                    raise InvalidModelError(f"{path}: tensor {bname} is missing")
                bias = dequantize(_raw(mm, h, bname, tensors[bname]), tensors[bname].qtype).reshape(-1)
                used.add(bname)
            q = QuantLinear(_raw(mm, h, gname, t), t.qtype, mod.out_features, mod.in_features, bias, device, gname,
                            numerics=numerics)
            parent, _, child = mod_name.rpartition(".")
            setattr(modules[parent] if parent else model, child, q)
            report.paths[f"{t.qtype.name}:{q.path}"] += 1
            report.weight_bytes += q.nbytes()
            used.add(gname)
    t = tensors["token_embd.weight"]
    model.tok_embd = QuantEmbedding(_raw(mm, h, "token_embd.weight", t), t.qtype, args.dim, device)
    used.add("token_embd.weight")
    if "rope_freqs.weight" in tensors:
        rf = tensors["rope_freqs.weight"]
        model.rope_freqs = dequantize(_raw(mm, h, rf.name, rf), rf.qtype).reshape(-1)
        used.add(rf.name)
    for name, t in tensors.items():
        if name in used:
            continue
        if len(t.shape) != 1:
            log.warning("%s: tensor %s %s is not used by the torch engine", path, name, t.shape)
            continue
        floats[module_path(name)] = dequantize(_raw(mm, h, name, t), t.qtype).reshape(-1).to(device)
    expected = {n for n, p in model.named_parameters()}
    missing = expected - floats.keys()
    if missing:
        raise InvalidModelError(f"{path}: tensors for {sorted(missing)[:4]} are missing "
                                f"(architecture {h.architecture})")
    unknown = floats.keys() - expected
    if unknown:
        log.warning("%s: ignoring tensors %s", path, sorted(unknown)[:8])
    model.load_state_dict({k: floats[k] for k in expected}, strict=False, assign=True)
    for layer in model.layers:  # one matmul for q/k/v and one for gate/up where the kernels allow
        a, f = layer.attn, layer.ffn
        a.qkv = fuse([a.attn_q, a.attn_k, a.attn_v])
        f.gate_up = fuse([f.ffn_gate, f.ffn_up])
    _release_pages(mm)
    cache_dtype = torch.float32 if device.type == "cpu" else torch.float16
    if numerics == "llama.cpp":
        cache_dtype = torch.float16  # llama.cpp's default type_k / type_v
        for layer in model.layers:
            layer.attn.core = ggml_numerics.attention
    model.setup(n_ctx, device, cache_dtype)
    return model, report
