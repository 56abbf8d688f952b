"""Validate a GGUF file in pure Python before any native code sees it.

llama.cpp trusts its input: a truncated or corrupt file can crash it (or worse). This module
walks the whole header (metadata key/values and tensor table) with bounds checks and verifies
that every tensor's data lies inside the file, so a bad file becomes a clear
:class:`~edgeinfer.errors.InvalidModelError` that names the file and the problem.

Format reference: ggml/docs/gguf.md and ``gguf_init_from_file_impl`` in ggml/src/gguf.cpp.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgeinfer.errors import InvalidModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Arrays longer than this are summarized (type + length) instead of being decoded.
_KEEP_ARRAY_ITEMS = 64

_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


@dataclass
class TensorEntry:
    """One row of the GGUF tensor table. ``shape`` is in GGUF order (ne0 = row length first)."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class ArraySummary:
    """A metadata array too long to keep (e.g. the vocabulary): its element type and length."""

    item_type: gguf.GGUFValueType
    length: int


#: ``general.architecture`` prefix of files only edgeinfer's torch engine runs (``convert --torch-only``):
#: stock llama.cpp, Ollama and LM Studio refuse an unknown architecture instead of computing it wrong.
TORCH_ONLY_PREFIX = "edgeinfer-"


@dataclass
class GGUFFile:
    """What :func:`validate_gguf` read: version, metadata, tensor table, sizes."""

    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: list[TensorEntry] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(gguf.Keys.General.ARCHITECTURE, "unknown"))

    def arch_key(self, template: str, default=None):
        """Read an architecture-scoped key, e.g. ``arch_key(gguf.Keys.LLM.CONTEXT_LENGTH)``."""
        return self.metadata.get(template.format(arch=self.architecture), default)

    @property
    def torch_only(self) -> str | None:
        """Why stock llama.cpp cannot run this file (a ``--torch-only`` conversion), or None."""
        if not self.architecture.startswith(TORCH_ONLY_PREFIX):
            return None
        return str(self.metadata.get("edgeinfer.torch_only") or "converted with --torch-only")

    def stock_view(self) -> tuple[str, dict]:
        """``(architecture, metadata)`` as a stock file of the same architecture would have them:
        a ``--torch-only`` file's ``edgeinfer-<arch>`` prefix removed from the name and its keys."""
        arch = self.architecture
        if not arch.startswith(TORCH_ONLY_PREFIX):
            return arch, self.metadata
        base = arch[len(TORCH_ONLY_PREFIX):]
        md = {(base + k[len(arch):] if k.startswith(arch + ".") else k): v for k, v in self.metadata.items()}
        md[gguf.Keys.General.ARCHITECTURE] = base
        return base, md


class _Cursor:
    def __init__(self, buf, path: Path, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InvalidModelError(
                f"{self.path}: truncated or corrupt GGUF: {what} at byte {self.pos} needs {n} bytes "
                f"but the file has {self.size} bytes (re-download or re-convert the file)"
            )

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what + " length")
        self._need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidModelError(f"{self.path}: corrupt GGUF: {what} is not valid UTF-8 ({e})") from None

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n


def _value_type(cur: _Cursor, what: str) -> gguf.GGUFValueType:
    raw = cur.scalar("<I", what)
    try:
        return gguf.GGUFValueType(raw)
    except ValueError:
        raise InvalidModelError(f"{cur.path}: corrupt GGUF: {what} has unknown value type {raw}") from None


def _skip_strings(cur: _Cursor, length: int, key: str) -> None:
    """Check ``length`` strings (bounds, UTF-8) of array ``key`` and move past them: the same checks
    as :meth:`_Cursor.string` in one tight loop (a 150k-token vocabulary in ~0.1 s, not ~1 s)."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, struct.unpack_from
    mv = memoryview(buf)
    try:
        for i in range(length):
            if pos + 8 > size:
                cur.pos = pos
                cur._need(8, f"item {i} of {key!r} length")
            (n,) = unpack("<Q", buf, pos)
            pos += 8
            if pos + n > size:
                cur.pos = pos
                cur._need(n, f"item {i} of {key!r}")
            try:
                str(mv[pos:pos + n], "utf-8")
            except UnicodeDecodeError as e:
                raise InvalidModelError(f"{cur.path}: corrupt GGUF: item {i} of {key!r} is not valid UTF-8 ({e})") from None
            pos += n
    finally:
        mv.release()
    cur.pos = pos


def _read_value(cur: _Cursor, vtype: gguf.GGUFValueType, key: str, depth: int = 0):
    if vtype in _SCALAR_FORMATS:
        return cur.scalar(_SCALAR_FORMATS[vtype], f"value of {key!r}")
    if vtype == gguf.GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype == gguf.GGUFValueType.ARRAY:
        if depth > 1:
            raise InvalidModelError(f"{cur.path}: corrupt GGUF: nested arrays too deep in {key!r}")
        item_type = _value_type(cur, f"array type of {key!r}")
        length = cur.scalar("<Q", f"array length of {key!r}")
        if item_type in _SCALAR_FORMATS:
            size = struct.calcsize(_SCALAR_FORMATS[item_type])
            cur._need(length * size, f"array {key!r}")
            if length <= _KEEP_ARRAY_ITEMS:
                fmt = "<" + _SCALAR_FORMATS[item_type][1] * length
                vals = list(struct.unpack_from(fmt, cur.buf, cur.pos))
                cur.pos += length * size
                return vals
            cur.pos += length * size
            return ArraySummary(item_type, length)
        if item_type == gguf.GGUFValueType.STRING and length > _KEEP_ARRAY_ITEMS:
            _skip_strings(cur, length, key)  # a vocabulary: checked, not kept
            return ArraySummary(item_type, length)
        items = [_read_value(cur, item_type, key, depth + 1) for _ in range(length)]
        return items if length <= _KEEP_ARRAY_ITEMS else ArraySummary(item_type, length)
    raise InvalidModelError(f"{cur.path}: corrupt GGUF: unsupported value type {vtype} for {key!r}")


def validate_gguf(path: str | os.PathLike) -> GGUFFile:
    """Check that ``path`` is a complete, well-formed GGUF and return its header.

    Raises:
        ModelNotFoundError-like :class:`InvalidModelError` when the file is missing, is not a
        GGUF, uses an unsupported version, is truncated, or has an inconsistent tensor table.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, expected a .gguf file")
    size = path.stat().st_size
    if size < 24:
        raise InvalidModelError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            hint = " (this looks like a safetensors/PyTorch checkpoint: use `edgeinfer convert`)" if path.suffix in (
                ".safetensors", ".bin", ".pt", ".pth") else ""
            raise InvalidModelError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF'){hint}")
        cur = _Cursor(mm, path, size)
        cur.pos = 4
        version = cur.scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            raise InvalidModelError(
                f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS}); "
                "re-convert the model with a current converter")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # Each kv needs >= 12 bytes and each tensor info >= 24: reject absurd counts up front.
        if n_kv * 12 + n_tensors * 24 > size:
            raise InvalidModelError(
                f"{path}: corrupt GGUF header: {n_kv} metadata entries / {n_tensors} tensors cannot fit in {size} bytes")
        meta: dict = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = _value_type(cur, f"type of {key!r}")
            meta[key] = _read_value(cur, vtype, key)
        alignment = meta.get(gguf.Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise InvalidModelError(f"{path}: corrupt GGUF: general.alignment={alignment!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<I", f"dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise InvalidModelError(f"{path}: corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
            shape = tuple(cur.scalar("<Q", f"shape of tensor {name!r}") for _ in range(n_dims))
            raw_type = cur.scalar("<I", f"type of tensor {name!r}")
            offset = cur.scalar("<Q", f"offset of tensor {name!r}")
            infos.append((name, shape, raw_type, offset))
        data_offset = (cur.pos + alignment - 1) // alignment * alignment

    tensors: list[TensorEntry] = []
    seen: set[str] = set()
    for name, shape, raw_type, offset in infos:
        if name in seen:
            raise InvalidModelError(f"{path}: corrupt GGUF: tensor {name!r} appears twice")
        seen.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise InvalidModelError(
                f"{path}: tensor {name!r} has unknown ggml type {raw_type} (file from a newer llama.cpp?)") from None
        if any(d <= 0 for d in shape):
            raise InvalidModelError(f"{path}: corrupt GGUF: tensor {name!r} has shape {shape}")
        if shape[0] % block:
            raise InvalidModelError(
                f"{path}: corrupt GGUF: tensor {name!r} row length {shape[0]} is not a multiple of "
                f"{qtype.name}'s block size {block}")
        if offset % alignment:
            raise InvalidModelError(f"{path}: corrupt GGUF: tensor {name!r} offset {offset} is not {alignment}-aligned")
        n = int(np.prod(shape, dtype=np.int64))
        nbytes = n // block * type_size
        start = data_offset + offset
        if start + nbytes > size:
            raise InvalidModelError(
                f"{path}: truncated GGUF: tensor {name!r} needs bytes {start}..{start + nbytes} "
                f"but the file has {size} bytes (incomplete download? re-download or re-convert it)")
        tensors.append(TensorEntry(name, shape, qtype, start, nbytes))
    return GGUFFile(path, version, meta, tensors, alignment, data_offset, size)
