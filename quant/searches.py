"""The per-group scale searches of the K-quant and weighted legacy encoders, by group rows.

Each function takes groups as the rows of a float32 array ``[G, n]`` (a block tensor
``[nb, 256]`` viewed as ``[nb * 256 / n, n]``, no copy) and returns per-group results plus
uint8 levels ``[G, n]``. Two implementations give the same bits:

* the compiled library ``edgeinfer.quant._kqnative`` (``_kqnative.c``, built with the
  package): one scalar pass per group, 10-20x faster than numpy; ctypes releases the GIL,
  so the encoders' worker threads run it on every core;
* the numpy searches of :mod:`edgeinfer.quant.kquants_search` (vectorised over groups),
  which are the reference: the library is used only after it reproduced them on a probe
  set at load (:func:`_self_check`), and always when ``EDGEINFER_KQUANTS=numpy`` is set or
  the library could not be built.

Both follow llama.cpp's float32 order, so either writes llama.cpp's bytes.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings

import numpy as np

from . import kquants_search as ks

F32 = np.float32
_VERSION = 2                                  # ei_version() of the library this module expects


def _load_native() -> ctypes.CDLL | None:
    """The compiled library, or None (not built, wrong version, or numpy forced)."""
    if os.environ.get("EDGEINFER_KQUANTS", "").lower() == "numpy":
        return None
    spec = importlib.util.find_spec("edgeinfer.quant._kqnative")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:                      # a broken build: numpy still works
        warnings.warn(f"edgeinfer: cannot load the compiled K-quant searches ({e}); using numpy (slower)")
        return None
    i64, i32, f32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.ei_version.restype = i32
    if lib.ei_version() != _VERSION:
        warnings.warn("edgeinfer: the compiled K-quant searches are from another version; "
                      "reinstall edgeinfer (pip install -e .) to rebuild them; using numpy (slower)")
        return None
    lib.ei_rowsum.argtypes = [i64, i32, p, p]
    lib.ei_weights_rms_abs.argtypes = [i64, i32, p, p]
    lib.ei_requant.argtypes = [i64, i32, p, p, p, i32, i32, p]
    lib.ei_make_qkx.argtypes = [i64, i32, i32, p, p, f32, f32, i32, i32, p, p, p]
    lib.ei_make_qx.argtypes = [i64, i32, i32, p, p, p, p]
    lib.ei_make_q3.argtypes = [i64, i32, i32, p, p, p]
    lib.ei_make_qp.argtypes = [i64, i32, i32, p, p, p, p]
    for f in (lib.ei_rowsum, lib.ei_weights_rms_abs, lib.ei_requant, lib.ei_make_qkx, lib.ei_make_qx,
              lib.ei_make_q3, lib.ei_make_qp):
        f.restype = None
    return lib


def _c(a: np.ndarray) -> np.ndarray:
    """C-contiguous float32 (no copy when it already is)."""
    return np.ascontiguousarray(a, dtype=F32)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _t(a: np.ndarray) -> np.ndarray:
    """[G, n] <-> [n, G], contiguous (the numpy searches' layout)."""
    return np.ascontiguousarray(a.T)


# ---------------------------------------------------------------- the public searches

def rowsum(a: np.ndarray) -> np.ndarray:
    """Per row of a [G, n]: a[g, 0] + a[g, 1] + ... in order (C's loop), float32 [G]."""
    a = _c(a)
    if _LIB is None:
        return ks._seqsum(_t(a)) + F32(0)                     # C's sum starts from +0.0 (only an all -0.0 row shows it)
    out = np.empty(a.shape[0], dtype=F32)
    _LIB.ei_rowsum(a.shape[0], a.shape[1], _ptr(a), _ptr(out))
    return out


def weights_rms_abs(x: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K search weights per row of x [G, n]: sqrtf(sum(x^2 in order) / n) + |x|, float32 [G, n]."""
    x = _c(x)
    if _LIB is None:
        return np.sqrt(rowsum(x * x) / F32(x.shape[1]))[:, None] + np.abs(x)
    w = np.empty_like(x)
    _LIB.ei_weights_rms_abs(x.shape[0], x.shape[1], _ptr(x), _ptr(w))
    return w


def requant(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Final levels per row g of x [G, n] against the stored scales d [G] (and offsets dm [G]).

    ``clamp(nearest_int((x + dm) / d), lo, hi) - lo`` (``x / d`` when dm is None) as uint8 [G, n];
    rows with d == 0 keep their levels from L (uint8 [G, n]).
    """
    x, d = _c(x), _c(d)
    out = np.array(L, dtype=np.uint8, order="C", copy=True)
    if _LIB is None:
        with np.errstate(all="ignore"):
            v = np.divide(x if dm is None else x + _c(dm)[:, None], d[:, None], dtype=F32)
            # C's nearest_int: rint for |v| < 2^22, its bit trick beyond (inf/nan from a tiny d)
            r = np.where(np.abs(v) < F32(2 ** 22), np.rint(v), ks._nint_i(v).astype(F32))
            new = (np.clip(r, F32(lo), F32(hi)) - F32(lo)).astype(np.uint8)
        keep = d == 0
        out[~keep] = new[~keep]
        return out
    _LIB.ei_requant(x.shape[0], x.shape[1], _ptr(x), _ptr(d), None if dm is None else _ptr(_c(dm)), lo, hi, _ptr(out))
    return out


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml ``make_qkx2/qkx3_quants`` per row of x [G, n] with weights w [G, n].

    Returns (scale [G], the_min [G] (= -min), L uint8 [G, n] in 0..nmax).
    """
    x, w = _c(x), _c(w)
    if _LIB is None:
        with np.errstate(all="ignore"):
            s, m, L = ks.make_qkx(_t(x), _t(w), nmax, rmin, rdelta, nstep, use_mad)
        return s, m, _t(L).astype(np.uint8)
    g, n = x.shape
    s, m, L = np.empty(g, F32), np.empty(g, F32), np.empty((g, n), np.uint8)
    _LIB.ei_make_qkx(g, n, nmax, _ptr(x), _ptr(w), rmin, rdelta, nstep, int(use_mad), _ptr(s), _ptr(m), _ptr(L))
    return s, m, L


def _scale_levels(native: str, ref, x: np.ndarray, nmax: int, w: np.ndarray | None):
    """(scale [G], L uint8 [G, n]) of the searches that return one scale per group.

    ``native``: the library's function name; ``ref``: the numpy search (``[n, G]`` layout).
    """
    ops = [_c(x)] if w is None else [_c(x), _c(w)]
    if _LIB is None:
        with np.errstate(all="ignore"):
            s, L = ref(_t(ops[0]), nmax, *(_t(o) for o in ops[1:]))
        return s, _t(L).astype(np.uint8)
    g, n = ops[0].shape
    s, L = np.empty(g, F32), np.empty((g, n), np.uint8)
    getattr(_LIB, native)(g, n, nmax, *(_ptr(o) for o in ops), _ptr(s), _ptr(L))
    return s, L


def make_qx(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qx_quants(rmse_type=1, weights w)`` per row: (scale [G], L uint8 in 0..2*nmax-1)."""
    return _scale_levels("ei_make_qx", ks.make_qx, x, nmax, w)


def make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_q3_quants(do_rmse=true)`` per row: (scale [G], L uint8 in 0..2*nmax-1)."""
    return _scale_levels("ei_make_q3", ks.make_q3, x, nmax, None)


def make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qp_quants`` per row (non-negative x, weights w): (scale [G], L as the uint8 stored)."""
    return _scale_levels("ei_make_qp", ks.make_qp, x, nmax, w)


# ------------------------------------------------------------------- choosing the library

def probe_groups(seed: int = 0) -> list[np.ndarray]:
    """Group sets [G, n] that exercise every branch: varied scales, signs, zeros, ties, flat groups."""
    rng = np.random.default_rng(seed)
    sets = []
    for n in (8, 16, 32):
        x = rng.standard_normal((96, n)).astype(F32) * F32(0.02)
        x[1] = 0                                           # all zero
        x[2] = F32(0.5)                                    # flat and positive
        x[3] = -np.abs(x[3])                               # all negative
        x[4, ::2] = 0                                      # half zero
        x[5] = np.round(x[5] * F32(400)) / F32(400)        # repeated values, ties
        x[6] *= F32(1e-12)                                 # below the zero threshold
        x[7:20] = rng.standard_t(2, (13, n)).astype(F32)   # heavy tails
        x[20:30] = np.abs(x[20:30])                        # non-negative (make_qp's domain)
        sets.append(x)
    return sets


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Run both implementations on :func:`probe_groups`; None if every output is bit-identical."""
    global _LIB
    saved, results = _LIB, []
    for impl in (None, lib):
        _LIB = impl
        out = []
        for x in probe_groups():
            n = x.shape[1]
            w = np.abs(x) + F32(0.01)
            out.append(rowsum(x))
            out.append(weights_rms_abs(x))
            d = np.abs(x[:, 0]) * F32(0.05)
            d[::7] = 0
            L0 = np.full(x.shape, 3, np.uint8)
            out.append(requant(x, L0, d, np.abs(x[:, 1]), 0, 15))
            out.append(requant(x, L0, d, None, -32, 31))
            out += list(make_qkx(x, w, 15, -1.0, 0.1, 20, False))
            out += list(make_qkx(x, np.abs(x), 3, -0.5, 0.1, 15, True))
            out += list(make_qx(x, 32 if n == 16 else 16, x * x))
            out += list(make_q3(x, 4))
            out += list(make_qp(np.abs(x), 63, w))
        results.append(out)
    _LIB = saved
    for i, (a, b) in enumerate(zip(*results)):
        if a.tobytes() != b.tobytes():
            return f"output {i} differs"
    return None


_LIB: ctypes.CDLL | None = None
_native = _load_native()
if _native is not None:
    _why = _self_check(_native)
    if _why is None:
        _LIB = _native
    else:
        warnings.warn(f"edgeinfer: the compiled K-quant searches disagree with the numpy reference ({_why}); "
                      "using numpy (slower). Please report this with your compiler and platform.")


def implementation() -> str:
    """``"native"`` when the compiled searches are in use, else ``"numpy"``."""
    return "native" if _LIB is not None else "numpy"
