"""Load a GGUF into a :class:`edgeinfer.models.base.Transformer` without dequantizing it.

Steps (STYLE.md's data flow): validate the header -> pick the architecture entry -> build the
model on ``meta`` -> memory-map the file (copy-on-write ``np.memmap``: nothing is read until
used) -> swap quantized modules in **by module type** (:data:`SWAPS`: ``nn.Linear`` ->
:class:`~edgeinfer.kernels.qlinear.QuantLinear`, ``nn.Embedding`` ->
:class:`~edgeinfer.kernels.qlinear.QuantEmbedding` (rows gathered from the memory map),
:class:`~edgeinfer.models.moe.ExpertLinear` -> :class:`~edgeinfer.kernels.qlinear.QuantExpertLinear`)
-> assign every remaining parameter (norms, biases, scales) from its float tensor with
``load_state_dict(assign=True)`` -> fuse projections that read the same input (``FUSE`` tables of
the modules) -> allocate the caches. Every tensor of the file must be used by the model: one it
does not know is an error, not a silent drop. Load time and RSS grow with the file size, not with
the dequantized size.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from torch import nn

from edgeinfer.errors import BackendError, InvalidModelError
from edgeinfer.gguf_check import GGUFFile, validate_gguf
from edgeinfer.kernels import ggml_numerics
from edgeinfer.kernels.dequant import SUPPORTED, dequantize, row_bytes
from edgeinfer.kernels.expert_offload import OffloadedExpertLinear
from edgeinfer.kernels.qlinear import QuantEmbedding, QuantExpertLinear, QuantLinear, fuse
from edgeinfer.models.base import Attention, Transformer
from edgeinfer.models.moe import ExpertLinear, Routing
from edgeinfer.models.registry import architecture

log = logging.getLogger(__name__)
T = gguf.GGMLQuantizationType

#: Tests only: apply expert offload on a CPU device too (where it is otherwise a no-op), to run its logic.
OFFLOAD_ON_CPU = False


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
    offloaded_bytes: int = 0  # expert weights kept in host memory (--cpu-moe)


def _raw(mm: np.ndarray, h: GGUFFile, name: str, t) -> torch.Tensor:
    """The tensor's bytes as a uint8 view of the memory map (no copy): [rows, row_bytes], or
    [n_expert, rows, row_bytes] for a 3-D tensor."""
    k = t.shape[0]
    rows = t.n_elements // k
    rb = row_bytes(t.qtype, k)
    if rows * rb != t.nbytes:
        raise InvalidModelError(f"{h.path}: tensor {name} has {t.nbytes} bytes, expected {rows * rb}")
    data = torch.from_numpy(mm[t.offset:t.offset + t.nbytes])
    return data.view(t.shape[2], t.shape[1], rb) if len(t.shape) == 3 else data.view(rows, rb)


def _release_pages(mm: np.memmap) -> None:
    """Drop the mapped pages read while repacking/copying (the mapping is private and never
    written, so they are re-read from the file if used again, e.g. embedding rows)."""
    m = getattr(mm, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError) as e:
            log.debug("madvise failed: %s", e)


@dataclass
class _Ctx:
    """What a swap function needs: the file, its tensors, the target device, what was used."""

    path: Path
    header: GGUFFile
    mm: np.ndarray
    tensors: dict
    device: torch.device
    numerics: str
    report: LoadReport
    model: Transformer
    used: set = field(default_factory=set)
    offload_layers: int = 0  # experts of layers < this stay in host memory (--cpu-moe / --n-cpu-moe)
    expert_cache: int = 0  # experts per projection kept on the device when offloading (0: 2 x top-k)

    def tensor(self, name: str, want: tuple[int, ...] | None = None):
        """The GGUF tensor ``name`` (ggml order shape checked against ``want``), marked used."""
        t = self.tensors.get(name)
        if t is None:
            alt = self.model.TIED.get(name)
            t = self.tensors.get(alt) if alt else None
            if t is None:
                raise InvalidModelError(f"{self.path}: tensor {name} is missing (architecture "
                                        f"{self.header.architecture}); re-convert the model")
            name = alt
        if want is not None and tuple(t.shape) != tuple(want):
            raise InvalidModelError(f"{self.path}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(want)}")
        self.used.add(name)
        return name, t

    def floats(self, name: str, numpy_shape: tuple[int, ...]) -> torch.Tensor:
        """A small tensor dequantized to float32 on the device, in the model's (numpy-order) shape."""
        gname, t = self.tensor(name)
        if t.n_elements != int(np.prod(numpy_shape)):
            raise InvalidModelError(f"{self.path}: tensor {gname} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(reversed(numpy_shape))}")
        raw = _raw(self.mm, self.header, gname, t)
        return dequantize(raw.reshape(-1, raw.shape[-1]), t.qtype).reshape(numpy_shape).to(self.device)


def _swap_linear(c: _Ctx, mod: nn.Linear, gname: str) -> QuantLinear:
    name, t = c.tensor(gname + ".weight", (mod.in_features, mod.out_features))
    bias = c.floats(gname + ".bias", (mod.out_features,)).cpu() if mod.bias is not None else None
    q = QuantLinear(_raw(c.mm, c.header, name, t), t.qtype, mod.out_features, mod.in_features, bias, c.device,
                    name, numerics=c.numerics)
    c.report.paths[f"{t.qtype.name}:{q.path}"] += 1
    c.report.weight_bytes += q.nbytes()
    return q


def _swap_embedding(c: _Ctx, mod: nn.Embedding, gname: str) -> QuantEmbedding:
    name, t = c.tensor(gname + ".weight", (mod.embedding_dim, mod.num_embeddings))
    return QuantEmbedding(_raw(c.mm, c.header, name, t), t.qtype, mod.embedding_dim, c.device)


def _swap_experts(c: _Ctx, mod: ExpertLinear, gname: str) -> nn.Module:
    name, t = c.tensor(gname + ".weight", (mod.in_features, mod.out_features, mod.n_expert))
    layer = int(gname.split(".")[1]) if gname.startswith("blk.") else None  # None: a stack outside the layers
    raw = _raw(c.mm, c.header, name, t)
    if layer is not None and layer < c.offload_layers and (c.device.type != "cpu" or OFFLOAD_ON_CPU):
        top_k = max((m.routing.top_k for m in c.model.modules() if isinstance(getattr(m, "routing", None), Routing)),
                    default=8)
        q = OffloadedExpertLinear(raw, t.qtype, mod.n_expert, mod.out_features, mod.in_features, c.device, name,
                                  c.numerics, cache_size=c.expert_cache or 2 * top_k)
        c.report.paths[f"{t.qtype.name}:{q.path}"] += mod.n_expert
        c.report.offloaded_bytes += t.nbytes
        return q
    q = QuantExpertLinear(raw, t.qtype, mod.n_expert, mod.out_features, mod.in_features,
                          c.device, name, numerics=c.numerics)
    c.report.paths[f"{t.qtype.name}:{q.path}"] += mod.n_expert
    c.report.weight_bytes += q.nbytes()
    return q


#: Module type -> its quantized replacement, built from the module's GGUF tensor(s). Exact types:
#: a subclass that computes something else needs its own row.
SWAPS: dict[type, Callable[[_Ctx, nn.Module, str], nn.Module]] = {
    nn.Linear: _swap_linear,
    nn.Embedding: _swap_embedding,
    ExpertLinear: _swap_experts,
}


def _swap_modules(c: _Ctx, model: Transformer) -> None:
    for path, mod in list(model.named_modules()):
        swap = SWAPS.get(type(mod))
        if swap is None:
            continue
        new = swap(c, mod, model.gguf_name(path))
        for pname, p in mod.named_parameters(recurse=False):  # e.g. a router's extra "scale"
            if pname not in ("weight", "bias"):
                new.register_parameter(pname, p)
        model.set_submodule(path, new)


def _fuse(model: nn.Module) -> None:
    """One matmul for the projections a module lists in its ``FUSE`` table, where the kernels allow."""
    for mod in list(model.modules()):
        for attr, parts in (getattr(mod, "FUSE", None) or {}).items():
            members = [getattr(mod, p, None) for p in parts]
            if all(isinstance(m, QuantLinear) for m in members):
                setattr(mod, attr, fuse(members))


@contextlib.contextmanager
def _skip_init():
    """No random initialisation while building on ``meta``: every weight is replaced from the file,
    and ``nn.Embedding``'s init would import ``torch._dynamo`` (~2 s and ~150 MiB on first use)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def load_model(path: str | os.PathLike, device: torch.device, n_ctx: int,
               header: GGUFFile | None = None, numerics: str = "fast", offload_layers: int = 0,
               expert_cache: int = 0) -> tuple[Transformer, LoadReport]:
    """Build the model of GGUF ``path`` on ``device`` with caches for ``n_ctx`` positions.

    ``offload_layers``: the MoE experts of layers ``0 .. offload_layers - 1`` stay in host memory,
    copied to the device on demand (:mod:`edgeinfer.kernels.expert_offload`; ``expert_cache`` per
    projection stay cached there). On a CPU device everything is in host memory: nothing changes.

    ``numerics="llama.cpp"`` swaps in llama.cpp's roundings instead of the fast kernels
    (:mod:`edgeinfer.kernels.ggml_numerics`): 8-bit activation blocks in every quantized
    matmul, an fp16 KV cache, fp16 Q and softmax in attention.

    Raises:
        InvalidModelError: unsupported architecture or tensor type, missing, misshapen or
            unknown tensors.
    """
    path = Path(path)
    h = header or validate_gguf(path)
    arch_name, metadata = h.stock_view()  # a --torch-only file reads as its stock architecture
    arch = architecture(arch_name, str(path))
    tensors = {t.name: t for t in h.tensors}
    for t in h.tensors:
        if t.qtype not in SUPPORTED:
            raise InvalidModelError(f"{path}: tensor {t.name} is {t.qtype.name}, which the torch engine cannot "
                                    f"read (supported: {', '.join(q.name for q in SUPPORTED)}); "
                                    "use --backend llama.cpp or re-quantize")
    args = arch.args_from_gguf(metadata, {n: t.shape for n, t in tensors.items()}, str(path))
    with torch.device("meta"), _skip_init():
        model = arch.build(args)
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file never touched
    c = _Ctx(path, h, mm, tensors, device, numerics, LoadReport(), model, offload_layers=offload_layers,
             expert_cache=expert_cache)
    if offload_layers and device.type == "cpu" and not OFFLOAD_ON_CPU:
        log.info("expert offload: on a CPU device every expert is in host memory already; nothing to offload")
    _swap_modules(c, model)
    floats = {}
    for pname, p in model.named_parameters():
        if p.device.type != "meta":
            continue
        mod_path, _, attr = pname.rpartition(".")
        floats[pname] = c.floats(model.gguf_name(mod_path) + "." + attr, tuple(p.shape))
    for gname, attr in model.OPTIONAL.items():
        if gname in tensors:
            setattr(model, attr, c.floats(gname, (tensors[gname].n_elements,)).cpu())
    unknown = sorted(set(tensors) - c.used - model.unread)
    if unknown:
        raise InvalidModelError(f"{path}: tensors {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''} are not "
                                f"used by the torch engine's {h.architecture} model (an unsupported variant?); "
                                "use --backend llama.cpp")
    model.load_state_dict(floats, strict=False, assign=True)
    _fuse(model)
    _release_pages(mm)
    cache_dtype = torch.float32 if device.type == "cpu" else torch.float16
    if numerics == "llama.cpp":
        cache_dtype = torch.float16  # llama.cpp's default type_k / type_v
        for m in model.modules():
            if isinstance(m, Attention):
                m.core = ggml_numerics.attention
    model.setup(n_ctx, device, cache_dtype)
    return model, c.report
