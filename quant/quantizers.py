"""Vectorized GGML encoders (torch) and the quant-type registry.

Every encoder maps a float32 matrix ``x: [rows, cols]`` to the bytes ggml stores for it,
``uint8 [rows, cols // block_size * type_size]``, byte-identical to ggml's reference
quantization (``quantize_row_*_ref`` in ``ggml/src/ggml-quants.c``, which is what
``llama_model_quantize`` runs when no importance matrix is given). The oracles in the tests are the
``gguf`` package's numpy quantizers and ``llama_cpp.llama_model_quantize``.

Torch is used (not numpy) so that encoding uses every intra-op thread (``torch.set_num_threads``)
and so the same code runs on CPU and GPU. Rows are processed in chunks (``CHUNK_ELEMENTS``) so the
temporaries stay bounded whatever the tensor size.

Other quant types (the K-quants in ``kquants.py``) plug in through :func:`register_encoder`; the
per-tensor type decision lives in ``policy.py``.

Importance matrices: a type may also register a *weighted* encoder
(:func:`register_weighted_encoder`), ``f(x [rows, cols], qw [cols]) -> bytes``, which is what
``llama_model_quantize`` runs when it has an imatrix entry for the tensor
(``quantize_qX(..., quant_weights)``): the K-quants (``kquants.quantize_k``) and the legacy
Q4_0/Q4_1/Q5_0/Q5_1 (``legacy_weighted.py``). Types without one (float types, Q8_0) ignore the
weights, as ggml does. :func:`quantize` and :func:`encode_row_chunks` take ``imatrix=``.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# An encoder: float32 [rows, cols] (cols % block_size == 0) -> uint8 [rows, cols/bs*ts] (torch or numpy).
EncodeFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
# A weighted encoder: (float32 [rows, cols] numpy, importance float32 [cols]) -> uint8 [rows, cols/bs*ts].
WeightedEncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

CHUNK_ELEMENTS = 1 << 18  # 256 Ki floats (1 MiB) per encoding step: stays in cache, bounds temporaries


@dataclass(frozen=True)
class QuantType:
    """A registered GGML tensor type: its block geometry and its encoder."""

    ggml_type: T
    encode: EncodeFn
    block_size: int
    type_size: int
    encode_weighted: WeightedEncodeFn | None = None  # the imatrix path; None: weights are ignored

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes of one encoded row of ``cols`` values (cols must be a multiple of block_size)."""
        return cols // self.block_size * self.type_size


REGISTRY: dict[T, QuantType] = {}


def register_encoder(ggml_type: T, encode: EncodeFn) -> QuantType:
    """Register (or replace) the encoder of ``ggml_type``; block geometry comes from ``gguf``.

    Args:
        ggml_type: the GGML type the encoder produces.
        encode: ``f(x: float32 tensor [rows, cols]) -> uint8 [rows, row_bytes]`` (torch or numpy).
    Returns:
        The registered :class:`QuantType`.
    """
    bs, ts = GGML_QUANT_SIZES[ggml_type]
    qt = QuantType(ggml_type, encode, bs, ts)
    REGISTRY[ggml_type] = qt
    return qt


def register_weighted_encoder(ggml_type: T, encode_weighted: WeightedEncodeFn) -> QuantType:
    """Attach an importance-weighted encoder to the already registered ``ggml_type``.

    Raises:
        KeyError: ``ggml_type`` has no plain encoder registered.
    """
    qt = dataclasses.replace(REGISTRY[ggml_type], encode_weighted=encode_weighted)
    REGISTRY[ggml_type] = qt
    return qt


def uses_imatrix(ggml_type: T) -> bool:
    """True if an importance matrix changes how ``ggml_type`` is encoded (a weighted encoder exists)."""
    qt = REGISTRY.get(ggml_type)
    return qt is not None and qt.encode_weighted is not None


def get_quant_type(ggml_type: T) -> QuantType:
    """The registered :class:`QuantType` for ``ggml_type`` (KeyError if none is registered)."""
    return REGISTRY[ggml_type]


def default_threads() -> int:
    """Encoding workers: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def encode_row_chunks(read: Callable[[int, int], "torch.Tensor | np.ndarray"], rows: int, cols: int,
                      ggml_type: T, n_threads: int | None = None,
                      imatrix: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Encode a ``[rows, cols]`` matrix read chunk by chunk; yield ``(r0, uint8 [r1-r0, row_bytes])`` in order.

    ``read(r0, r1)`` returns float values ``[r1-r0, cols]``. Chunks of ~``CHUNK_ELEMENTS`` values
    (cache-sized) are encoded by ``n_threads`` Python worker threads, each running torch
    single-threaded: torch releases the GIL inside its kernels, and independent chunks scale
    better than OpenMP's fork/join per operation (which spin-waits badly on a busy machine). At
    most ``2 * n_threads`` chunks are in flight, so memory stays bounded.

    ``imatrix`` (float32 ``[n_mat * cols]``, llama.cpp's per-column importance; ``n_mat`` > 1 for
    stacked experts, whose ``rows / n_mat`` rows each take their own slice) selects the type's
    weighted encoder; a type without one ignores it (as ggml's Q8_0 and float types do).

    Raises:
        ValueError: ``cols`` is not a multiple of the type's block size, or the imatrix length
            is not a multiple of ``cols`` dividing ``rows``.
    """
    qt = REGISTRY[ggml_type]
    if cols % qt.block_size:
        raise ValueError(f"{qt.name}: row length {cols} is not a multiple of the block size {qt.block_size}")
    rb = qt.row_bytes(cols)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    starts = list(range(0, rows, step))
    qw = None
    if imatrix is not None and qt.encode_weighted is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.size % cols or rows % (qw.size // cols):
            raise ValueError(f"imatrix of {qw.size} values does not fit a [{rows}, {cols}] tensor")
        qw = qw.reshape(-1, cols)  # [n_mat, cols]
    rows_per_mat = rows // qw.shape[0] if qw is not None else rows

    def work(r0: int) -> np.ndarray:
        r1 = min(rows, r0 + step)
        chunk = read(r0, r1)
        if qw is not None:  # the imatrix path (numpy encoders), split where the expert changes
            x = chunk.cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
            x = np.ascontiguousarray(x, dtype=np.float32)
            cuts = [r0, *range((r0 // rows_per_mat + 1) * rows_per_mat, r1, rows_per_mat), r1]
            parts = [qt.encode_weighted(x[a - r0:b - r0], qw[a // rows_per_mat]) for a, b in zip(cuts, cuts[1:])]
            return np.asarray(np.concatenate(parts), dtype=np.uint8).reshape(r1 - r0, rb)
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(chunk)
        enc = qt.encode(chunk.to(torch.float32).contiguous())  # [r1-r0, cols] -> [r1-r0, rb]
        if isinstance(enc, torch.Tensor):
            enc = enc.cpu().numpy()
        return np.asarray(enc, dtype=np.uint8).reshape(r1 - r0, rb)

    n_threads = max(1, min(n_threads or default_threads(), len(starts)))
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if n_threads == 1:
            for r0 in starts:
                yield r0, work(r0)
            return
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            pending: deque = deque()
            it = iter(starts)
            for r0 in it:
                pending.append((r0, pool.submit(work, r0)))
                if len(pending) >= 2 * n_threads:
                    break
            while pending:
                r0, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(work, nxt)))
                yield r0, fut.result()
    finally:
        torch.set_num_threads(saved)


def encode_rows(read: Callable[[int, int], "torch.Tensor | np.ndarray"], rows: int, cols: int, ggml_type: T,
                out: np.ndarray | None = None, n_threads: int | None = None,
                imatrix: np.ndarray | None = None) -> np.ndarray:
    """Like :func:`encode_row_chunks`, gathered into one ``uint8 [rows, row_bytes]`` array (``out`` if given)."""
    qt = REGISTRY[ggml_type]
    if out is None:
        out = np.empty((rows, qt.row_bytes(cols) if cols % qt.block_size == 0 else 0), dtype=np.uint8)
    for r0, enc in encode_row_chunks(read, rows, cols, ggml_type, n_threads, imatrix):
        out[r0:r0 + enc.shape[0]] = enc
    return out


def quantize(x: torch.Tensor | np.ndarray, ggml_type: T, out: np.ndarray | None = None,
             n_threads: int | None = None, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode a float matrix with the registered encoder, in row chunks.

    Args:
        x: ``[rows, cols]`` (or 1-D ``[cols]``) values; converted to float32.
        ggml_type: target type; ``cols`` must be divisible by its block size.
        out: optional preallocated ``uint8 [rows, row_bytes]`` buffer.
        n_threads: worker threads (default: all usable cores).
        imatrix: optional importance weights ``[cols]`` (``[n_mat * cols]`` for stacked experts):
            the type's weighted encoder is used, as llama.cpp does with an imatrix entry; types
            without one ignore it.
    Returns:
        ``uint8 [rows, row_bytes]`` numpy array (``[row_bytes]`` for 1-D input).
    Raises:
        ValueError: if ``cols`` is not a multiple of the block size.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    one_d = x.ndim == 1
    x2 = x.reshape(1, -1) if one_d else x.reshape(-1, x.shape[-1])
    rows, cols = x2.shape
    res = encode_rows(lambda r0, r1: x2[r0:r1], rows, cols, ggml_type, out=out, n_threads=n_threads,
                      imatrix=imatrix)
    return res.reshape(-1) if one_d else res


# --------------------------------------------------------------------------- helpers


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exactly: ``floor(a + 0.5)`` can round 0.49999997 up.

    ``a - floor(a)`` is exact, and ``floor(2 * frac)`` is 1 exactly when frac >= 0.5.
    """
    a = x.abs()
    f = a.floor()
    a.sub_(f).mul_(2).floor_().add_(f)
    return a.copysign_(x)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> uint8 [n, 2]: ``GGML_FP32_TO_FP16`` (round to nearest even), little endian."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(v.shape[0], 2)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``id = d ? 1.0f/d : 0.0f`` as in ggml."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] -> uint8 [n, 16]: element j in the low nibble, element j+16 in the high one."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] 5-bit values -> uint8 [n, 4]: bit 4 of element k at bit k of a little-endian uint32 (``qh``)."""
    h = ((q >> 4) & 1).view(q.shape[0], 4, 8) * _BIT_WEIGHTS.to(q.device)  # [n, 4, 8], distinct bits
    return h.sum(dim=2, dtype=torch.uint8)  # [n, 4]: byte j holds bits 8j..8j+7


def _levels(y: torch.Tensor, offset: float, top: int) -> torch.Tensor:
    """``MIN(top, (int8_t)(y + offset))`` of ggml, in place on the temporary ``y`` -> uint8."""
    return y.add_(offset).trunc_().clamp_(0, top).to(torch.uint8)


def _blocks(x: torch.Tensor, bs: int = 32) -> torch.Tensor:
    return x.reshape(-1, bs)  # [n_blocks, bs]


# --------------------------------------------------------------------------- float types


def encode_f32(x: torch.Tensor) -> torch.Tensor:
    """F32: the values as stored."""
    return x.to(torch.float32).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def encode_f16(x: torch.Tensor) -> torch.Tensor:
    """F16: round to nearest even (``ggml_fp32_to_fp16``)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def encode_bf16(x: torch.Tensor) -> torch.Tensor:
    """BF16 as ``ggml_compute_fp32_to_bf16`` (ggml-impl.h): NaN forced quiet, round to nearest even.

    Done on the int32 bit pattern: two's-complement wrap-around gives the same low 16 bits as
    ggml's uint32 arithmetic.
    """
    n = x.to(torch.float32).contiguous().view(torch.int32)
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    h = torch.where(is_nan, (n >> 16) | 64, rounded)  # [rows, cols], low 16 bits are the bf16
    return h.to(torch.int16).view(torch.uint8).reshape(x.shape[0], -1)  # little endian


# --------------------------------------------------------------------------- block types (QK = 32)


def encode_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 (``quantize_row_q8_0_ref``): d = amax/127 as fp16, qs = roundf(x/d) int8. 34 B / 32."""
    rows = x.shape[0]
    b = _blocks(x)  # [n, 32]
    d = b.abs().amax(dim=1, keepdim=True) / 127  # [n, 1]
    qs = _roundf(b * _inverse(d)).to(torch.int8).view(torch.uint8)  # [n, 32]
    return torch.cat([_fp16_bytes(d), qs], dim=1).reshape(rows, -1)


def _signed_max(b: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, as ggml's loop finds it.

    ggml keeps the first value whose magnitude is strictly larger than all before it: so the
    first of a ``+m``/``-m`` pair wins, and an all-zero block gives ``+0.0``.
    """
    mx = b.amax(dim=1, keepdim=True)  # [n, 1]
    mn = b.amin(dim=1, keepdim=True)
    pick = torch.where(-mn > mx, mn, mx)
    tie = ((-mn) == mx).squeeze(1) & (mx.squeeze(1) != 0)
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        sub = b[rows]  # [t, 32]
        first_mx = (sub == mx[rows]).to(torch.uint8).argmax(dim=1)
        first_mn = (sub == mn[rows]).to(torch.uint8).argmax(dim=1)
        pick[rows] = torch.where((first_mn < first_mx).unsqueeze(1), mn[rows], mx[rows])
    return torch.where(pick == 0, torch.zeros_like(pick), pick)  # [n, 1]


def _encode_sym(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16), ``quantize_row_q{4,5}_0_ref``: d = max/-nmax,
    q = min(2*nmax-1, trunc(x/d + nmax + 0.5)); the 5th bits (Q5_0) go before the nibbles."""
    rows = x.shape[0]
    b = _blocks(x)
    d = _signed_max(b) / -nmax
    q = _levels(b * _inverse(d), nmax + 0.5, 2 * nmax - 1)
    high = [_high_bits(q)] if nmax == 16 else []
    return torch.cat([_fp16_bytes(d), *high, _pack_nibbles(q)], dim=1).reshape(rows, -1)


def _encode_asym(x: torch.Tensor, top: int) -> torch.Tensor:
    """Q4_1 (top 15) / Q5_1 (top 31), ``quantize_row_q{4,5}_1_ref``: d = (max-min)/top, m = min,
    q = trunc((x-m)/d + 0.5); the 5th bits (Q5_1) go before the nibbles."""
    rows = x.shape[0]
    b = _blocks(x)
    mn = b.amin(dim=1, keepdim=True)
    mx = b.amax(dim=1, keepdim=True)
    d = (mx - mn) / top
    q = _levels((b - mn).mul_(_inverse(d)), 0.5, top)
    high = [_high_bits(q)] if top == 31 else []
    return torch.cat([_fp16_bytes(d), _fp16_bytes(mn), *high, _pack_nibbles(q)], dim=1).reshape(rows, -1)


def encode_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0: 18 B / 32 values."""
    return _encode_sym(x, 8)


def encode_q5_0(x: torch.Tensor) -> torch.Tensor:
    """Q5_0: 22 B / 32 values."""
    return _encode_sym(x, 16)


def encode_q4_1(x: torch.Tensor) -> torch.Tensor:
    """Q4_1: 20 B / 32 values."""
    return _encode_asym(x, 15)


def encode_q5_1(x: torch.Tensor) -> torch.Tensor:
    """Q5_1: 24 B / 32 values."""
    return _encode_asym(x, 31)


for _t, _fn in ((T.F32, encode_f32), (T.F16, encode_f16), (T.BF16, encode_bf16), (T.Q8_0, encode_q8_0),
                (T.Q4_0, encode_q4_0), (T.Q4_1, encode_q4_1), (T.Q5_0, encode_q5_0), (T.Q5_1, encode_q5_1)):
    register_encoder(_t, _fn)


def _register_kquants() -> None:
    """Plug in the K-quant encoders of ``kquants.py`` (numpy, multi-threaded) when present."""
    try:
        from edgeinfer.quant import kquants
    except ImportError:  # the K-quant module is optional for this pipeline
        return
    for kt in getattr(kquants, "K_TYPES", ()):
        if kt not in REGISTRY:
            register_encoder(kt, lambda x, _kt=kt: kquants.quantize_k(
                np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32), _kt, n_threads=torch.get_num_threads()))
            register_weighted_encoder(kt, lambda x, qw, _kt=kt: kquants.quantize_k(
                x, _kt, imatrix=qw, n_threads=torch.get_num_threads()))


def _register_weighted_legacy() -> None:
    """The imatrix encoders of Q4_0/Q4_1/Q5_0/Q5_1 (``legacy_weighted.py``, numpy)."""
    from edgeinfer.quant import legacy_weighted

    for lt in legacy_weighted.WEIGHTED_TYPES:
        register_weighted_encoder(lt, lambda x, qw, _lt=lt: legacy_weighted.quantize_weighted(x, _lt, qw))


_register_kquants()
_register_weighted_legacy()
