"""Reference dequantization of GGML block formats in pure torch (any device).

Every function here is bit-exact with the ``gguf`` package's numpy ``gguf.quants.dequantize``
(same float32 operations in the same order: ``d * q`` then ``+ m`` / ``- dm``, no fused
multiply-add). It is the oracle for the fast paths (Triton, packed CPU kernels) and the
fallback path for devices without a specialised kernel (MPS, formats without a fast path).

Block layouts (``ggml/src/ggml-common.h``: ``block_q4_0`` ... ``block_q6_K``), bytes in order:

==========  =====  =====  ==========================================================
type        elems  bytes  layout
==========  =====  =====  ==========================================================
Q8_0        32     34     d:f16, qs:int8[32]
Q4_0        32     18     d:f16, qs:u8[16] (low nibbles = elems 0..15, high = 16..31)
Q4_1        32     20     d:f16, m:f16, qs:u8[16]
Q5_0        32     22     d:f16, qh:u32 (bit i = high bit of elem i), qs:u8[16]
Q5_1        32     24     d:f16, m:f16, qh:u32, qs:u8[16]
Q4_K        256    144    d:f16, dmin:f16, scales:u8[12] (8 x 6-bit scale/min), qs:u8[128]
Q5_K        256    176    d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]
Q6_K        256    210    ql:u8[128], qh:u8[64], scales:int8[16], d:f16
==========  =====  =====  ==========================================================
"""

from __future__ import annotations

import gguf
import torch

from edgeinfer.errors import InvalidModelError

T = gguf.GGMLQuantizationType
QK_K = 256

#: GGML types this module can dequantize: (elements per block, bytes per block).
SUPPORTED = {t: gguf.GGML_QUANT_SIZES[t] for t in (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian IEEE half)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] uint8 -> [n, 32] uint8: low nibbles (elems 0..15) then high nibbles (16..31)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 (a little-endian u32) -> [n, 32] uint8 of its bits, bit i at column i."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], 32)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 scale bytes into 8 six-bit scales and 8 mins (``get_scale_min_k4``).

    Args:
        scales: [n, 12] uint8.
    Returns:
        (sc, m): two [n, 8] uint8 tensors.
    """
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q8_0(b):
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q4_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _nibbles(b[:, 4:]).to(torch.float32)) + m


def _q5_0(b):
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return (d * q.to(torch.float32)) + m


def _k_quant_4_5(b, high_bits: bool):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scale_min(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    qs = b[:, 48:] if high_bits else b[:, 16:]
    # qs: [n, 4, 32] -> sub-blocks 2j (low nibbles) and 2j+1 (high nibbles)
    qs = qs.reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32)
    if high_bits:
        qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
        q = q | ((qh & 1) << 4)
    return (ds * q.to(torch.float32) - dm).reshape(n, QK_K)


def q6_k_codes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks [n, 210] -> (q uint8 [n, 256] in 0..63, s float32 [n, 16]): ``w = s * (q - 32)`` per 16."""
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    s = _f16(b[:, 208:210]) * scales
    lo = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1))
    lo = (lo & 0x0F).reshape(n, 8, 32)
    hi = qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    hi = (hi & 0x03).reshape(n, 8, 32)
    return (lo | (hi << 4)).reshape(n, QK_K), s


def _q6_k(b):
    n = b.shape[0]
    q, s = q6_k_codes(b)
    q = q.to(torch.int8) - 32
    return (s.reshape(n, 16, 1) * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)


_BLOCK_FNS = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q4_K: lambda b: _k_quant_4_5(b, False), T.Q5_K: lambda b: _k_quant_4_5(b, True), T.Q6_K: _q6_k,
}


def row_bytes(qtype: T, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements stored as ``qtype``."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if n_cols % bs:
        raise InvalidModelError(f"rows of {n_cols} elements cannot be stored as {qtype.name} (block size {bs})")
    return n_cols // bs * ts


def dequantize(raw: torch.Tensor, qtype: T) -> torch.Tensor:
    """Dequantize GGML data to float32, like ``gguf.quants.dequantize`` (bit-exact).

    Args:
        raw: uint8 tensor [..., row_bytes] (one row per leading index), on any device.
        qtype: the GGML type of the data.
    Returns:
        float32 tensor [..., row_elements] on ``raw``'s device.
    Raises:
        InvalidModelError: unsupported type or a row length that is not whole blocks.
    """
    qtype = T(qtype)
    if qtype not in SUPPORTED:
        raise InvalidModelError(f"GGML type {qtype.name} is not supported by edgeinfer's torch engine "
                                f"(supported: {', '.join(t.name for t in SUPPORTED)}); re-quantize the model")
    bs, ts = SUPPORTED[qtype]
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGML data must be uint8, got {raw.dtype}")
    lead, nb = raw.shape[:-1], raw.shape[-1]
    if nb % ts:
        raise InvalidModelError(f"{qtype.name} row of {nb} bytes is not a whole number of {ts}-byte blocks")
    n_out = nb // ts * bs
    if qtype == T.F32:
        return raw.contiguous().view(torch.float32).clone()
    if qtype == T.F16:
        return raw.contiguous().view(torch.float16).to(torch.float32)
    if qtype == T.BF16:
        return raw.contiguous().view(torch.bfloat16).to(torch.float32)
    blocks = raw.reshape(-1, ts)
    return _BLOCK_FNS[qtype](blocks).reshape(*lead, n_out)
