"""ggml's own CPU ops through ctypes (llama-cpp-python's libggml), as oracles for ``numerics="llama.cpp"``.

Only exported C functions are used: ``quantize_row_q8_0/q8_1/q8_K`` (what ggml converts
activations with on this CPU) and a one-node graph ``ggml_mul_mat(W, X)`` computed by the CPU
backend, i.e. exactly the kernel llama.cpp runs for a linear layer.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np


def _lib(name: str):
    import llama_cpp

    return ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", name))


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def quantize_row(kind: str, x: np.ndarray, block: int, nbytes: int) -> np.ndarray:
    """ggml's ``quantize_row_<kind>`` on float32 x (whole blocks) -> uint8 [n_blocks, nbytes]."""
    lib = _lib("libggml-cpu.so")
    xn = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(xn.size // block * nbytes, np.uint8)
    getattr(lib, f"quantize_row_{kind}")(xn.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
                                         ctypes.c_int64(xn.size))
    return out.reshape(-1, nbytes)


def mul_mat(raw: np.ndarray, ggml_type: int, n: int, k: int, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """``ggml_mul_mat`` of a [n, k] weight (GGML blocks ``raw``) and float32 x [m, k] -> [m, n] float32."""
    base, cpu = _lib("libggml-base.so"), _lib("libggml-cpu.so")
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = [_InitParams]
    for f in ("ggml_new_tensor_2d", "ggml_mul_mat", "ggml_new_graph", "ggml_get_data"):
        getattr(base, f).restype = ctypes.c_void_p
    base.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    base.ggml_new_graph.argtypes = [ctypes.c_void_p]
    base.ggml_build_forward_expand.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    base.ggml_get_data.argtypes = [ctypes.c_void_p]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    m = x.shape[0]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    xs = np.ascontiguousarray(x, dtype=np.float32)
    ctx = base.ggml_init(_InitParams(raw.nbytes + xs.nbytes * 3 + m * n * 4 + (64 << 20), None, False))
    try:
        w = base.ggml_new_tensor_2d(ctx, ggml_type, k, n)
        b = base.ggml_new_tensor_2d(ctx, 0, k, m)  # GGML_TYPE_F32
        ctypes.memmove(base.ggml_get_data(w), raw.ctypes.data, raw.nbytes)
        ctypes.memmove(base.ggml_get_data(b), xs.ctypes.data, xs.nbytes)
        c = base.ggml_mul_mat(ctx, w, b)
        gf = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(gf, c)
        cpu.ggml_graph_compute_with_ctx(ctx, gf, threads)
        out = np.empty((m, n), np.float32)
        ctypes.memmove(out.ctypes.data, base.ggml_get_data(c), out.nbytes)
        return out
    finally:
        base.ggml_free(ctx)
