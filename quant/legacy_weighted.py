"""Importance-weighted encoders of the legacy 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1), byte-identical to llama.cpp.

Without an importance matrix llama.cpp quantizes these types with ``quantize_row_qX_Y_ref``
(``quantizers.py`` does the same in torch). With one, ``quantize_qX_Y(..., quant_weights)`` runs
``quantize_row_qX_Y_impl`` (ggml/src/ggml-quants.c) instead, per row:

* ``sigma2 = sum(x*x over the whole row, in order) / n_per_row`` (float32);
* per block of 32: ``weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j])``;
* Q4_0 / Q5_0: ``d = make_qx_quants(32, 8 | 16, x, L, rmse_type=1, weight)``, stored ``L = l + nmax``;
* Q4_1 / Q5_1: ``d = make_qkx3_quants(32, 15 | 31, x, weight, L, &the_min, Laux, -0.9, 0.05, 36,
  false)``, ``m = -the_min``.

The searches are :mod:`edgeinfer.quant.searches`' ``make_qx`` and ``make_qkx`` (the same
algorithms the K-quants use, compiled or numpy, in C's float32 order). Q8_0
has no weighted variant (``quantize_q8_0`` ignores the weights), and neither do the float types.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .kquants_search import F32, _fp16, _u16
from .searches import make_qkx, make_qx, rowsum

QK = 32


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """sum(x*x over each row, in order) / cols: x [rows, cols] -> [rows] float32."""
    return rowsum(x * x) / F32(x.shape[1])


def _weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """qw[j] * sqrtf(sigma2 + x*x), per value: x [rows, cols], qw [cols] -> [rows, cols]."""
    sigma2 = _row_sigma2(x)
    return qw[None, :] * np.sqrt(sigma2[:, None] + x * x)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """Levels [nb, 32] (uint8) -> qs [nb, 16]: element j low nibble, element j+16 high nibble."""
    return (L[:, :16] & 0x0F) | ((L[:, 16:] & 0x0F) << 4)


def _qh(L: np.ndarray) -> np.ndarray:
    """Levels [nb, 32] -> qh [nb, 4]: bit 4 of element k at bit k of a little-endian uint32."""
    bits = ((L >> 4) & 1).astype(np.uint32)                       # [nb, 32]
    qh = (bits << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def _encode_sym(x: np.ndarray, qw: np.ndarray, nmax: int) -> np.ndarray:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): ``quantize_row_q{4,5}_0_impl``."""
    scale, Lb = make_qx(x.reshape(-1, QK), nmax, _weights(x, qw).reshape(-1, QK))  # [nb], [nb, 32] in 0..2*nmax-1
    d_bits, _ = _fp16(scale)
    parts = [_u16(d_bits)] + ([_qh(Lb)] if nmax == 16 else []) + [_nibbles(Lb)]
    return np.concatenate(parts, axis=1)


def _encode_asym(x: np.ndarray, qw: np.ndarray, nmax: int) -> np.ndarray:
    """Q4_1 (nmax 15) / Q5_1 (nmax 31): ``quantize_row_q{4,5}_1_impl``."""
    scale, the_min, Lb = make_qkx(x.reshape(-1, QK), _weights(x, qw).reshape(-1, QK), nmax,
                                  -0.9, 0.05, 36, False)           # [nb], [nb], [nb, 32] in 0..nmax
    d_bits, _ = _fp16(scale)
    m_bits, _ = _fp16(-the_min)
    parts = [_u16(d_bits), _u16(m_bits)] + ([_qh(Lb)] if nmax == 31 else []) + [_nibbles(Lb)]
    return np.concatenate(parts, axis=1)


_ENCODERS = {
    T.Q4_0: lambda x, qw: _encode_sym(x, qw, 8),
    T.Q5_0: lambda x, qw: _encode_sym(x, qw, 16),
    T.Q4_1: lambda x, qw: _encode_asym(x, qw, 15),
    T.Q5_1: lambda x, qw: _encode_asym(x, qw, 31),
}
WEIGHTED_TYPES = tuple(_ENCODERS)


def quantize_weighted(x: np.ndarray, qtype: T, imatrix: np.ndarray) -> np.ndarray:
    """Encode float32 rows with importance weights, as ``quantize_qX_Y(..., quant_weights)``.

    Args:
        x: float32 [rows, cols], cols a multiple of 32 (a 1-D array is one row).
        qtype: Q4_0, Q4_1, Q5_0 or Q5_1.
        imatrix: float32 [cols], one importance weight per column (``Imatrix.weights(name)``).
    Returns:
        uint8 [rows, cols // 32 * type_size], the GGUF tensor data.
    Raises:
        ValueError: unsupported type, bad shape, or an imatrix of the wrong length.
    """
    if qtype not in _ENCODERS:
        raise ValueError(f"{T(qtype).name} has no importance-weighted legacy encoder "
                         f"(supported: {', '.join(t.name for t in WEIGHTED_TYPES)})")
    x = np.asarray(x, dtype=F32)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"{T(qtype).name}: input must be [rows, cols] with cols a multiple of {QK}, "
                         f"got shape {tuple(x.shape)}")
    qw = np.asarray(imatrix, dtype=F32).reshape(-1)
    if qw.size != x.shape[1]:
        raise ValueError(f"imatrix has {qw.size} entries but the rows have {x.shape[1]} columns")
    rows = x.shape[0]
    with np.errstate(all="ignore"):
        out = _ENCODERS[qtype](np.ascontiguousarray(x), qw)          # [rows * cols/32, type_size]
    return out.reshape(rows, -1)
