"""Triton kernels that fuse GGML dequantization with the matmul (CUDA; CPU under TRITON_INTERPRET=1).

``y[M, N] = x[M, K] @ W[N, K].T`` where ``W`` stays in its GGML blocks (uint8 [N, row_bytes]).
Both kernels walk K in 32-element groups (one Q*_0/Q*_1 block, one Q4_K/Q5_K sub-block, two Q6_K
scale groups) and dequantize a [BLOCK_N, 32] tile in registers with :func:`_dequant_tile`:

* :func:`_gemv_kernel` (decode, M <= 8): one program per (row of x, BLOCK_N outputs), a
  multiply-reduce per tile -- memory bound, each weight byte read once per row of x;
* :func:`_mm_kernel` (prefill): [BLOCK_M, BLOCK_N] output tiles, ``tl.dot`` on each dequantized
  tile (fp16 operands, fp32 accumulation on GPU; fp32 operands under the interpreter, whose
  low-precision ``tl.dot`` is not faithful).

Bit layouts follow ``dequantize_row_*`` in ggml/src/ggml-quants.c (see :mod:`.dequant` for the
table); the oracle is :func:`edgeinfer.kernels.dequant.dequantize` + a float64 matmul
(``tests/test_kernels_triton.py``).
"""

from __future__ import annotations

import os

import gguf
import torch
import triton
import triton.language as tl

T = gguf.GGMLQuantizationType

# type codes passed to the kernels as constexpr
_CODES = {T.Q8_0: 0, T.Q4_0: 1, T.Q4_1: 2, T.Q5_0: 3, T.Q5_1: 4, T.Q4_K: 5, T.Q5_K: 6, T.Q6_K: 7}
#: Types with a fused Triton kernel.
SUPPORTED = tuple(_CODES)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMV_MAX_M = 8


@triton.jit
def _f16_at(ptr):
    """Load a little-endian fp16 from two bytes at ``ptr`` (any shape) -> fp32."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _dequant_tile(w_ptr, rows, row_bytes, kb, QT: tl.constexpr):
    """Dequantize the 32-wide column group ``kb`` of weight rows ``rows`` [BN] -> [BN, 32] fp32."""
    i = tl.arange(0, 32)[None, :]  # [1, 32] element within the group
    base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes  # [BN, 1] row start
    if QT == 0:  # Q8_0: d, qs[32]
        blk = base + kb * 34
        d = _f16_at(blk)
        q = tl.load(blk + 2 + i).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * d
    elif QT == 1:  # Q4_0: d, qs[16]; elements 0..15 low nibbles, 16..31 high nibbles
        blk = base + kb * 18
        d = _f16_at(blk)
        q = (_byte(blk + 2 + (i % 16)) >> ((i // 16) * 4)) & 15
        w = d * (q - 8).to(tl.float32)
    elif QT == 2:  # Q4_1: d, m, qs[16]
        blk = base + kb * 20
        d = _f16_at(blk)
        m = _f16_at(blk + 2)
        q = (_byte(blk + 4 + (i % 16)) >> ((i // 16) * 4)) & 15
        w = d * q.to(tl.float32) + m
    elif QT == 3:  # Q5_0: d, qh(u32), qs[16]
        blk = base + kb * 22
        d = _f16_at(blk)
        hb = (_byte(blk + 2 + i // 8) >> (i % 8)) & 1
        q = ((_byte(blk + 6 + (i % 16)) >> ((i // 16) * 4)) & 15) | (hb << 4)
        w = d * (q - 16).to(tl.float32)
    elif QT == 4:  # Q5_1: d, m, qh(u32), qs[16]
        blk = base + kb * 24
        d = _f16_at(blk)
        m = _f16_at(blk + 2)
        hb = (_byte(blk + 4 + i // 8) >> (i % 8)) & 1
        q = ((_byte(blk + 8 + (i % 16)) >> ((i // 16) * 4)) & 15) | (hb << 4)
        w = d * q.to(tl.float32) + m
    elif QT == 5 or QT == 6:  # Q4_K / Q5_K: 256-element super-block, sub-block j of 32
        blk = base + (kb // 8) * (144 + (QT - 5) * 32)  # block bytes: 144 (Q4_K), 176 (Q5_K)
        j = kb % 8
        d = _f16_at(blk)
        dmin = _f16_at(blk + 2)
        if j < 4:
            sc = _byte(blk + 4 + j) & 63
            mn = _byte(blk + 8 + j) & 63
        else:
            sc = (_byte(blk + 8 + j) & 15) | ((_byte(blk + j) >> 6) << 4)
            mn = (_byte(blk + 8 + j) >> 4) | ((_byte(blk + 4 + j) >> 6) << 4)
        q = (_byte(blk + 16 + (QT - 5) * 32 + (j // 2) * 32 + i) >> ((j % 2) * 4)) & 15
        if QT == 6:
            q = q | (((_byte(blk + 16 + i) >> j) & 1) << 4)
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    else:  # Q6_K: ql[128], qh[64], scales int8[16], d; group g of 32 inside half h
        blk = base + (kb // 8) * 210
        e0 = (kb % 8) * 32
        h = e0 // 128
        g = (e0 % 128) // 32
        lo = (_byte(blk + h * 64 + (g % 2) * 32 + i) >> ((g // 2) * 4)) & 15
        hi = (_byte(blk + 128 + h * 32 + i) >> (2 * g)) & 3
        q = (lo | (hi << 4)) - 32
        sc = tl.load(blk + 192 + h * 8 + i // 16 + 2 * g).to(tl.int8, bitcast=True).to(tl.float32)
        d = _f16_at(blk + 208)
        w = (d * sc) * q.to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, row_bytes, stride_xm, stride_ym,
                 QT: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n0:n0+BN] = sum_k x[m, k] * W[n, k]; grid = (M, cdiv(N, BLOCK_N))."""
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows_c = tl.where(rmask, rows, 0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kb in range(0, K // 32):
        xk = tl.load(x_ptr + m * stride_xm + kb * 32 + tl.arange(0, 32)).to(tl.float32)  # [32]
        w = _dequant_tile(w_ptr, rows_c, row_bytes, kb, QT)  # [BN, 32]
        acc += tl.sum(w * xk[None, :], axis=1)
    tl.store(y_ptr + m * stride_ym + rows, acc, mask=rmask)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, row_bytes, stride_xm, stride_ym,
               QT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """Tiled y = x @ W.T; grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rows_c = tl.where(rows < N, rows, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, K // 32):
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kb * 32 + tl.arange(0, 32)[None, :],
                     mask=mmask[:, None], other=0.0)  # [BM, 32]
        w = _dequant_tile(w_ptr, rows_c, row_bytes, kb, QT)  # [BN, 32]
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w))
        else:
            acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)))
    tl.store(y_ptr + offs_m[:, None] * stride_ym + rows[None, :], acc,
             mask=mmask[:, None] & (rows[None, :] < N))


def qmatmul(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, *, force: str | None = None) -> torch.Tensor:
    """``x @ dequantize(raw).T`` with a fused kernel.

    Args:
        x: [M, K] float activations (same device as ``raw``).
        raw: uint8 [N, row_bytes] GGML blocks, contiguous.
        qtype: one of :data:`SUPPORTED`.
        n: N.
        force: ``"gemv"`` or ``"mm"`` to pick the kernel (tests); default by M.
    Returns:
        float32 [M, N].
    """
    m, k = x.shape
    if k % 32 or (qtype in (T.Q4_K, T.Q5_K, T.Q6_K) and k % 256):
        raise ValueError(f"K={k} is not a whole number of {qtype.name} blocks")
    x = x.contiguous()
    raw = raw.contiguous()
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    qt = _CODES[T(qtype)]
    kind = force or ("gemv" if m <= GEMV_MAX_M else "mm")
    if kind == "gemv":
        bn = 16 if INTERPRET else 64
        _gemv_kernel[(m, triton.cdiv(n, bn))](x, raw, y, n, k, raw.shape[1], x.stride(0), y.stride(0),
                                              QT=qt, BLOCK_N=bn)
    else:
        bm, bn = (16, 16) if INTERPRET else (64, 64)
        _mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](x, raw, y, m, n, k, raw.shape[1], x.stride(0),
                                                            y.stride(0), QT=qt, BLOCK_M=bm, BLOCK_N=bn,
                                                            DOT_FP32=INTERPRET)
    return y
