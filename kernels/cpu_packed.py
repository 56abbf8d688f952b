"""CPU fast path: GGML blocks repacked for torch's packed int4 / int8 CPU matmul kernels.

Measured on this 2-core AVX-512 machine (``benchmarks/bench_torch_engine.py --kernels``):
torch's ``_weight_int4pack_mm_for_cpu`` and ``_weight_int8pack_mm`` are only vectorized for
bfloat16 activations (fp32/fp16 inputs take a scalar path 20x slower), a bounded
dequantize-to-float + ``F.linear`` is 5-20x slower than either, and fp32 dense GEMV needs 6.4x
the bytes. So the CPU path is:

* Q4_0, Q4_1, Q4_K -> int4pack, group size 32. Those formats are exactly "4-bit code q in
  0..15, per-32 scale s and offset z": torch computes ``w = (q - 8) * s + z``, so
  Q4_0: ``s = d, z = 0``; Q4_1: ``s = d, z = m + 8 d``; Q4_K: ``s = d*sc, z = 8 s - dmin*mn``.
  Codes are kept bit-exact; the (s, z) pairs are held in bfloat16 (what the vectorized kernel
  takes), a relative error <= 2^-9 per block. Memory: 0.5 B/weight + 4 B per 32 (= Q4_1 size).
* Q8_0 -> int8 codes [K/32, N, 32] plus per-block scales; ``_weight_int8pack_mm`` is called
  once per 32-column block with that block's scales (exact structure, bf16 scales) and the
  partial products are summed in fp32. Memory: 1 B/weight + 2 B per 32 (= Q8_0 size).

Every other type uses :func:`dequant_linear`: dequantize a bounded chunk of rows with the
reference dequantizer, multiply, move on (weights stay quantized, at most ``CHUNK_ELEMS``
floats live at once). Oracle: :func:`edgeinfer.kernels.dequant.dequantize` + float64 matmul
(``tests/test_kernels.py`` prints the error of each path).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from edgeinfer.kernels.dequant import dequantize, k_scale_min

T = gguf.GGMLQuantizationType

#: Types with a packed CPU kernel.
PACKED_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0)
#: Largest dequantized chunk (elements) the fallback path materializes at once (16 MiB of fp32).
CHUNK_ELEMS = 1 << 22


def has_int4pack() -> bool:
    """Whether this torch build has the CPU int4 packed kernels."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [..., 1] float32 (little-endian IEEE half)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] uint8 -> [n, 32]: low nibbles (elements 0..15) then high nibbles (16..31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _int4_codes_scales(raw: torch.Tensor, qtype: T, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGML 4-bit blocks -> (codes [N, K] int32 in 0..15, scale [N, K/32], zero [N, K/32]) fp32.

    Done in numpy at load time (torch's uint8 bit ops are not vectorized and were 10x slower).
    """
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    b = raw.cpu().numpy().reshape(-1, ts)
    if qtype == T.Q4_0:
        d = _f16(b[:, :2])
        q, s, z = _nibbles(b[:, 2:]), d, np.zeros_like(d)
    elif qtype == T.Q4_1:
        d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
        q, s, z = _nibbles(b[:, 4:]), d, m + np.float32(8.0) * d
    else:  # Q4_K: 8 sub-blocks of 32 per 256-element super-block
        nb = b.shape[0]
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = (t.numpy() for t in k_scale_min(torch.from_numpy(np.ascontiguousarray(b[:, 4:16]))))
        s = d * sc.astype(np.float32)  # [nb, 8]
        z = np.float32(8.0) * s - dmin * mn.astype(np.float32)
        qs = b[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(nb * 8, 32)
    return (torch.from_numpy(q.reshape(n, k).astype(np.int32)), torch.from_numpy(s.reshape(n, k // 32)),
            torch.from_numpy(z.reshape(n, k // 32)))


class PackedCPU:
    """Weights of one linear layer in torch's packed CPU format (see module docstring).

    Args:
        raw: uint8 [N, row_bytes] GGML blocks of the weight [N, K].
        qtype: Q4_0, Q4_1, Q4_K or Q8_0.
        n, k: output and input features.
    """

    def __init__(self, raw: torch.Tensor, qtype: T, n: int, k: int):
        self.qtype, self.n, self.k = qtype, n, k
        if qtype == T.Q8_0:
            b = raw.cpu().numpy().reshape(n, k // 32, 34)
            # codes: [K/32, N, 32] so that codes[j] is the contiguous [N, 32] weight of block j
            self.codes = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:].transpose(1, 0, 2)).view(np.int8))
            d = _f16(b[:, :, :2]).reshape(n, k // 32)
            self.scales = torch.from_numpy(np.ascontiguousarray(d.T)).to(torch.bfloat16)  # [K/32, N]
        else:
            q, s, z = _int4_codes_scales(raw, qtype, n, k)
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2] uint8
            # [K/32, N, 2] (scale, zero)
            self.scales_zeros = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(torch.bfloat16)

    def nbytes(self) -> int:
        ts = [self.codes, self.scales] if self.qtype == T.Q8_0 else [self.packed, self.scales_zeros]
        return sum(t.numel() * t.element_size() for t in ts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] float -> [M, N] float32."""
        xb = x.to(torch.bfloat16)
        if self.qtype != T.Q8_0:
            return torch._weight_int4pack_mm_for_cpu(xb, self.packed, 32, self.scales_zeros).float()
        y = None
        for j in range(self.k // 32):
            part = torch._weight_int8pack_mm(xb[:, j * 32:(j + 1) * 32], self.codes[j], self.scales[j])
            y = part.float() if y is None else y.add_(part)
        return y


def dequant_linear(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, compute_dtype=torch.float32) -> torch.Tensor:
    """Bounded dequantize-on-the-fly linear: ``x @ dequantize(raw).T`` a chunk of rows at a time.

    Args:
        x: [M, K] activations.
        raw: uint8 [N, row_bytes] weight blocks (any device; torch ops only, so MPS works).
        qtype: GGML type of ``raw``.
        n: output features N.
        compute_dtype: dtype of the matmul (float32 on CPU, float16 on MPS).
    Returns:
        [M, N] in ``compute_dtype``.
    """
    k = x.shape[-1]
    rows = max(1, min(n, CHUNK_ELEMS // max(k, 1)))
    xc = x.to(compute_dtype)
    if rows >= n:
        return F.linear(xc, dequantize(raw, qtype).to(compute_dtype))
    out = torch.empty(x.shape[0], n, dtype=compute_dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out[:, r0:r1] = F.linear(xc, dequantize(raw[r0:r1], qtype).to(compute_dtype))
    return out
