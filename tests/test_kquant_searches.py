"""The compiled group searches (quant/_kqnative.c) against their numpy reference, bit for bit.

The numpy searches (``kquants_search``) are proven byte-identical to llama.cpp in
``test_kquants.py``; here the compiled library must reproduce them exactly, kernel by kernel
on adversarial group sets and encoder by encoder on whole tensors. Each test prints how many
outputs it compared and how many differed.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from edgeinfer.quant import legacy_weighted, searches
from edgeinfer.quant.kquants import K_TYPES, quantize_k

F32 = np.float32


@pytest.fixture
def native():
    """The loaded library (the test fails if the install did not build it)."""
    lib = searches._LIB
    assert lib is not None, (
        "the compiled K-quant searches are not in use (implementation: "
        f"{searches.implementation()}); reinstall with a C compiler: python -m pip install -e .")
    return lib


def _both(monkeypatch, lib, fn):
    """fn() with the numpy reference, then with the library."""
    monkeypatch.setattr(searches, "_LIB", None)
    ref = fn()
    monkeypatch.setattr(searches, "_LIB", lib)
    return ref, fn()


def _group_sets(seed: int, n: int) -> dict[str, np.ndarray]:
    """Named [G, n] float32 group sets: the probe set plus scaled, shifted and degenerate data."""
    rng = np.random.default_rng(seed)
    g = 4099                                                  # not a multiple of the 16 lanes
    out = {"probe": searches.probe_groups(seed)[[8, 16, 32].index(n)]}
    out["normal"] = rng.standard_normal((g, n)).astype(F32) * F32(0.02)
    out["large"] = rng.standard_normal((g, n)).astype(F32) * F32(3e4)
    out["shifted"] = rng.standard_normal((g, n)).astype(F32) + F32(3)
    out["outliers"] = np.where(rng.random((g, n)) < 0.02, F32(50), F32(1)) * rng.standard_normal((g, n)).astype(F32)
    out["grid"] = np.round(rng.standard_normal((g, n)) * 8).astype(F32) / F32(8)   # many exact ties
    out["subnormal"] = rng.standard_normal((g, n)).astype(F32) * F32(1e-40)
    signed_zero = np.zeros((g, n), F32)
    signed_zero[::2] = F32(-0.0)
    signed_zero[1::4, 0] = F32(1e-3)
    out["signed_zero"] = signed_zero
    return out


def _scales(x: np.ndarray) -> np.ndarray:
    """Per-row scales for requant: plausible, zero (rows kept), and tiny (|x/d| beyond 2^22)."""
    d = (np.abs(x).max(axis=1) / F32(20)).astype(F32)
    d[::5] = 0
    d[1::9] = F32(1e-38)
    return d


@pytest.mark.parametrize("n", [8, 16, 32])
def test_kernels_match_numpy(monkeypatch, native, n):
    """Every search, with the parameters the encoders use, on every group set: same bits."""
    rng = np.random.default_rng(n)
    calls = {
        "rowsum": lambda x, w: [searches.rowsum(x)],
        "weights_rms_abs": lambda x, w: [searches.weights_rms_abs(x)],
        "requant asym": lambda x, w: [searches.requant(x, (w > 0.01).astype(np.uint8), _scales(x), np.abs(x[:, 1]), 0, 15)],
        "requant sym": lambda x, w: [searches.requant(x, (w > 0.01).astype(np.uint8), _scales(x), None, -32, 31)],
        "qkx Q4_K": lambda x, w: searches.make_qkx(x, w, 15, -1.0, 0.1, 20, False),
        "qkx Q5_K": lambda x, w: searches.make_qkx(x, w, 31, -0.5, 0.1, 15, False),
        "qkx Q2_K mad": lambda x, w: searches.make_qkx(x, np.abs(x), 3, -0.5, 0.1, 15, True),
        "qkx imatrix": lambda x, w: searches.make_qkx(x, w, 15, -0.9, 0.05, 36, False),
        "qx Q6_K": lambda x, w: searches.make_qx(x, 32, x * x),
        "qx Q3_K imatrix": lambda x, w: searches.make_qx(x, 4, w),
        "qx Q5_0 imatrix": lambda x, w: searches.make_qx(x, 16, w),
        "q3 Q3_K": lambda x, w: searches.make_q3(x, 4),
        "qp 63": lambda x, w: searches.make_qp(np.abs(x), 63, w),
        "qp 15": lambda x, w: searches.make_qp(np.abs(x), 15, w),
    }
    compared = differing = 0
    for name, x in _group_sets(n, n).items():
        w = (np.abs(x) + rng.uniform(0, 1, x.shape) * np.abs(x).mean()).astype(F32)
        w[rng.random(x.shape) < 0.03] = 0                     # zero weights, as an imatrix has
        for call_name, call in calls.items():
            ref, got = _both(monkeypatch, native, lambda: call(x, w))
            for a, b in zip(ref, got):
                compared += 1
                bad = a.tobytes() != b.tobytes()
                differing += bad
                if bad:
                    print(f"n={n} {name} {call_name}: differs at",
                          np.argwhere(a.view(np.uint8) != b.view(np.uint8))[:3].tolist())
    print(f"n={n}: {compared} outputs compared, {differing} differ")
    assert differing == 0


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_encoders_match_numpy(monkeypatch, native, qtype):
    """quantize_k with and without an imatrix: the compiled path writes the numpy path's bytes."""
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((24, 1024)) * 0.02).astype(F32)
    x[3] = 0
    x[5, :300] = F32(0.25)
    x[7] *= F32(1e4)
    imatrix = (rng.standard_normal(1024) ** 2).astype(F32)
    imatrix[::17] = 0
    for im in (None, imatrix):
        ref, got = _both(monkeypatch, native, lambda: quantize_k(x, qtype, im, n_threads=1))
        bad = int((ref != got).any(axis=1).sum())
        print(f"{qtype.name} {'imatrix' if im is not None else 'plain'}: {bad}/{ref.shape[0]} rows differ")
        assert bad == 0


@pytest.mark.parametrize("qtype", legacy_weighted.WEIGHTED_TYPES, ids=lambda t: t.name)
def test_weighted_legacy_encoders_match_numpy(monkeypatch, native, qtype):
    rng = np.random.default_rng(50 + int(qtype))
    x = (rng.standard_normal((16, 576)) * 0.05).astype(F32)
    x[2] = 0
    imatrix = (rng.standard_normal(576) ** 2).astype(F32)
    ref, got = _both(monkeypatch, native, lambda: legacy_weighted.quantize_weighted(x, qtype, imatrix))
    bad = int((ref != got).any(axis=1).sum())
    print(f"{qtype.name} imatrix: {bad}/{ref.shape[0]} rows differ")
    assert bad == 0


def test_self_check_refuses_a_library_that_disagrees(native):
    """A library whose scales are off by one ulp is caught by the load-time check."""

    class OffByOneUlp:
        def __getattr__(self, name):
            return getattr(native, name)

        def ei_make_qkx(self, ng, n, nmax, x, w, rmin, rdelta, nstep, mad, scale, the_min, L):
            native.ei_make_qkx(ng, n, nmax, x, w, rmin, rdelta, nstep, mad, scale, the_min, L)
            s = (ctypes.c_uint32 * ng).from_address(scale)
            s[ng // 2] += 1

    why = searches._self_check(OffByOneUlp())
    print("self-check on a wrong library:", why)
    assert why is not None and "differs" in why
    assert searches._self_check(native) is None


def test_numpy_can_be_forced():
    env = dict(os.environ, EDGEINFER_KQUANTS="numpy")
    out = subprocess.run([sys.executable, "-c", "from edgeinfer.quant import searches; print(searches.implementation())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    print("EDGEINFER_KQUANTS=numpy ->", out)
    assert out == "numpy"
