"""K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), byte-identical to llama.cpp.

Reference: ggml/src/ggml-quants.c (``quantize_row_qX_K_ref`` without an importance
matrix, ``quantize_row_qX_K_impl`` with one).  The per-group scale searches
(``make_qx_quants`` and friends) come from :mod:`edgeinfer.quant.searches` (compiled, or
the numpy reference in :mod:`edgeinfer.quant.kquants_search`, which documents how C's
float32 order is kept); this module builds the blocks around them:
super-block scales (fp16, nearest-even like ggml), 6/8-bit sub-block scales, the final
re-quantization against the stored scales, and the bit packing.  Rows are cut into
chunks of ``_CHUNK_BLOCKS`` blocks (a cache-sized working set) that a thread pool
encodes in parallel (numpy releases the GIL).

The public entry point is :func:`quantize_k` (rows of float32 in, GGUF block bytes out).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from .kquants_search import F32, _GROUP_MAX_EPS, _first_absmax, _fp16, _nint_i, _u16
from .searches import make_q3, make_qkx, make_qp, make_qx, requant, rowsum, weights_rms_abs

QK_K = 256


class KQuantError(ValueError):
    """Input that a K-quant encoder cannot take (wrong shape, dtype, imatrix size)."""


# ------------------------------------------------------------------------- helpers

def _block_sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    """factor * sum(x^2 over the 256 values, in order) / 256 per block [nb] -> [nb]."""
    s = rowsum(x * x)
    return (F32(factor) * s) / F32(QK_K)


def _imatrix_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """qw * sqrtf(sigma2 + x*x) per value: [nb, 256]."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def _subscale_codes(v: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The unweighted quantization of a block's sub-block scales (or mins) v [nb, nsub].

    Returns (nearest_int(top / max * v) as int32 [nb, nsub], 0 where max <= 0; max [nb], >= 0).
    """
    mx = np.maximum(v.max(axis=1), F32(0))
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(mx > 0, F32(top) / mx, F32(0))
    return _nint_i(inv[:, None] * v), mx


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins [nb, 8] (uint8) into the 12-byte K4/K5 layout."""
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``get_scale_min_k4`` for j = 0..7: [nb, 12] -> (sc [nb, 8], m [nb, 8])."""
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    m = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def _requant(x, L, d, dm, lo, hi):
    """Final levels of blocks x [nb, 256] against the stored sub-block scales d (offsets dm) [nb, nsub].

    ``clamp(nearest_int((x + dm)/d), lo, hi) - lo`` (``x/d`` without dm); sub-blocks with
    d == 0 keep their levels L [nb, 256].  uint8 [nb, 256].
    """
    nb, nsub = d.shape
    rows = (nb * nsub, QK_K // nsub)
    new = requant(x.reshape(rows), L.reshape(rows), d.reshape(-1), None if dm is None else dm.reshape(-1), lo, hi)
    return new.reshape(nb, QK_K)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits: [nb, 256] (values 0..3) -> [nb, 64]."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


# ------------------------------------------------------------------- block encoders
# Each takes x [nb, 256] float32 and qw [nb, 256] float32 (importance weights of the
# columns these values sit in) or None, and returns the GGUF blocks [nb, type_size].

def _encode_q45(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> np.ndarray:
    """Q4_K (nmax 15) / Q5_K (nmax 31): ``quantize_row_q{4,5}_K_ref`` / ``_impl``."""
    nb = x.shape[0]
    xg = x.reshape(nb * 8, 32)                                    # one row per group of 32
    if qw is None:
        wg = weights_rms_abs(xg)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx(xg, wg, nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        cs, max_scale = _subscale_codes(scales, 63)
        cm, max_min = _subscale_codes(mins, 63)
        ls = np.minimum(cs & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(cm & 0xFF, 63).astype(np.uint8)
        d_bits, d16 = _fp16(max_scale / F32(63))
        m_bits, m16 = _fp16(max_min / F32(63))
    else:
        w = _imatrix_weights(x, qw, _block_sigma2(x, 2.0))
        wg = w.reshape(nb * 8, 32)
        sw = rowsum(wg).reshape(nb, 8)
        scales, mins, L = make_qkx(xg, wg, nmax, -0.9, 0.05, 36, False)
        d_block, ls = make_qp(scales.reshape(nb, 8), 63, sw)     # one row of 8 scales per block
        m_block, lm = make_qp(mins.reshape(nb, 8), 63, sw)
        if nmax == 31:                                            # only q5_K_impl clamps
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        d_bits, d16 = _fp16(d_block)
        m_bits, m16 = _fp16(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    d = d16[:, None] * sc.astype(F32)
    dm = m16[:, None] * m.astype(F32)
    L = _requant(x, L, d, dm, 0, nmax)
    Lq = L.reshape(nb, 4, 2, 32)                                  # [nb, chunk, half, l]
    qs = ((Lq[:, :, 0] & 0xF) | ((Lq[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    head = [_u16(d_bits), _u16(m_bits), packed]
    if nmax == 15:
        return np.concatenate(head + [qs], axis=1)
    hi = (Lq >> 4).reshape(nb, 8, 32)                             # bit 2c (+1) for chunk c
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):
        qh |= hi[:, k] << k
    return np.concatenate(head + [qh, qs], axis=1)


def _encode_q6(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q6_K: ``quantize_row_q6_K_ref`` / ``_impl`` (210 bytes per block)."""
    nb = x.shape[0]
    xg = x.reshape(nb * 16, 16)                                   # one row per group of 16
    wg = xg * xg if qw is None else qw.reshape(nb * 16, 16)
    scales, L = make_qx(xg, 32, wg)
    sc = scales.reshape(nb, 16)
    amax, vmax = _first_absmax(np.ascontiguousarray(sc.T))
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    iscale = F32(-128) / vmax
    d_bits, d16 = _fp16(F32(1) / iscale)
    q = np.minimum(_nint_i(iscale[:, None] * sc), 127).astype(np.int8)
    d = d16[:, None] * q.astype(F32)
    L = _requant(x, L, d, None, -32, 31)
    Lq = L.reshape(nb, 2, 4, 32)                                  # [nb, half, quarter, l]
    lo = Lq & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                        axis=2).reshape(nb, 128)
    hi = Lq >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, q.view(np.uint8), _u16(d_bits)], axis=1)
    out[zero] = 0
    return out


def _encode_q3(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q3_K: ``quantize_row_q3_K_ref`` / ``_impl`` (110 bytes per block)."""
    nb = x.shape[0]
    xg = x.reshape(nb * 16, 16)                                   # one row per group of 16
    if qw is None:
        scales, L = make_q3(xg, 4)
        sc = scales.reshape(nb, 16)
        amax, vmax = _first_absmax(np.ascontiguousarray(sc.T))
        has = vmax != 0
        iscale = F32(-32) / np.where(has, vmax, F32(1))
        l = (_nint_i(iscale[:, None] * sc) & 0xFF).astype(np.int8).astype(np.int32)
        ls = np.where(has[:, None], np.clip(l, -32, 31) + 32, 0)
        d_bits, d16 = _fp16(np.where(has, F32(1) / iscale, F32(0)))
        sgn = np.where(has[:, None], ls - 32, -32)
    else:
        w = _imatrix_weights(x, qw, _block_sigma2(x, 2.0))
        wg = w.reshape(nb * 16, 16)
        sw = rowsum(wg).reshape(nb, 16)
        scales, L = make_qx(xg, 4, wg)
        d_block, Ls = make_qx(scales.reshape(nb, 16), 32, sw)   # one row of 16 scales per block
        ls = Ls.astype(np.int32)
        d_bits, d16 = _fp16(d_block)
        sgn = ls - 32
    d = d16[:, None] * sgn.astype(F32)
    L = _requant(x, L, d, None, -4, 3)
    ls = ls.astype(np.uint8)
    s = np.zeros((nb, 12), dtype=np.uint8)
    s[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    for j in range(16):
        s[:, 8 + j % 4] |= (ls[:, j] >> 4) << (2 * (j // 4))
    Lk = L.reshape(nb, 8, 32)
    high = Lk > 3
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):
        hmask |= high[:, k].astype(np.uint8) << k
    L = np.where(high, Lk - 4, Lk).reshape(nb, QK_K)
    return np.concatenate([hmask, _pack_2bit(L), s, _u16(d_bits)], axis=1)


def _encode_q2(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q2_K: ``quantize_row_q2_K_ref`` / ``_impl`` (84 bytes per block)."""
    nb = x.shape[0]
    xg = x.reshape(nb * 16, 16)                                   # one row per group of 16
    if qw is None:
        scales, mins, L = make_qkx(xg, np.abs(xg), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        cs, max_scale = _subscale_codes(scales, 15)
        cm, max_min = _subscale_codes(mins, 15)
        sb = (cs & 0xFF).astype(np.uint8)
        sb |= ((cm << 4) & 0xFF).astype(np.uint8)
        d_bits, d16 = _fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
        m_bits, m16 = _fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    else:
        w = _imatrix_weights(x, qw, _block_sigma2(x, 1.0))
        wg = w.reshape(nb * 16, 16)
        sw = rowsum(wg).reshape(nb, 16)
        scales, mins, L = make_qkx(xg, wg, 3, -0.9, 0.05, 36, False)
        dm, Ls = make_qp(scales.reshape(nb, 16), 15, sw)        # one row of 16 scales per block
        mm, Lm = make_qp(mins.reshape(nb, 16), 15, sw)
        sb = (Ls | (Lm << 4)).astype(np.uint8)
        d_bits, d16 = _fp16(dm)
        m_bits, m16 = _fp16(mm)
    d = d16[:, None] * (sb & 0xF).astype(F32)
    dmin = m16[:, None] * (sb >> 4).astype(F32)
    L = _requant(x, L, d, dmin, 0, 3)
    return np.concatenate([sb, _pack_2bit(L), _u16(d_bits), _u16(m_bits)], axis=1)


_ENCODERS = {
    QT.Q2_K: _encode_q2,
    QT.Q3_K: _encode_q3,
    QT.Q4_K: lambda x, qw: _encode_q45(x, qw, 15),
    QT.Q5_K: lambda x, qw: _encode_q45(x, qw, 31),
    QT.Q6_K: _encode_q6,
}
K_TYPES = tuple(_ENCODERS)

# blocks per work item (~1 MB of float32): big enough that the per-call overhead of the
# short per-group loops stays small, small enough to keep temporaries in cache
_CHUNK_BLOCKS = 1024


def quantize_k(x: np.ndarray, qtype: QT, imatrix: np.ndarray | None = None,
               n_threads: int | None = None) -> np.ndarray:
    """Quantize rows of float32 to a K-quant type, byte-identical to llama.cpp.

    Args:
        x: float32 [rows, cols] (a 1-D array is one row) or stacked experts
            [n_expert, rows, cols]; cols must be a multiple of 256.
        qtype: one of ``K_TYPES`` (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).
        imatrix: optional importance weights [cols] (float32, one per column, as in a
            llama.cpp imatrix entry; [n_expert * cols] for stacked experts); with it the ``quantize_qX_K(..., quant_weights)``
            path is followed, without it the ``_ref`` path (what ``llama_model_quantize``
            runs with no imatrix).
        n_threads: worker threads (default: all cores); numpy releases the GIL.
    Returns:
        uint8 [rows, cols // 256 * type_size] (or [n_expert, rows, ...]), the GGUF tensor data.
    Raises:
        KQuantError: wrong type, shape or dtype, a non-finite value, or a wrong imatrix length.
    """
    if qtype not in _ENCODERS:
        raise KQuantError(f"{QT(qtype).name} is not a K-quant type this encoder writes "
                          f"(supported: {', '.join(t.name for t in K_TYPES)})")
    x = np.asarray(x)
    if x.dtype != F32:
        raise KQuantError(f"K-quant input must be float32, got {x.dtype}; convert with .astype(np.float32)")
    if x.ndim == 3:                           # stacked experts: one imatrix vector per expert
        n_exp, cols = x.shape[0], x.shape[2]
        ims = [None] * n_exp
        if imatrix is not None:
            imatrix = np.asarray(imatrix, dtype=F32).reshape(-1)
            if imatrix.size not in (cols, n_exp * cols):
                raise KQuantError(f"imatrix has {imatrix.size} entries but the expert tensor needs "
                                  f"{cols} or {n_exp} x {cols}; it was computed for another model")
            ims = [imatrix[(e * cols) % imatrix.size:][:cols] for e in range(n_exp)]
        return np.stack([quantize_k(x[e], qtype, ims[e], n_threads) for e in range(n_exp)])
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise KQuantError(f"K-quant input must be [rows, cols] with cols a multiple of {QK_K}, "
                          f"got shape {tuple(x.shape)}; use a 32-block type (Q5_0/Q8_0) for this tensor")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise KQuantError(f"K-quant input has a non-finite value at row {bad[0]}, column {bad[1]}; "
                          "llama.cpp refuses such tensors too (check the source checkpoint)")
    rows, cols = x.shape
    nbr = cols // QK_K
    type_size = GGML_QUANT_SIZES[qtype][1]
    qwb = None
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=F32).reshape(-1)
        if imatrix.shape[0] != cols:
            raise KQuantError(f"imatrix has {imatrix.shape[0]} entries but the tensor rows have {cols} "
                              "columns; the imatrix was computed for a different model or tensor")
        if not np.isfinite(imatrix).all():
            raise KQuantError("imatrix contains non-finite values (as llama.cpp, refusing to use it)")
        qwb = imatrix.reshape(nbr, QK_K)
    blocks = np.ascontiguousarray(x).reshape(rows * nbr, QK_K)
    nb = blocks.shape[0]
    out = np.empty((nb, type_size), dtype=np.uint8)
    enc = _ENCODERS[qtype]

    def work(start: int) -> None:
        stop = min(nb, start + _CHUNK_BLOCKS)
        qw = None if qwb is None else qwb[np.arange(start, stop) % nbr]
        out[start:stop] = enc(blocks[start:stop], qw)

    starts = range(0, nb, _CHUNK_BLOCKS)
    n_threads = n_threads or os.cpu_count() or 1
    if n_threads <= 1 or nb <= _CHUNK_BLOCKS:
        for s in starts:
            work(s)
    else:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(work, starts))
    return out.reshape(rows, nbr * type_size)
