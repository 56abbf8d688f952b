"""Quantized linear and embedding layers: GGML blocks in, the best kernel per device.

A :class:`QuantLinear` replaces an ``nn.Linear`` of a model built on ``meta``; which kernel it
uses is decided by the tensor's GGML type and the device, never by the model:

======  =========================================================  ===============================
device  fast path                                                  fallback
======  =========================================================  ===============================
cuda    Triton fused dequant+GEMV (decode) / tiled matmul (prefill)  bounded dequant + fp16 matmul
mps     bounded dequant (torch ops) + fp16 matmul                    (same)
cpu     GGML blocks as stored, int8 dot products (:mod:`ggml_cpu`)   torch int4 planes (:mod:`cpu_packed`),
                                                                     then bounded dequant + fp32 matmul
======  =========================================================  ===============================

With ``numerics="llama.cpp"`` every layer instead reproduces llama.cpp's CPU roundings (8-bit
activation blocks, see :mod:`ggml_numerics`): a parity mode, slow and 4 bytes per weight.

F32/F16/BF16 weights are plain float tensors (they are not quantized). The raw uint8 blocks of a
memory-mapped GGUF stay mapped on CPU until a path needs them elsewhere.
"""

from __future__ import annotations

import logging

import gguf
import torch
from torch import nn

from edgeinfer.kernels import cpu_packed, ggml_cpu
from edgeinfer.kernels.ggml_numerics import GGMLMatmul
from edgeinfer.kernels.dequant import dequantize

T = gguf.GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
log = logging.getLogger(__name__)


#: Tests only: force a path on any device ("triton" runs the fused kernels, e.g. under
#: TRITON_INTERPRET=1 on CPU; "dequant" the bounded dequantize path). None = choose by device.
FORCE_PATH: str | None = None


def _triton_types() -> tuple:
    from edgeinfer.kernels import triton_qmm

    return triton_qmm.SUPPORTED


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with ``W`` [N, K] kept in its GGML block format.

    Args:
        raw: uint8 [N, row_bytes] (or a float [N, K] tensor for F32/F16/BF16 files).
        qtype: GGML type of ``raw``.
        n, k: output / input features.
        bias: optional float32 [N].
        device: where the layer runs.
        name: tensor name, for error messages and the load report.
        numerics: "fast" (the device's kernels) or "llama.cpp" (:class:`GGMLMatmul`, path "ggml").
    """

    def __init__(self, raw: torch.Tensor, qtype: T, n: int, k: int, bias: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", name: str = "", numerics: str = "fast"):
        super().__init__()
        self.qtype, self.in_features, self.out_features, self.name = T(qtype), k, n, name
        self.device = torch.device(device)
        self.bias = None if bias is None else bias.to(self.device, torch.float32)
        self.packed = None
        self.native = None
        self.weight = None
        self.raw = None
        self.ggml = None
        dev = self.device.type
        if numerics == "llama.cpp":
            self.ggml = GGMLMatmul(raw, self.qtype, n, k, self.device)
            self.path = "ggml"
        elif FORCE_PATH and self.qtype not in FLOAT_TYPES:
            self.raw = raw.to(self.device)
            self.path = FORCE_PATH
        elif self.qtype == T.F16 and dev == "cpu" and ggml_cpu.can_run(self.qtype, n, k):
            halves = raw if raw.dtype == torch.uint8 else raw.view(torch.uint8)  # the file's halves, not widened
            self.native = ggml_cpu.GGMLCPU([(halves.reshape(n, 2 * k), self.qtype, n, k)])
            self.path = "ggml-cpu"
        elif self.qtype in FLOAT_TYPES:
            w = dequantize(raw, self.qtype) if raw.dtype == torch.uint8 else raw
            dt = torch.float32 if dev == "cpu" else torch.float16
            self.weight = w.reshape(n, k).to(self.device, dt)
            self.path = "dense"
        elif dev == "cpu" and ggml_cpu.can_run(self.qtype, n, k):
            self.native = ggml_cpu.GGMLCPU([(raw, self.qtype, n, k)])  # the mapped blocks, no copy
            self.path = "ggml-cpu"
        elif dev == "cpu" and cpu_packed.can_pack(self.qtype, n, k):
            self.packed = cpu_packed.PackedCPU(raw, self.qtype, n, k)
            self.path = "cpu-packed"
        elif dev == "cuda" and self.qtype in _triton_types():
            self.raw = raw.to(self.device)
            self.path = "triton"
        else:
            self.raw = raw.to(self.device)
            self.path = "dequant"

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.qtype.name}, path={self.path}"

    def nbytes(self) -> int:
        """Bytes this layer's weights occupy on its device."""
        if self.packed is not None:
            return self.packed.nbytes()
        if self.native is not None:
            return self.native.nbytes()
        if self.ggml is not None:
            return self.ggml.nbytes()
        t = self.weight if self.weight is not None else self.raw
        return t.numel() * t.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path == "ggml-cpu":
            y = self.native.matmul(x2)
        elif self.path == "cpu-packed":
            y = self.packed.matmul(x2)
        elif self.path == "ggml":
            y = self.ggml(x2)
        elif self.path == "dense":
            y = torch.nn.functional.linear(x2.to(self.weight.dtype), self.weight).float()
        elif self.path == "triton":
            from edgeinfer.kernels import triton_qmm

            y = triton_qmm.qmatmul(x2, self.raw, self.qtype, self.out_features)
        else:
            cdt = torch.float32 if self.device.type == "cpu" else torch.float16
            y = cpu_packed.dequant_linear(x2, self.raw, self.qtype, self.out_features, cdt).float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class FusedLinear(nn.Module):
    """Several :class:`QuantLinear` s that read the same input, computed as one matmul.

    Built by :func:`fuse` (q/k/v, gate/up); returns the parts' outputs as a tuple. The parts give
    their weights to this module (they are not called afterwards).
    """

    def __init__(self, parts: list[QuantLinear]):
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self.names = [p.name for p in parts]  # GGUF names of the parts, in output order
        self.in_features, self.out_features = parts[0].in_features, sum(self.sizes)
        self.qtype = parts[0].qtype
        self.qtypes = [p.qtype for p in parts]
        self.path = parts[0].path
        if self.path == "ggml-cpu":  # one call over the parts' blocks (types may differ: Q4_K q/k, Q6_K v)
            self.packed = ggml_cpu.GGMLCPU.concat([p.native for p in parts])
        else:
            self.packed = cpu_packed.PackedCPU.concat([p.packed for p in parts])
        self.biases = [p.bias for p in parts]
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        self.bias = torch.cat(biases) if any(p.bias is not None for p in parts) else None
        for p in parts:
            p.packed, p.native, p.path = None, None, "fused"

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.sizes}, {self.qtype.name}, path={self.path} (fused)"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [..., K] -> one [..., N_i] float32 tensor per part."""
        lead = x.shape[:-1]
        y = self.packed.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return tuple(t.reshape(*lead, t.shape[-1]) for t in y.split(self.sizes, dim=-1))


def fuse(parts: list) -> FusedLinear | None:
    """A :class:`FusedLinear` of ``parts`` if they share input size and a CPU path that fuses, else None.

    ``ggml-cpu``: any types (one kernel call reads each part's blocks); ``cpu-packed``: one type and
    row counts that are multiples of 64 (the packed layout's tiles), but the last.
    """
    if not all(isinstance(p, QuantLinear) for p in parts) or len({p.in_features for p in parts}) != 1:
        return None
    if all(p.path == "ggml-cpu" for p in parts):
        return FusedLinear(parts)
    if not all(p.path == "cpu-packed" for p in parts):
        return None
    if len({p.qtype for p in parts}) != 1 or any(p.out_features % 64 for p in parts[:-1]):
        return None
    return FusedLinear(parts)


class QuantEmbedding(nn.Module):
    """Token (or per-layer) embedding looked up from GGML blocks: only the requested rows are read
    and dequantized.

    Args:
        raw: uint8 [V, row_bytes] (memory-mapped).
        qtype: GGML type; dim: embedding width.
        device: where the looked-up rows are used.
        host: keep the table in host memory (the memory map): rows are gathered and dequantized on
            the CPU and only those rows reach ``device`` -- llama.cpp's input layer does the same.
            ``False`` copies the whole table to ``device`` first.
    """

    def __init__(self, raw: torch.Tensor, qtype: T, dim: int, device: torch.device | str = "cpu", host: bool = True):
        super().__init__()
        self.qtype, self.dim, self.device = T(qtype), dim, torch.device(device)
        self.host = host or self.device.type == "cpu"
        self.raw = raw if self.host else raw.to(self.device)

    def extra_repr(self) -> str:
        return f"{self.raw.shape[0]} x {self.dim}, {self.qtype.name}, {'host rows' if self.host else 'on device'}"

    def nbytes(self) -> int:
        """Bytes of the table held on the device (0 when it stays in the host memory map)."""
        return 0 if self.host else self.raw.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, S] int64 -> [B, S, D] float32 on ``device``."""
        rows = self.raw[ids.to(self.raw.device).reshape(-1)]  # only these rows are read from the map
        return dequantize(rows, self.qtype).reshape(*ids.shape, self.dim).to(self.device)


class QuantExpertLinear(nn.Module):
    """One projection of every expert of a MoE layer (GGUF ``ffn_*_exps``), kept in its GGML blocks.

    ``raw`` is the 3-D tensor's bytes ``uint8 [E, N, row_bytes]`` (a view of the memory map);
    expert ``e`` is a :class:`QuantLinear` over the view ``raw[e]``, so each expert takes the same
    kernel path as a dense layer of its type. Replaces :class:`edgeinfer.models.moe.ExpertLinear`.
    """

    def __init__(self, raw: torch.Tensor, qtype: T, n_expert: int, n: int, k: int,
                 device: torch.device | str = "cpu", name: str = "", numerics: str = "fast"):
        super().__init__()
        self.qtype, self.n_expert, self.in_features, self.out_features, self.name = T(qtype), n_expert, k, n, name
        self.experts = nn.ModuleList(QuantLinear(raw[e], qtype, n, k, None, device, f"{name}[{e}]", numerics)
                                     for e in range(n_expert))
        self.path = self.experts[0].path

    def extra_repr(self) -> str:
        return f"{self.n_expert} x {self.in_features}->{self.out_features}, {self.qtype.name}, path={self.path}"

    def expert(self, e: int) -> QuantLinear:
        return self.experts[e]

    def will_use(self, experts: list[int]) -> None:
        """Nothing to prepare: every expert is resident (see :mod:`edgeinfer.kernels.expert_offload`)."""

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in self.experts)
