"""Importance matrices in llama.cpp's file formats (GGUF and the legacy ``.dat``).

An importance matrix holds, for every weight matrix the model multiplies activations
with, the sum over calibration tokens of each input column's squared activation, plus
how many activation rows were summed (one count per expert for stacked MoE weights).
``llama-quantize`` turns it into per-column weights (``sum / count``) that the K-quant
encoders use as the weights of the quantization error (``quantize_k(..., imatrix=)``).

Formats (reference: tools/imatrix/imatrix.cpp ``save_imatrix`` / ``save_imatrix_legacy``,
common/imatrix-loader.cpp ``common_imatrix_load``, tools/quantize/quantize.cpp
``load_imatrix``):

* GGUF (current): ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32); per entry, in sorted name
  order, the F32 tensors ``<name>.in_sum2`` (ne = [n_per_row, n_mat], raw sums) and
  ``<name>.counts`` (ne = [1, n_mat]).
* legacy ``.dat`` (little-endian): int32 n_entries; per entry int32 name length, the
  name bytes, int32 ncall, int32 nval, nval float32 = (sum / count) * ncall; then
  optionally int32 chunk count, int32 dataset-name length, dataset name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgeinfer.fileio import atomic_write

GGUF_MAGIC = b"GGUF"


class ImatrixError(ValueError):
    """An imatrix file that cannot be read or an entry that does not fit its tensor."""


@dataclass
class ImatrixEntry:
    """Statistics for one weight matrix.

    Attributes:
        sums: float32 [n_mat, n_per_row]: summed squared activations per input column
            (legacy files: the stored ``(sum / count) * ncall`` values).
        counts: int64 [n_mat]: activation rows summed (legacy files: ``[ncall]``).
    """

    sums: np.ndarray
    counts: np.ndarray


@dataclass
class Imatrix:
    """A whole importance matrix: entries by weight-tensor name plus provenance."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False              # read from a .dat file (values already normalised)

    def add(self, name: str, sq_sums: np.ndarray, n_rows: int, mat: int = 0, n_mat: int = 1) -> None:
        """Accumulate ``sq_sums`` [n_per_row] (sum of x^2 over ``n_rows`` activation rows).

        ``mat``/``n_mat`` select the expert of a stacked MoE weight.
        """
        if self.legacy:
            raise ImatrixError("cannot accumulate into an imatrix read from a legacy .dat file")
        sq = np.asarray(sq_sums, dtype=np.float32).reshape(-1)
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = ImatrixEntry(np.zeros((n_mat, sq.size), np.float32), np.zeros(n_mat, np.int64))
        if e.sums.shape != (n_mat, sq.size):
            raise ImatrixError(f"imatrix entry {name}: shape {e.sums.shape} does not match new data "
                               f"({n_mat} x {sq.size})")
        e.sums[mat] += sq
        e.counts[mat] += int(n_rows)

    def weights(self, name: str) -> np.ndarray | None:
        """The per-column importance llama-quantize passes for ``name`` (None if absent).

        Returns float32 [n_mat * n_per_row]: ``sums / counts`` per expert, 1.0 where an
        expert saw no tokens (GGUF files); ``values / ncall`` for legacy files.
        """
        e = self.entries.get(name)
        if e is None:
            return None
        sums = e.sums.astype(np.float32)
        counts = e.counts.astype(np.float32)
        if self.legacy:
            ncall = counts[0] if counts.size else 0.0
            return (sums / ncall if ncall > 0 else sums).reshape(-1).astype(np.float32)
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen][:, None]
        return out.reshape(-1)


# --------------------------------------------------------------------------- reading

def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix file in either format (GGUF detected by its magic).

    Raises:
        ImatrixError: truncated or malformed file (names the file and the entry).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImatrixError(f"cannot read imatrix file {path}: {e}") from e
    return _load_gguf(path) if magic == GGUF_MAGIC else _load_dat(path)


def _load_gguf(path: Path) -> Imatrix:
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises several types on corrupt files
        raise ImatrixError(f"{path}: not a readable GGUF imatrix ({e})") from e
    fields = r.fields

    def get(key, default):
        return fields[key].contents() if key in fields else default

    im = Imatrix(datasets=list(get(gguf.Keys.IMatrix.DATASETS, [])),
                 chunk_count=int(get(gguf.Keys.IMatrix.CHUNK_COUNT, 0)),
                 chunk_size=int(get(gguf.Keys.IMatrix.CHUNK_SIZE, 0)))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ImatrixError(f"{path}: {t.name} must be F32, is {t.tensor_type.name}")
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.array(t.data, dtype=np.float32)
    if not parts:
        raise ImatrixError(f"{path}: no imatrix entries (no *.in_sum2 / *.counts tensors)")
    for name in sorted(parts):
        p = parts[name]
        if ".in_sum2" not in p or ".counts" not in p:
            raise ImatrixError(f"{path}: entry {name} lacks its {'.counts' if '.in_sum2' in p else '.in_sum2'} tensor")
        counts = np.rint(p[".counts"].reshape(-1)).astype(np.int64)       # std::lround
        sums = p[".in_sum2"].reshape(counts.size, -1)
        im.entries[name] = ImatrixEntry(sums, counts)
    return im


def _load_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path}: truncated legacy imatrix while reading {what} (offset {pos})")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1:
        raise ImatrixError(f"{path}: not an imatrix (GGUF magic missing, legacy entry count {n_entries})")
    im = Imatrix(legacy=True)
    for i in range(n_entries):
        (length,) = take("<i", f"entry {i + 1} name length")
        if not 0 < length < 4096:
            raise ImatrixError(f"{path}: entry {i + 1} has an implausible name length {length}")
        name = take(f"<{length}s", f"entry {i + 1} name")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii", f"entry {name} sizes")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name} has {nval} values")
        values = np.frombuffer(bytes(take(f"<{4 * nval}s", f"entry {name} values")[0]), dtype="<f4")
        im.entries[name] = ImatrixEntry(values.astype(np.float32).reshape(1, -1), np.array([ncall], np.int64))
    if pos + 4 <= len(data):                                   # optional trailer
        (im.chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "the dataset name length")
            if 0 < length <= len(data) - pos:
                im.datasets.append(take(f"<{length}s", "the dataset name")[0].decode("utf-8", "replace"))
    return im


# --------------------------------------------------------------------------- writing

def save_imatrix(im: Imatrix, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write ``im`` as GGUF (default; also chosen by a ``.gguf`` suffix) or legacy ``dat``.

    Raises:
        ImatrixError: unknown format, or a legacy-read imatrix written as GGUF (its raw
            sums are gone; llama.cpp refuses the same conversion without a chunk size).
    """
    path = Path(path)
    fmt = fmt or ("dat" if path.suffix == ".dat" else "gguf")
    if fmt == "gguf":
        return atomic_write(path, lambda p: _write_gguf(im, p))
    if fmt == "dat":
        return atomic_write(path, lambda p: p.write_bytes(_dat_bytes(im)))
    raise ImatrixError(f"unknown imatrix format {fmt!r}; use 'gguf' or 'dat'")


def _write_gguf(im: Imatrix, path: Path) -> None:
    if im.legacy and im.chunk_size <= 0:
        raise ImatrixError(f"{path}: a legacy .dat imatrix has no raw sums; set chunk_size to convert it "
                           "(the values are multiplied by it, as llama-imatrix --in-file does)")
    w = gguf.GGUFWriter(str(path), arch="")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)    # llama.cpp's imatrix files carry none
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        sums = np.asarray(e.sums, np.float32).reshape(len(e.counts), -1)
        counts = np.asarray(e.counts, np.float32).reshape(-1, 1)
        if im.legacy:                                           # (sum/count)*ncall -> raw, as llama.cpp
            sums, counts = sums * np.float32(im.chunk_size), counts * np.float32(im.chunk_size)
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums))   # ne = [n_per_row, n_mat]
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(counts))  # ne = [1, n_mat]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _dat_bytes(im: Imatrix) -> bytes:
    """The legacy layout; like save_imatrix_legacy, entries that saw no tokens are skipped."""
    chunk = im.chunk_size if im.chunk_size > 0 else 1
    out = []
    names = [n for n in sorted(im.entries) if im.legacy or np.any(im.entries[n].counts > 0)]
    out.append(struct.pack("<i", len(names)))
    for name in names:
        e = im.entries[name]
        sums = np.asarray(e.sums, np.float32).reshape(len(e.counts), -1)
        if im.legacy:
            ncall = int(e.counts[0])
            vals = sums.reshape(-1)
        else:
            ncall = int((int(e.counts.max()) + chunk - 1) // chunk)
            cnt = e.counts.astype(np.float32)[:, None]
            vals = np.where(cnt == 0, np.float32(1), sums / np.where(cnt == 0, 1, cnt)) * np.float32(ncall)
        raw = name.encode()
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
        out.append(np.ascontiguousarray(vals.reshape(-1), dtype="<f4").tobytes())
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    out.append(struct.pack("<ii", int(im.chunk_count), len(dataset)) + dataset)
    return b"".join(out)
