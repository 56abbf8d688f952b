"""CPU matmuls that read GGML blocks as stored: the compiled kernels of ``_ggmlcpu.c``, loaded with ctypes.

``y = x @ W.T`` for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights, straight from the
memory-mapped file's blocks (no repacking at load, no widened copy in memory), with the
activations quantized to int8 per 32 values and integer dot products: AVX-512 VNNI, AVX2 or
portable C, picked at load time from the CPU's features (``EDGEINFER_ISA=scalar|avx2|vnni``
narrows it). F32 and F16 weights are read as stored too (float32 sums against float32
activations, F16C widening: an F16 file is not widened to float32 in memory). Rows are split over
:func:`threads` (:func:`set_threads`, else ``torch.get_num_threads()``).

The library is optional. It is built with the package (``setup.py``); when it is missing it is
compiled on first use into the user cache (``cc``, a few seconds, once), and when that fails too
the engine keeps its previous CPU path (:mod:`edgeinfer.kernels.cpu_packed`, slower) and says so
once (:func:`notice`). ``EDGEINFER_NATIVE=0`` turns the library off (tests, comparisons).

Oracle: :mod:`edgeinfer.kernels.ggml_cpu_ref` (the same activation quantization in numpy, the
reference dequantizer, a float64 matmul); ``tests/test_ggml_cpu.py``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import torch

T = gguf.GGMLQuantizationType
log = logging.getLogger(__name__)

_VERSION = 3                      # eg_version() this module expects
#: GGML types the kernels read, with the row length they need to be a multiple of.
SUPPORTED = {T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256}
#: float weights the kernels also read as stored (float32 sums against float32 activations)
FLOAT_ROWS = (T.F32, T.F16)
_SRC = Path(__file__).with_name("_ggmlcpu.c")


class Mat(ctypes.Structure):
    """``eg_mat``: one weight matrix [n, k] of GGML blocks, row r at ``data + r * row_bytes``."""

    _fields_ = [("data", ctypes.c_void_p), ("row_bytes", ctypes.c_int64), ("type", ctypes.c_int32),
                ("n", ctypes.c_int32), ("k", ctypes.c_int32)]


def _disabled() -> bool:
    return os.environ.get("EDGEINFER_NATIVE", "").lower() in ("0", "off", "no", "false")


def _build_on_first_use() -> str | None:
    """Compile ``_ggmlcpu.c`` as a plain shared library into the user cache; its path, or None."""
    if not _SRC.exists():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src = b"".join(_SRC.with_name(f).read_bytes() for f in ("_ggmlcpu.c", "_ggmlcpu_step.h", "_ggmlcpu_simd.h"))
    tag = hashlib.sha256(src).hexdigest()[:16]
    try:
        import platformdirs

        cache = Path(platformdirs.user_cache_dir("edgeinfer")) / "kernels"
    except ImportError:
        cache = Path(tempfile.gettempdir()) / "edgeinfer-kernels"
    out = cache / f"_ggmlcpu-{tag}.so"
    if out.exists():
        return str(out)
    cache.mkdir(parents=True, exist_ok=True)
    print("edgeinfer: compiling the CPU kernels (once; the package was installed without them) ...",
          file=sys.stderr)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, "-O3", "-std=gnu11", "-DEG_NO_PYTHON", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden",
           str(_SRC), "-o", str(tmp), "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("kernel build failed: %s", e)
        return None
    if r.returncode != 0:
        log.debug("kernel build failed: %s", r.stderr[-2000:])
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, out)
    return str(out)


def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, ISA name) or (None, why not)."""
    if _disabled():
        return None, "turned off by EDGEINFER_NATIVE=0"
    spec = importlib.util.find_spec("edgeinfer.kernels._ggmlcpu")
    path = spec.origin if spec is not None and spec.origin else None
    if path is None and os.environ.get("EDGEINFER_NATIVE_BUILD", "1") != "0":
        path = _build_on_first_use()
    if path is None:
        return None, "the compiled kernels are not installed and could not be built (no C compiler?)"
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"cannot load the compiled kernels ({e})"
    lib.eg_version.restype = ctypes.c_int
    if lib.eg_version() != _VERSION:
        return None, "the compiled kernels are from another version; reinstall edgeinfer (pip install -e .)"
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.eg_init.restype = ctypes.c_char_p
    lib.eg_init.argtypes = [ctypes.c_char_p]
    lib.eg_linear.restype = ctypes.c_int
    lib.eg_linear.argtypes = [p, ctypes.c_int, p, ctypes.c_int, i64, p, i64, ctypes.c_int]
    lib.eg_dequant.restype = ctypes.c_int
    lib.eg_dequant.argtypes = [p, ctypes.c_int, ctypes.c_int, p, ctypes.c_int, ctypes.c_int]
    lib.eg_quantize.restype = None
    lib.eg_quantize.argtypes = [p, i64, ctypes.c_int, p]
    lib.eg_quantize_k.restype = None
    lib.eg_quantize_k.argtypes = [p, i64, ctypes.c_int, p]
    lib.eg_step_scratch.restype = i64
    lib.eg_step_scratch.argtypes = [p]
    lib.eg_step.restype = ctypes.c_int
    lib.eg_step.argtypes = [p, p, ctypes.c_int, p, ctypes.c_int]
    lib.eg_step_scratch_batch.restype = i64
    lib.eg_step_scratch_batch.argtypes = [p, ctypes.c_int]
    lib.eg_step_batch.restype = ctypes.c_int
    lib.eg_step_batch.argtypes = [p, ctypes.c_int, p, p, p, ctypes.c_int, p, p, ctypes.c_int]
    del i32
    isa = lib.eg_init(os.environ.get("EDGEINFER_ISA", "").encode()).decode()
    return lib, isa


LIB, ISA = _load()
_noticed = False


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return LIB is not None


def set_isa(name: str = "") -> str:
    """Use the kernels of ISA ``name`` ("scalar", "avx2", "vnni"; "" = the best this CPU has,
    never more than it has); returns the one now in use. For tests and benchmarks."""
    global ISA
    if LIB is not None:
        ISA = LIB.eg_init(name.encode()).decode()
    return ISA


def notice() -> None:
    """Say once per process that the kernels are missing (the engine runs slower without them)."""
    global _noticed
    if LIB is None and not _noticed:
        _noticed = True
        log.warning("edgeinfer: CPU kernels unavailable (%s); the torch engine uses its slower packed-int4 "
                    "path. Reinstall with a C compiler present (pip install -e .) for full speed.", ISA)


def can_run(qtype, n: int, k: int) -> bool:
    """Whether the kernels take a [n, k] weight of ``qtype`` (a block type, or F32 / F16 rows)."""
    mult = SUPPORTED.get(qtype) or (1 if qtype in FLOAT_ROWS else None)
    return LIB is not None and mult is not None and k % mult == 0 and n > 0


def mat(raw: torch.Tensor, qtype, n: int, k: int) -> Mat:
    """The ``eg_mat`` of a uint8 [n, row_bytes] block tensor (rows contiguous; kept alive by the caller)."""
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[0] != n or raw.stride(1) != 1:
        raise ValueError(f"expected uint8 [{n}, row_bytes] rows, got {raw.dtype} {tuple(raw.shape)}")
    return Mat(raw.data_ptr(), raw.stride(0), int(qtype), n, k)


FLOAT_GEMM_M = 32   # GGMLCPU.matmul: F16 rows go through torch's GEMM from this many activation rows
_WIDEN_ROWS = 2048  # rows widened to float32 at a time there (8 MiB at k = 1024)
_THREADS: int | None = None  # set_threads(); None = torch's intra-op thread count


def set_threads(n: int | None) -> None:
    """Threads the kernels split rows over (None: follow ``torch.get_num_threads()``)."""
    global _THREADS
    _THREADS = None if n is None else max(1, int(n))


def threads() -> int:
    return _THREADS or torch.get_num_threads()


def linear(mats, x: torch.Tensor) -> torch.Tensor:
    """x: [M, K] -> [M, sum of n] float32: ``x @ W_i.T`` for each matrix, side by side.

    Args:
        mats: a ctypes array of :class:`Mat` (same k), e.g. ``(Mat * 3)(q, k, v)``.
        x: float activations (made contiguous float32).
    """
    x = x.to(torch.float32).contiguous()
    m = x.shape[0]
    n = sum(w.n for w in mats)
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    rc = LIB.eg_linear(ctypes.addressof(mats), len(mats), x.data_ptr(), m, x.shape[1], y.data_ptr(), n, threads())
    if rc != 0:
        raise RuntimeError(f"eg_linear failed for {[T(w.type).name for w in mats]} k={x.shape[1]}")
    return y


class GGMLCPU:
    """One (or several fused) weight matrices read by the kernels from their GGML blocks.

    Args:
        parts: ``(raw uint8 [n, row_bytes], qtype, n, k)`` per matrix, same k; the raw views
            (normally of the memory-mapped file) are kept referenced, never copied.
    """

    def __init__(self, parts: list[tuple[torch.Tensor, object, int, int]]):
        self.raws = [p[0] for p in parts]
        self.k = parts[0][3]
        self.mats = (Mat * len(parts))(*(mat(r, q, n, k) for r, q, n, k in parts))
        self.n = sum(p[2] for p in parts)

    @classmethod
    def concat(cls, parts: list["GGMLCPU"]) -> "GGMLCPU":
        out = cls.__new__(cls)
        out.raws = [r for p in parts for r in p.raws]
        out.k = parts[0].k
        out.mats = (Mat * sum(len(p.mats) for p in parts))(*(m for p in parts for m in p.mats))
        out.n = sum(p.n for p in parts)
        return out

    def nbytes(self) -> int:
        return sum(r.numel() for r in self.raws)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N] float32 (any M: each row of x is quantized and multiplied on its own,
        so a row's result does not depend on the batch it is in -- prefill and decode agree, as in
        llama.cpp; a float32 matmul on dequantized chunks measured no faster for prefill here).

        F16 rows from ``FLOAT_GEMM_M`` activation rows up: torch's float32 GEMM on row chunks widened
        on the fly (measured faster than the kernels' row loop from M = 32 on small matrices; below it
        the kernels win, 1.7x at M = 1, 1.2x at M = 5; on a 49152-row LM head at every M). Only a
        chunk is ever widened: the weights stay half in memory."""
        if x.shape[0] >= FLOAT_GEMM_M and all(w.type == T.F16 for w in self.mats):
            return self._widened_matmul(x)
        return linear(self.mats, x)

    def _widened_matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        col = 0
        for raw, w in zip(self.raws, self.mats):
            half = raw.view(torch.float16)  # [n, k]
            for r0 in range(0, w.n, _WIDEN_ROWS):
                r1 = min(w.n, r0 + _WIDEN_ROWS)
                y[:, col + r0:col + r1] = x @ half[r0:r1].float().T
            col += w.n
        return y

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """All rows as [N, K] float32 or bfloat16, dequantized by the kernels (tests)."""
        out = torch.empty(self.n, self.k, dtype=dtype)
        r = 0
        for w in self.mats:
            if LIB.eg_dequant(ctypes.byref(w), 0, w.n, out[r:].data_ptr(), int(dtype == torch.bfloat16),
                              threads()) != 0:
                raise RuntimeError(f"eg_dequant failed for {T(w.type).name}")
            r += w.n
        return out
