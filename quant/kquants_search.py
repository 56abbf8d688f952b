"""Per-group scale searches of the K-quant encoders, vectorised over groups (numpy).

Re-derived from ggml/src/ggml-quants.c (``make_qx_quants``, ``make_q3_quants``,
``make_qkx2_quants``/``make_qkx3_quants``, ``make_qp_quants``, ``nearest_int``); used by
:mod:`edgeinfer.quant.kquants`.  Every group of the tensor is searched at once; every
accumulation follows C's order and float32 rounding:

* group data lives in ``[n, G]`` arrays (value index first, one column per group), so
  ``np.add.reduce(axis=0)`` adds the rows one after another like C's ``for`` loop
  (numpy's pairwise summation only applies along a contiguous reduction axis);
* weighted sums such as C's ``sum += w*l*x[i]`` are one fused ``np.einsum`` pass
  (:func:`_wsum`): for contiguous ``[n, G]`` operands einsum loops over the value index
  outermost and forms each product left to right in float32 before adding it, i.e. C's
  order.  :data:`EINSUM_IS_SEQUENTIAL` checks that at import on a numpy build where that
  might differ (FMA contraction, another loop order) and falls back to
  multiply-then-:func:`_seqsum`;
* every constant is a float32 and integers are converted to float32 before they meet
  a float, so nothing is promoted to float64;
* ``nearest_int`` (C's "add 1.5*2^23" trick) rounds to nearest, ties to even, which is
  ``np.rint`` for every |value| < 2^22 (the trick's own valid range); where C stores the
  unclamped int in a uint8/int8, the trick itself is replayed (``_nint_i``);
* the searches keep the winning candidate's parameters and rebuild its levels once;
  the clamp of the levels is skipped only where a bound proves it cannot change them.

Speed: numpy makes one memory pass per operation, so the cost is ~10 passes over the
[n, G] arrays per candidate scale (20-37 candidates per group); ``bench_kquants.py``
measures it.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
_MAGIC = F32(12582912.0)      # 1.5 * 2**23: adding it rounds a float32 to an integer
_GROUP_MAX_EPS = F32(1e-15)   # ggml's GROUP_MAX_EPS
_clip = np._core.umath.clip if hasattr(np, "_core") else np.core.umath.clip  # ufunc, no wrapper


# --------------------------------------------------------------------------- primitives

def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum ``a`` [n, G] over axis 0 strictly in order a[0] + a[1] + ... (C loop order)."""
    if a.shape[1] > 1 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    out = a[0].copy()
    for i in range(1, a.shape[0]):
        out += a[i]
    return out


_SUBSCRIPTS = {2: "ij,ij->j", 3: "ij,ij,ij->j"}


def _wsum_slow(*ops: np.ndarray) -> np.ndarray:
    """Reference for :func:`_wsum`: the product, left to right, then :func:`_seqsum`."""
    p = np.multiply(ops[0], ops[1], dtype=F32)
    for o in ops[2:]:
        p *= o
    return _seqsum(p)


def _check_einsum() -> bool:
    """True when einsum's ``ij,ij(,ij)->j`` equals C's sequential float32 loop bit for bit."""
    rng = np.random.default_rng(0)
    ops = [rng.standard_normal((32, 64)).astype(F32) * F32(s) for s in (1.0, 3e3, 1e-2)]
    with np.errstate(all="ignore"):
        return all(np.array_equal(np.einsum(_SUBSCRIPTS[k], *ops[:k]), _wsum_slow(*ops[:k]))
                   for k in (2, 3))


EINSUM_IS_SEQUENTIAL = _check_einsum()


def _wsum(*ops: np.ndarray) -> np.ndarray:
    """sum_i ops[0][i]*ops[1][i](*ops[2][i]) per column of [n, G] float32, C order, one pass.

    Equals ``_seqsum(ops[0] * ops[1] * ...)``; einsum fuses the products into the sum
    (no temporary) when its order was verified and the operands are contiguous with
    more than one column (with one column einsum switches to an unrolled SIMD sum).
    """
    if EINSUM_IS_SEQUENTIAL and ops[0].shape[1] > 1 and all(o.flags.c_contiguous for o in ops):
        return np.einsum(_SUBSCRIPTS[len(ops)], *ops)
    return _wsum_slow(*ops)


def _biased(v: np.ndarray) -> np.ndarray:
    """float32(v + 1.5*2^23): the integer nearest to v (ties to even), plus the bias."""
    return np.add(v, _MAGIC, dtype=F32)


def _nint(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """clamp(nearest_int(v), lo, hi) as float32.

    For |v| < 2^22 (where C's trick is valid) adding 1.5*2^23 rounds exactly like
    ``rint`` (nearest, ties to even), so the faster ``rint`` is used.
    """
    r = np.rint(v)
    _clip(r, F32(lo), F32(hi), out=r)
    return r


def _nint_i(v: np.ndarray) -> np.ndarray:
    """nearest_int(v) exactly as C computes it (int32, no clamp)."""
    return (_biased(v).view(np.int32) & 0x007FFFFF) - 0x00400000


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 then back: (uint16 bits, float32 value)."""
    h = np.asarray(v, dtype=F32).astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of x [n, G]: (largest |x|, the signed x where it first occurs)."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return ax[idx, cols], x[idx, cols]


def _div(a, b):
    """a / b in float32 with division-by-zero silenced (masked out by the caller)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.divide(a, b, dtype=F32)


# ------------------------------------------------------------------ per-group searches

def make_qx(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` for every column of x [n, G].

    ``w`` is the weight per value (``x*x`` when the C code gets ``qw == NULL``).
    Returns (scale [G], L [n, G] float32 in 0..2*nmax-1, the offset form C stores).
    """
    amax, vmax = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    lo, hi = F32(-nmax), F32(nmax - 1)
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / vmax
        wx = w * x
        l = np.empty_like(x)

        # |isc*x| <= num*(1 + 2^-22) (|x| <= |vmax|, monotone rounding): while that stays
        # below nmax - 0.5, nearest_int lands in [-nmax+1, nmax-1] and the clamp cannot bite
        no_clamp_below = F32(nmax - 0.5) / F32(1 + 2.0 ** -20)

        def levels(isc, num=None):            # l = clamp(nearest_int(isc * x), -nmax, nmax-1)
            np.multiply(x, isc, out=l)
            np.rint(l, out=l)
            if num is None or num >= no_clamp_below:
                _clip(l, lo, hi, out=l)

        levels(iscale)
        sumlx = _wsum(wx, l)                  # C: sumlx += w*x[i]*l; suml2 += w*l*l
        suml2 = _wsum(w, l, l)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        win = iscale                          # L is rebuilt from the winning iscale at the end
        for step in range(-9, 10):
            if step == 0:
                continue
            num = F32(nmax) + F32(0.1) * F32(step)
            isc = -num / vmax
            levels(isc, num)
            slx = _wsum(wx, l)
            sl2 = _wsum(w, l, l)
            upd = (sl2 > 0) & (slx * slx > best * sl2)
            if upd.any():
                win = np.where(upd, isc, win)
                scale = np.where(upd, slx / sl2, scale)
                best = np.where(upd, scale * slx, best)
        levels(win)
    L = l + F32(nmax)
    L[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), L


def make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for every column of x [n, G].

    Greedy coordinate descent: up to 5 passes, each value in order.  A pass that
    changes nothing leaves the state unchanged, so the loop stops once a pass changes
    no column (per column, that equals C's early exit).  Returns (scale [G], L [n, G] float32 offset by nmax).
    """
    amax, vmax = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    with np.errstate(all="ignore"):
        l = _nint((F32(-nmax) / vmax) * x, -nmax, nmax - 1)
        w = x * x
        wx = w * x
        sumlx = _wsum(wx, l)
        suml2 = _wsum(w, l, l)
        for _ in range(5):
            changed = False
            for i in range(x.shape[0]):
                li = l[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                new = _nint(_div(x[i] * sl2, slx), -nmax, nmax - 1)
                slx2 = slx + wx[i] * new
                sl22 = sl2 + (w[i] * new) * new
                take = ((slx > 0) & (new != li) & (sl22 > 0)
                        & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
                l[i] = np.where(take, new, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed = changed or bool(take.any())
            if not changed:  # a pass that changes nothing would repeat identically: stop (C's early exit)
                break
        scale = np.where(suml2 > 0, _div(sumlx, suml2), F32(0))
    L = l + F32(nmax)
    L[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), L


def _c_min(x: np.ndarray) -> np.ndarray:
    """C's ``min = x[0]; if (x[i] < min) min = x[i]; if (min > 0) min = 0;`` per column of x [n, G].

    Equal to ``minimum(x.min(), 0)`` except for the sign of a zero minimum: C keeps the first
    +-0.0 it meets (a legacy Q4_1/Q5_1 block stores ``m = min`` as is, so the sign shows).
    """
    mn = x.min(axis=0)
    zero = mn == 0
    if zero.any():
        cols = np.nonzero(zero)[0]
        first = np.argmax(x[:, cols] == 0, axis=0)
        mn[cols] = x[first, cols]
    return np.where(mn > 0, F32(0), mn).astype(F32)


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
             nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml ``make_qkx2_quants`` / ``make_qkx3_quants`` (identical once weights are given).

    Asymmetric scale+min search for every column of x [n, G] with weights w [n, G].
    Returns (scale [G], the_min [G] (= -min, >= 0), L [n, G] float32 in 0..nmax).
    Note C's ``min`` moves when a candidate wins, and later candidates use the new one,
    so the candidates are tried one after another (each over all groups at once).
    The hot loop makes 9 to 11 passes over [n, G] per candidate.
    """
    mn = _c_min(x)
    mx = x.max(axis=0)
    flat = mx <= mn
    sum_w = _seqsum(w)
    sum_x = _wsum(w, x)                       # C: sum_x += w * x[i]
    xm, la, t = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    zero, top = F32(0), F32(nmax)

    # While every min is still min(x, 0), 0 <= xm <= mx - min, so iscale*xm lies in
    # [0, num*(1 + 2^-22)] (monotone rounding): below nmax + 0.5 the clamp cannot bite.
    no_clamp_below = F32(nmax + 0.5) / F32(1 + 2.0 ** -20)

    def levels(iscale, num=None):             # la = clamp(nearest_int(iscale*(x - min)))
        np.multiply(xm, iscale, out=la)       # xm = x - min, refreshed when a min moves
        if not np.isfinite(iscale).all():     # a span below ~4e-38 overflows iscale: rint and
            la[...] = _nint_i(la)             # C's trick differ on inf/nan, so replay the trick
            _clip(la, zero, top, out=la)
            return
        np.rint(la, out=la)
        if num is None or moved or num >= no_clamp_below:
            _clip(la, zero, top, out=la)

    def err(scale, vmin):                     # sum_i w * (scale*la + vmin - x)^2 (or |.|)
        np.multiply(la, scale, out=t)
        np.add(t, vmin, out=t)
        np.subtract(t, x, out=t)
        if use_mad:
            np.abs(t, out=t)
            return _wsum(t, w)
        return _wsum(t, t, w)                 # (d*d)*w == C's w*(d*d): one rounding each

    with np.errstate(all="ignore"):
        span = np.where(flat, F32(1), mx - mn)
        iscale = F32(nmax) / span
        scale = F32(1) / iscale
        np.subtract(x, mn, out=xm)
        levels(iscale)
        best = err(scale, mn)
        # the winner's L is rebuilt at the end from the (iscale, min) it was made with,
        # which is cheaper than copying L at every improvement
        win_iscale, win_mn = iscale, mn
        live = ~flat
        span = mx - mn
        moved = False                         # has any min left min(x, 0)?
        for step in range(nstep + 1):
            num = F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)
            iscale = num / span
            levels(iscale, num)
            sum_l = _wsum(w, la)              # C: sum_l += w*l; sum_l2 += w*l*l; sum_xl += w*l*x
            sum_l2 = _wsum(w, la, la)
            sum_xl = _wsum(w, la, x)
            D = sum_w * sum_l2 - sum_l * sum_l
            t_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            t_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = t_min > 0
            if pos.any():
                t_min = np.where(pos, F32(0), t_min)
                t_scale = np.where(pos, sum_xl / sum_l2, t_scale)
            cur = err(t_scale, t_min)
            upd = (D > 0) & (cur < best) & live
            if upd.any():                     # rare on real weights: skip the bookkeeping
                win_iscale = np.where(upd, iscale, win_iscale)
                win_mn = np.where(upd, mn, win_mn)
                best = np.where(upd, cur, best)
                scale = np.where(upd, t_scale, scale)
                mn = np.where(upd, t_min, mn)
                span = mx - mn
                np.subtract(x, mn, out=xm)
                moved = True
        np.subtract(x, win_mn, out=xm)
        levels(win_iscale)
    L = la
    L[:, flat] = 0
    return np.where(flat, F32(0), scale).astype(F32), (-mn).astype(F32), L


def make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qp_quants`` (non-negative values, weighted) for every column of x [n, G].

    Returns (scale [G], L [n, G] float32 as the uint8 C stores, 0..nmax normally).
    """
    vmax = np.maximum(x.max(axis=0), F32(0))
    zero = vmax < _GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    with np.errstate(all="ignore"):
        iscale = F32(nmax) / vmax
        L = (_nint_i(iscale * x) & 0xFF).astype(F32)           # uint8 store, no clamp
        scale = F32(1) / iscale
        d = x - scale * L
        best = _wsum(w, d, d)                                   # C: mse += w*diff*diff
        for step in range(-4, 5):
            if step == 0:
                continue
            isc = (F32(0.1) * F32(step) + F32(nmax)) / vmax
            l = np.minimum(_nint_i(isc * x), nmax).astype(F32)
            d = x - (F32(1) / isc) * l
            mse = _wsum(w, d, d)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, isc, iscale)
        li = np.minimum(_nint_i(iscale * x), nmax)
        l = li.astype(F32)
        L = (li & 0xFF).astype(F32)
        wx = w * x
        sumlx = _wsum(wx, l)
        suml2 = _wsum(w, l, l)
        for _ in range(5):
            changed = False
            for i in range(x.shape[0]):
                Li = L[i]
                slx = sumlx - wx[i] * Li
                sl2 = suml2 - (w[i] * Li) * Li
                new = np.minimum(_nint_i(_div(x[i] * sl2, slx)), nmax).astype(F32)
                slx2 = slx + wx[i] * new
                sl22 = sl2 + (w[i] * new) * new
                take = ((slx > 0) & (sl2 > 0) & (new != Li)
                        & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
                L[i] = np.where(take, (new.astype(np.int32) & 0xFF).astype(F32), Li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed = changed or bool(take.any())
            if not changed:  # a pass that changes nothing would repeat identically: stop (C's early exit)
                break
        scale = np.where(suml2 > 0, _div(sumlx, suml2), F32(0))
    L[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), L


# ------------------------------------------------------------------- byte helpers (K and legacy)

def _u16(bits: np.ndarray) -> np.ndarray:
    """fp16 bits [nb] -> little-endian bytes [nb, 2]."""
    return bits.astype("<u2").view(np.uint8).reshape(-1, 2)
