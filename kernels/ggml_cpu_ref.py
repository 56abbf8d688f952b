"""Reference for the compiled GGML-block kernels (:mod:`edgeinfer.kernels.ggml_cpu`): numpy + float64.

The kernels compute ``x @ W.T`` with ``W`` dequantized exactly from its blocks and ``x`` quantized
to int8 per group of 32 for the 32-value types and per super-block of 256 for the K types (ggml's
Q8_K idea: one scale per 256, so the K types' sub-block scales become integer multiplies)
(``d = max|x| / 127``, ``q = round-half-even(x / d)``, ``x ~ d * q``; the
idea of ggml's Q8_0 activations, with a float32 ``d``). This module does the same quantization in
numpy, dequantizes ``W`` with :func:`edgeinfer.kernels.dequant.dequantize` (bit-exact with gguf's)
and multiplies in float64, so the kernels must match it to float32 accumulation error; against
the unquantized float64 product the difference is the int8 activation rounding (~0.3 %).
"""

from __future__ import annotations

import numpy as np
import torch

from edgeinfer.kernels.dequant import dequantize

F32 = np.float32


def quantize_q8(x: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] float32 -> (d [M, K/group] float32, q [M, K] int8), float32 arithmetic as in
    ``quantize_rows`` (group 32) / ``quantize_rows_k`` (group 256)."""
    x = np.ascontiguousarray(x, dtype=F32)
    m, k = x.shape
    g = x.reshape(m, k // group, group)
    d = (np.abs(g).max(axis=-1) / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, F32(1) / np.where(d > 0, d, F32(1)), F32(0)).astype(F32)
    q = np.rint(g * inv[..., None]).astype(np.int8)
    return d, q.reshape(m, k)


def dequantize_q8(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The float64 activations the kernels actually multiply: ``d * q`` per group. [M, K]."""
    m, k = q.shape
    group = k // d.shape[1]
    return (q.reshape(m, k // group, group).astype(np.float64) * d[..., None].astype(np.float64)).reshape(m, k)


def act_group(qtype) -> int:
    """The activation quantization group the kernels use against weights of ``qtype``."""
    return 256 if int(qtype) in (12, 13, 14) else 32  # Q4_K, Q5_K, Q6_K


def activations(x: np.ndarray, qtype) -> np.ndarray:
    """float64 [M, K]: ``x`` as the kernels see it against weights of ``qtype``."""
    return dequantize_q8(*quantize_q8(x, act_group(qtype)))


def weights64(raw: torch.Tensor, qtype) -> np.ndarray:
    """The reference dequantization of uint8 [N, row_bytes] blocks, as float64 [N, K]."""
    return dequantize(raw, qtype).numpy().astype(np.float64)


def linear_ref(raw: torch.Tensor, qtype, x: np.ndarray, quantize_x: bool = True) -> np.ndarray:
    """float64 ``x @ W.T`` [M, N]; with ``quantize_x`` the activations are first rounded like the kernels'."""
    xr = activations(x, qtype) if quantize_x else np.asarray(x, np.float64)
    return xr @ weights64(raw, qtype).T
