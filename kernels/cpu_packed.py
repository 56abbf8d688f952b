"""CPU fast path: GGML blocks rewritten as int4 bit planes for torch's packed int4 CPU kernel.

Measured on this 2-core AVX-512 machine (``benchmarks/bench_torch_engine.py --kernels``):
torch's ``_weight_int4pack_mm_for_cpu`` is only vectorized for bfloat16 activations (fp32/fp16
inputs take a scalar path ~20x slower); ``_weight_int8pack_mm`` has per-channel scales only, so
Q8_0 needs one call per 32-column block (K=32 dot products: 4-6x slower than two int4 planes);
a bounded dequantize-to-float + ``F.linear`` is 5-20x slower; inductor (``torch.compile``) on a
fused dequant-GEMV expression took 43 s to compile and was slower than the int4 planes. So:

* every type whose groups of 32 weights are ``w = c*s + z`` with integer codes ``c`` -- Q4_0,
  Q4_1, Q4_K (4-bit), Q5_0, Q5_1, Q5_K (5-bit), Q8_0 (8-bit) -- is rewritten exactly in that
  form (:func:`codes_scales`) and packed as one (4-bit) or two (``c = 16*hi + lo``) int4 planes
  (:class:`PackedCPU`). Codes are bit-exact; scale/zero pairs are bf16 (relative error <= 2^-9
  per group) and activations are rounded to bf16 -- measured ~3e-3 relative output error, about
  what llama.cpp's own 8-bit activation quantization costs. Memory: 0.5 B/weight per plane
  + 4 B per 32 per plane (Q4_1: same as the file; Q8_0: 1.25 B/weight vs 1.06 in the file).
* Q6_K has a scale per 16 weights, which the kernel (groups of 32 or more) cannot take. It is
  rewritten exactly as four int4 planes (:func:`q6_k_planes`): for each half of every 32-group,
  its 2 high and 4 low code bits, the other half coded to contribute 0. Decode (up to
  ``Q6K_PLANES_MAX_M`` rows) reads 2.5 B/weight instead of the file's 0.82 and runs ~30x faster
  than dequantizing; above that the bounded dequantize path below (from the memory-mapped file)
  is faster, so prefill takes it. Memory: the planes cost about 3x the Q6_K bytes.
* any other type uses :func:`dequant_linear`: dequantize a bounded chunk of rows with the
  reference dequantizer, multiply, move on (at most ``CHUNK_ELEMS`` floats live at once).

Oracle: :func:`edgeinfer.kernels.dequant.dequantize` + float64 matmul (``tests/test_kernels.py``
prints the error of each path).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from edgeinfer.kernels.dequant import dequantize, k_scale_min, q6_k_codes

T = gguf.GGMLQuantizationType

#: Types whose groups of 32 weights are ``w = c*s + z`` (:func:`codes_scales`).
GROUP32_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K)
#: Types with a packed CPU kernel (Q6_K as four planes, :func:`q6_k_planes`).
PACKED_TYPES = GROUP32_TYPES + (T.Q6_K,)
#: Q6_K: with more activation rows than this (prefill), dequantize + fp32 matmul is faster than the planes.
Q6K_PLANES_MAX_M = 32
#: Rows converted at once when packing (elements), bounding load-time temporaries.
ROW_CHUNK_ELEMS = 1 << 21
#: Largest dequantized chunk (elements) the fallback path materializes at once (16 MiB of fp32).
CHUNK_ELEMS = 1 << 22


def can_pack(qtype: T, n: int, k: int) -> bool:
    """Whether a [n, k] weight of ``qtype`` can take the packed path (the kernel wants N % 16 == 0)."""
    return qtype in PACKED_TYPES and n % 16 == 0 and k % 32 == 0 and has_int4pack()


def has_int4pack() -> bool:
    """Whether this torch build has the CPU int4 packed kernels."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [..., 1] float32 (little-endian IEEE half)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] uint8 -> [n, 32]: low nibbles (elements 0..15) then high nibbles (16..31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[n, 4] uint8 (a little-endian u32) -> [n, 32] with bit i at column i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def codes_scales(raw: torch.Tensor, qtype: T, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rewrite GGML blocks exactly as ``w = c * s + z`` per group of 32 weights.

    Returns:
        (c, s, z): unsigned integer codes [N, K] (uint8; < 2^bits), scales and offsets
        [N, K/32] float32. Layouts: ``dequantize_row_*`` in ggml-quants.c.
    """
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    b = raw.cpu().numpy().reshape(-1, ts)
    if qtype == T.Q8_0:
        d = _f16(b[:, :2])
        c = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        s, z = d, -128.0 * d
    elif qtype in (T.Q4_0, T.Q5_0):
        d = _f16(b[:, :2])
        c = _nibbles(b[:, 2:18] if qtype == T.Q4_0 else b[:, 6:22])
        if qtype == T.Q5_0:
            c = c | (_bits32(b[:, 2:6]) << 4)
        s, z = d, (-8.0 if qtype == T.Q4_0 else -16.0) * d
    elif qtype in (T.Q4_1, T.Q5_1):
        d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
        c = _nibbles(b[:, 4:20] if qtype == T.Q4_1 else b[:, 8:24])
        if qtype == T.Q5_1:
            c = c | (_bits32(b[:, 4:8]) << 4)
        s, z = d, m
    else:  # Q4_K / Q5_K: 8 sub-blocks of 32 per 256-element super-block
        nb = b.shape[0]
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = (t.numpy() for t in k_scale_min(torch.from_numpy(np.ascontiguousarray(b[:, 4:16]))))
        s = d * sc.astype(np.float32)  # [nb, 8]
        z = -(dmin * mn.astype(np.float32))
        qs = b[:, 16:] if qtype == T.Q4_K else b[:, 48:]
        qs = qs.reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        c = (qs & 0x0F).reshape(nb, 8, 32)
        if qtype == T.Q5_K:
            qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            c = c | ((qh & 1) << 4)
    return c.reshape(n, k), np.asarray(s, np.float32).reshape(n, k // 32), np.asarray(z, np.float32).reshape(n, k // 32)


def q6_k_planes(raw: torch.Tensor, n: int, k: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Q6_K rewritten exactly as four group-32 planes ``(c, s, z)`` whose ``c*s + z`` sum to the weights.

    A Q6_K weight is ``w = s16 * (q - 32)`` with ``q = 16*hi + lo`` (hi 0..3, lo 0..15) and one
    scale ``s16`` per 16 weights. For each half h of every 32-group, with ``s`` that half's scale:
    ``hi`` plane: code ``hi + 6`` on h, 8 elsewhere, scale ``16 s``, offset ``-128 s``
    (``16 s (hi - 2)`` on h, 0 elsewhere); ``lo`` plane: code ``lo`` on h, 0 elsewhere, scale
    ``s``, offset 0. Summed: ``s (16 hi + lo - 32) = w``.

    Returns:
        four (codes uint8 [N, K] < 16, scales [N, K/32], offsets [N, K/32]) float32 triples.
    """
    q, s16 = (t.numpy() for t in q6_k_codes(raw.cpu().reshape(-1, gguf.GGML_QUANT_SIZES[T.Q6_K][1])))
    q = q.reshape(n, k)
    hi, lo = q >> 4, q & 15
    s_half = s16.reshape(n, k // 32, 2)                          # [N, K/32, half]
    first = (np.arange(k) % 32) < 16                            # [K]: in the first half of its group
    planes = []
    for h, on in ((0, first), (1, ~first)):
        s = np.ascontiguousarray(s_half[:, :, h])
        planes.append((np.where(on, hi + 6, 8).astype(np.uint8), 16.0 * s, -128.0 * s))
        planes.append((np.where(on, lo, 0).astype(np.uint8), s, np.zeros_like(s)))
    return planes


class PackedCPU:
    """Weights of one linear layer as one or two int4 bit planes for torch's CPU int4 kernel.

    ``w = c*s + z`` (:func:`codes_scales`); 4-bit codes are one plane (kernel scale ``s``, zero
    ``z + 8s``, since the kernel computes ``(q - 8) * scale + zero``); 5- and 8-bit codes are split
    ``c = 16*hi + lo`` into two planes (``hi``: scale ``16s``, zero ``z + 128s`` for Q8_0 -- exactly
    0 -- or code ``hi + 8`` and zero ``z`` for 5-bit codes; ``lo``: scale ``s``, zero ``8s``)
    whose products are summed in fp32. Q6_K takes four planes (:func:`q6_k_planes`) and keeps
    its raw blocks (memory-mapped) for prefill-sized inputs. Codes stay bit-exact; scales/zeros
    are bf16 (what the vectorized kernel takes).

    Args:
        raw: uint8 [N, row_bytes] GGML blocks of the weight [N, K].
        qtype: one of :data:`PACKED_TYPES`.
        n, k: output and input features.
    """

    def __init__(self, raw: torch.Tensor, qtype: T, n: int, k: int):
        self.qtype, self.n, self.k = qtype, n, k
        # rows are packed independently, so large matrices are converted in row chunks
        # (bounds the int32 temporaries the packing op needs: load peak ~ file size)
        # the packed layout tiles rows by 64: chunks (all but the last) must be multiples of 64
        step = max(64, ROW_CHUNK_ELEMS // k // 64 * 64)
        parts = [self._pack(raw[r:r + step], min(step, n - r)) for r in range(0, n, step)]
        self.planes = [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts], dim=1))
                       for i in range(len(parts[0]))]
        # Q6_K: the file's blocks (a view of the mapped file, no copy) serve inputs of many rows
        self.raw_parts = [(raw, n)] if qtype == T.Q6_K else None

    def _pack(self, raw: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        qtype, k = self.qtype, self.k
        if qtype == T.Q6_K:  # the kernel computes (code - 8) * scale + zero: zero = z + 8 s
            planes = [(c, s, z + 8.0 * s) for c, s, z in q6_k_planes(raw, n, k)]
        else:
            c, s, z = codes_scales(raw, qtype, n, k)
            if qtype in (T.Q4_0, T.Q4_1, T.Q4_K):
                planes = [(c, s, z + 8.0 * s)]
            elif qtype == T.Q8_0:  # c = q + 128: the hi plane's zero z + 128 s is exactly 0
                planes = [(c >> 4, 16.0 * s, z + 128.0 * s), (c & 15, s, 8.0 * s)]
            else:  # 5-bit: hi in {0, 1} stored as 8 + hi, so the zero stays z (no large offset to round)
                planes = [((c >> 4) + 8, 16.0 * s, z), (c & 15, s, 8.0 * s)]
        out = []
        for codes, sc, zero in planes:
            packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes.astype(np.int32)), 1)
            sz = torch.from_numpy(np.stack([sc.T, zero.T], axis=-1)).contiguous().to(torch.bfloat16)  # [K/32, N, 2]
            out.append((packed, sz))
        return out

    @classmethod
    def concat(cls, parts: list["PackedCPU"]) -> "PackedCPU":
        """One packed matrix whose rows are ``parts``' rows in order (same type and K): fused projections.

        The packed layout tiles rows by 64, so every part but the last must have a multiple of 64 rows.
        """
        if any(p.n % 64 for p in parts[:-1]):
            raise ValueError("only the last part of a fused matrix may have a row count not divisible by 64")
        out = cls.__new__(cls)
        out.qtype, out.k, out.n = parts[0].qtype, parts[0].k, sum(p.n for p in parts)
        out.planes = [(torch.cat([p.planes[i][0] for p in parts]), torch.cat([p.planes[i][1] for p in parts], dim=1))
                      for i in range(len(parts[0].planes))]
        raws = [p.raw_parts for p in parts]
        out.raw_parts = None if any(r is None for r in raws) else [r for rs in raws for r in rs]
        return out

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + sz.numel() * sz.element_size() for p, sz in self.planes)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] float -> [M, N] float32."""
        if self.raw_parts is not None and x.shape[0] > Q6K_PLANES_MAX_M:
            return torch.cat([dequant_linear(x, raw, self.qtype, n) for raw, n in self.raw_parts], dim=1)
        xb = x.to(torch.bfloat16)
        y = None
        for packed, sz in self.planes:
            part = torch._weight_int4pack_mm_for_cpu(xb, packed, 32, sz).float()
            y = part if y is None else y.add_(part)
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
