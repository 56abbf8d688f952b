"""ggml's backend registry through ctypes: devices, buffer types, CPU features, weight support.

llama-cpp-python binds ``llama.h`` only. These few functions of ``ggml-backend.h`` (exported by
the ``libggml*`` libraries it ships in ``llama_cpp/lib``) tell edgeinfer, before llama.cpp loads
a model, which buffer types this machine offers and which of them can hold a given weight:

* the CPU device's *extra* buffer types, in llama.cpp's order of preference (``AMX``,
  ``CPU_KLEIDIAI``, ``CPU_REPACK``), found with ``ggml_backend_reg_get_proc_address(reg,
  "ggml_backend_dev_get_extra_bufts")`` exactly as ``make_cpu_buft_list`` in
  src/llama-model.cpp finds them;
* the CPU backend's feature list (``AVX2``, ``AMX_INT8``, ...: ``ggml_backend_get_features``);
* whether a buffer type supports a weight in its matrix multiply: the same probe as
  ``weight_buft_supported`` in src/llama-model-loader.cpp (an unallocated ``ggml_mul_mat`` whose
  weight sits in a zero-size buffer of that type, asked of ``ggml_backend_dev_supports_op``).
  Nothing is computed; no matrix is multiplied.

Everything here reads ggml's state only; :mod:`edgeinfer.backends.llama_placement` decides.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from dataclasses import dataclass

_vp = ctypes.c_void_p

DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type: CPU, GPU, IGPU, ACCEL
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
_TYPE_F32, _TYPE_I32 = 0, 26  # enum ggml_type (same numbers as gguf.GGMLQuantizationType)
_PROBE_ROWS = 512  # the activation width llama.cpp's probe uses


class _InitParams(ctypes.Structure):
    """``struct ggml_init_params`` (ggml.h)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _vp), ("no_alloc", ctypes.c_bool)]


class _TensorHead(ctypes.Structure):
    """The first fields of ``struct ggml_tensor`` (ggml.h): ``type``, then ``buffer``."""

    _fields_ = [("type", ctypes.c_int), ("buffer", _vp)]


class _Feature(ctypes.Structure):
    """``struct ggml_backend_feature`` (ggml-backend.h)."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


@dataclass(frozen=True)
class Device:
    """One ggml device: its name (``CPU``, ``CUDA0``...), kind (``cpu``/``gpu``/...) and buffer types."""

    name: str
    kind: str
    buffer_type: str
    host_buffer_type: str | None
    extra_buffer_types: tuple[str, ...]


def _library_dir() -> str:
    import llama_cpp

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


def _open(stem: str) -> ctypes.CDLL | None:
    """``libggml-base.so`` / ``.dylib`` / ``ggml-base.dll`` from llama_cpp/lib (already loaded by llama_cpp)."""
    d = _library_dir()
    for pat in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll", f"lib{stem}.so.*"):
        for path in sorted(glob.glob(os.path.join(d, pat))):
            return ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    return None


class Ggml:
    """The handful of ggml backend functions edgeinfer needs, declared once (see :func:`ggml`)."""

    def __init__(self) -> None:
        import llama_cpp  # noqa: F401 - loads the libraries and registers the backends

        libs = [lib for lib in (_open("ggml"), _open("ggml-base")) if lib is not None]
        if not libs:
            raise OSError(f"no libggml library in {_library_dir()}")

        def fn(name, restype, *argtypes):
            for lib in libs:
                f = getattr(lib, name, None)
                if f is not None:
                    f.restype, f.argtypes = restype, list(argtypes)
                    return f
            raise OSError(f"ggml function {name} not found in {_library_dir()}")

        self.dev_count = fn("ggml_backend_dev_count", ctypes.c_size_t)
        self.dev_get = fn("ggml_backend_dev_get", _vp, ctypes.c_size_t)
        self.dev_name = fn("ggml_backend_dev_name", ctypes.c_char_p, _vp)
        self.dev_type = fn("ggml_backend_dev_type", ctypes.c_int, _vp)
        self.dev_buffer_type = fn("ggml_backend_dev_buffer_type", _vp, _vp)
        self.dev_host_buffer_type = fn("ggml_backend_dev_host_buffer_type", _vp, _vp)
        self.dev_backend_reg = fn("ggml_backend_dev_backend_reg", _vp, _vp)
        self.dev_supports_op = fn("ggml_backend_dev_supports_op", ctypes.c_bool, _vp, _vp)
        self.reg_proc_address = fn("ggml_backend_reg_get_proc_address", _vp, _vp, ctypes.c_char_p)
        self.buft_name = fn("ggml_backend_buft_name", ctypes.c_char_p, _vp)
        self.buft_alloc_buffer = fn("ggml_backend_buft_alloc_buffer", _vp, _vp, ctypes.c_size_t)
        self.buffer_free = fn("ggml_backend_buffer_free", None, _vp)
        self.cpu_buffer_type = fn("ggml_backend_cpu_buffer_type", _vp)
        self.tensor_overhead = fn("ggml_tensor_overhead", ctypes.c_size_t)
        self.init = fn("ggml_init", _vp, _InitParams)
        self.free = fn("ggml_free", None, _vp)
        self.new_tensor = fn("ggml_new_tensor", ctypes.POINTER(_TensorHead), _vp, ctypes.c_int, ctypes.c_int,
                             ctypes.POINTER(ctypes.c_int64))
        self.mul_mat = fn("ggml_mul_mat", _vp, _vp, _vp, _vp)
        self.mul_mat_id = fn("ggml_mul_mat_id", _vp, _vp, _vp, _vp, _vp)

    # -- devices and buffer types ----------------------------------------------------------------
    def _devices(self) -> list[int]:
        return [self.dev_get(i) for i in range(self.dev_count())]

    def cpu_device(self) -> int | None:
        """The CPU device pointer (None if no CPU backend is registered)."""
        return next((d for d in self._devices() if self.dev_type(d) == DEVICE_TYPE_CPU), None)

    def extra_buffer_types(self, dev: int) -> list[tuple[str, int]]:
        """``(name, pointer)`` of ``dev``'s extra buffer types, in llama.cpp's order of preference."""
        reg = self.dev_backend_reg(dev)
        addr = self.reg_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
        if not addr:
            return []
        arr = ctypes.CFUNCTYPE(ctypes.POINTER(_vp), _vp)(addr)(dev)
        out, i = [], 0
        while arr and arr[i]:
            out.append((self.buft_name(arr[i]).decode(), arr[i]))
            i += 1
        return out

    def features(self, dev: int) -> dict[str, str]:
        """The backend's feature list, e.g. ``{"AVX2": "1", "AMX_INT8": "1", "REPACK": "1"}``."""
        reg = self.dev_backend_reg(dev)
        addr = self.reg_proc_address(reg, b"ggml_backend_get_features") if reg else None
        if not addr:
            return {}
        arr = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), _vp)(addr)(reg)
        out, i = {}, 0
        while arr and arr[i].name:
            out[arr[i].name.decode()] = (arr[i].value or b"").decode()
            i += 1
        return out

    def devices(self) -> list[Device]:
        """Every registered device with its default, host and extra buffer types."""
        out = []
        for d in self._devices():
            host = self.dev_host_buffer_type(d)
            out.append(Device(self.dev_name(d).decode(), DEVICE_TYPES.get(self.dev_type(d), "?"),
                              self.buft_name(self.dev_buffer_type(d)).decode(),
                              self.buft_name(host).decode() if host else None,
                              tuple(n for n, _ in self.extra_buffer_types(d))))
        return out

    def buffer_type(self, name: str) -> int:
        """The pointer of the buffer type called ``name`` (``CPU`` is ``ggml_backend_cpu_buffer_type()``,
        the pointer llama.cpp compares overrides with).

        Raises:
            KeyError: no device offers a buffer type of that name (lists those that exist).
        """
        if name == "CPU":
            return self.cpu_buffer_type()
        seen = {}
        for d in self._devices():
            cands = [self.dev_buffer_type(d), self.dev_host_buffer_type(d)] + [p for _, p in self.extra_buffer_types(d)]
            for p in cands:
                if p:
                    seen[self.buft_name(p).decode()] = p
        if name not in seen:
            raise KeyError(f"no buffer type {name!r} on this machine; there are: {', '.join(sorted(seen))}")
        return seen[name]

    # -- the weight probe ------------------------------------------------------------------------
    def supports_weight(self, buft_name: str, qtype: int, shape: tuple[int, ...], n_expert_used: int = 0) -> bool:
        """Whether the CPU can multiply with a ``qtype`` weight of GGUF ``shape`` held in buffer type ``buft_name``.

        A plain matrix multiply for 2-D weights; with ``n_expert_used > 0`` the weight is a stack of
        experts (``ggml_mul_mat_id``), as in ``weight_buft_supported`` (src/llama-model-loader.cpp).
        """
        import gguf

        dev = self.cpu_device()
        block = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(qtype), (1, 1))[0]
        if dev is None or not 1 <= len(shape) <= 4 or shape[0] % block:  # ggml would assert on these
            return False
        if n_expert_used > 0 and (len(shape) != 3 or n_expert_used > shape[2]):
            return False
        buft = self.buffer_type(buft_name)
        ctx = self.init(_InitParams(self.tensor_overhead() * 8, None, True))
        buf = None
        try:
            ne = (ctypes.c_int64 * 4)(*(list(shape) + [1] * (4 - len(shape))))
            w = self.new_tensor(ctx, int(qtype), len(shape), ne)
            if n_expert_used > 0:
                b = self.new_tensor(ctx, _TYPE_F32, 3, (ctypes.c_int64 * 3)(shape[0], n_expert_used, _PROBE_ROWS))
                ids = self.new_tensor(ctx, _TYPE_I32, 2, (ctypes.c_int64 * 2)(n_expert_used, _PROBE_ROWS))
                op = self.mul_mat_id(ctx, ctypes.cast(w, _vp), ctypes.cast(b, _vp), ctypes.cast(ids, _vp))
            else:
                b = self.new_tensor(ctx, _TYPE_F32, 4, (ctypes.c_int64 * 4)(shape[0], _PROBE_ROWS, ne[2], ne[3]))
                op = self.mul_mat(ctx, ctypes.cast(w, _vp), ctypes.cast(b, _vp))
            if not op:
                return False
            buf = self.buft_alloc_buffer(buft, 0)
            w.contents.buffer = buf
            return bool(self.dev_supports_op(dev, op))
        finally:
            if buf:
                self.buffer_free(buf)
            self.free(ctx)


@functools.lru_cache(maxsize=1)
def ggml() -> Ggml:
    """The process-wide :class:`Ggml` (raises ``OSError`` when the libraries lack these functions)."""
    return Ggml()
