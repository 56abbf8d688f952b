"""Row sources: where the rows of one GGUF tensor come from, read a chunk at a time.

Every output tensor of a conversion is a :class:`RowSource`: its ``shape`` (numpy order; the last
axis is the row, what ggml quantizes block by block; a 3-D ``[n_expert, rows, cols]`` tensor is
``n_expert * rows`` rows) and a reader ``read(r0, r1) -> float32 [r1 - r0, cols]`` opened with
``with src.open() as read``. The writer streams every tensor through the row encoders with such a
reader, so neither a source tensor nor its encoded output is ever whole in memory, whatever its
shape. Readers are called from several encoder threads at once, in any order.

The small set of sources an architecture composes (``quant/archs/*.py``):

=================  ==================================================================
``Tensor(ref)``    the rows of one checkpoint tensor (``index=e``: its slice ``e`` of axis 0)
``Stack(srcs)``    sources of one shape stacked on a new leading axis, read one after another
                   (per-expert tensors -> llama.cpp's 3-D ``ffn_*_exps``)
``Rows(src, a, b)``  rows ``a:b`` of a source (a fused ``gate_up`` split, a trimmed vocabulary)
``Permute(src, p)``  rows in another order (output row ``i`` is source row ``p[i]``; for a 1-D
                   source, its elements)
``Map(src, fn)``   a row-local fix-up ``fn(x: torch.Tensor [n, cols]) -> same shape``
``Transpose(src)`` every slice of a 3-D source transposed (``[H, a, b]`` -> ``[H, b, a]``)
``Pad(src, n, r)``  a 2-D source extended to ``n`` rows, the new rows copies of its row ``r`` (or zeros)
``Constant(s, v)``  a tensor of one value, produced a chunk at a time (placeholders a loader requires)
``Generated(x)``   a tensor computed from the config (``rope_freqs``)
=================  ==================================================================
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from edgeinfer.errors import ConversionError
from edgeinfer.quant.source import ST_DTYPES, TensorRef

Reader = Callable[[int, int], "np.ndarray | torch.Tensor"]


class RowSource:
    """Base class: ``shape``, the checkpoint tensors read (``refs``) and ``open()``."""

    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows as the encoders see them: every axis but the last."""
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def refs(self) -> list[TensorRef]:
        """The checkpoint tensors this source reads (empty for generated ones)."""
        return []

    @property
    def name(self) -> str | None:
        """The checkpoint name when exactly one tensor is read (maybe in parts), else None."""
        names = {r.name for r in self.refs}
        return names.pop() if len(names) == 1 else None

    def open(self) -> contextlib.AbstractContextManager[Reader]:
        raise NotImplementedError  # every concrete source defines it

    def describe(self) -> str:
        """Where the rows come from, for messages and ``--dry-run``."""
        return type(self).__name__

    def read_all(self) -> torch.Tensor:
        """The whole tensor as float32 ``shape`` (for encoders that need all of it at once)."""
        with self.open() as read:
            x = read(0, self.rows)
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        return x.to(torch.float32).reshape(self.shape)


class Tensor(RowSource):
    """The rows of one checkpoint tensor; with ``index``, only its slice ``index`` along axis 0."""

    def __init__(self, ref: TensorRef, index: int | None = None):
        self.ref, self.index = ref, index
        shape = tuple(ref.shape)
        if index is not None:
            if len(shape) < 2 or not 0 <= index < shape[0]:
                raise ConversionError(f"{ref.file}: tensor {ref.name!r} {list(shape)} has no slice {index}")
            shape = shape[1:]
        self.shape = shape
        self._row0 = 0 if index is None else index * (math.prod(shape[:-1]) if len(shape) > 1 else 1)

    @property
    def refs(self) -> list[TensorRef]:
        return [self.ref]

    def describe(self) -> str:
        return self.ref.name + (f"[{self.index}]" if self.index is not None else "")

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        if self.ref.dtype not in ST_DTYPES:
            self.ref._check_dtype()  # raises the user-facing error
        if self.ref.n_elements == 0:
            yield lambda r0, r1: np.zeros((r1 - r0, self.cols), dtype=np.float32)
            return
        with self.ref.open_rows() as reader:
            row0 = self._row0
            yield lambda r0, r1: reader.rows(row0 + r0, row0 + r1)


class Stack(RowSource):
    """Sources of one shape stacked on a new leading axis: ``[len(srcs), *shape]``, read in order.

    Each part is opened when a read first reaches it and closed with the stack, so only the
    rows being encoded are in memory (a 128-expert tensor never is).
    """

    def __init__(self, srcs: Sequence[RowSource]):
        if not srcs:
            raise ValueError("Stack needs at least one source")
        shapes = {tuple(s.shape) for s in srcs}
        if len(shapes) != 1:
            raise ConversionError(f"cannot stack tensors of different shapes {sorted(shapes)}: "
                                  f"{', '.join(s.describe() for s in srcs[:4])}")
        self.parts = list(srcs)
        self.part_shape = tuple(srcs[0].shape)
        self.shape = (len(srcs), *self.part_shape)
        self.part_rows = srcs[0].rows

    @property
    def refs(self) -> list[TensorRef]:
        return [r for p in self.parts for r in p.refs]

    def describe(self) -> str:
        return f"stack of {len(self.parts)}: {self.parts[0].describe()} ... {self.parts[-1].describe()}"

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        with contextlib.ExitStack() as stack:
            readers: dict[int, Reader] = {}
            lock = threading.Lock()

            def part(i: int) -> Reader:
                with lock:
                    if i not in readers:
                        readers[i] = stack.enter_context(self.parts[i].open())
                    return readers[i]

            def read(r0: int, r1: int):
                pr = self.part_rows
                out = []
                while r0 < r1:
                    i, off = divmod(r0, pr)
                    n = min(r1 - r0, pr - off)
                    out.append(np.asarray(part(i)(off, off + n), dtype=np.float32))
                    r0 += n
                return out[0] if len(out) == 1 else np.concatenate(out)

            yield read


class Rows(RowSource):
    """Rows ``r0:r1`` of a 2-D ``src`` (one half of a fused projection, a trimmed vocabulary)."""

    def __init__(self, src: RowSource, r0: int, r1: int):
        if len(src.shape) != 2 or not 0 <= r0 < r1 <= src.shape[0]:
            raise ConversionError(f"rows {r0}:{r1} are outside {src.describe()} {list(src.shape)}")
        self.src, self.r0, self.r1 = src, r0, r1
        self.shape = (r1 - r0, src.shape[1])

    @property
    def refs(self) -> list[TensorRef]:
        return self.src.refs

    def describe(self) -> str:
        return f"{self.src.describe()}[{self.r0}:{self.r1}]"

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        with self.src.open() as read:
            base = self.r0
            yield lambda a, b: read(base + a, base + b)


class Permute(RowSource):
    """Output row ``i`` is ``src`` row ``perm[i]`` (a 1-D source: output element ``i`` is element ``perm[i]``)."""

    def __init__(self, src: RowSource, perm: np.ndarray):
        perm = np.asarray(perm, dtype=np.int64)
        n = src.cols if len(src.shape) == 1 else src.rows
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise ValueError(f"not a permutation of {n} for {src.describe()}")
        self.src, self.perm, self.shape = src, perm, tuple(src.shape)

    @property
    def refs(self) -> list[TensorRef]:
        return self.src.refs

    def describe(self) -> str:
        return f"permuted {self.src.describe()}"

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        with self.src.open() as read:
            if len(self.shape) == 1:
                yield lambda a, b: np.asarray(read(0, 1), dtype=np.float32)[:, self.perm]
                return

            def rows(a: int, b: int):
                idx = self.perm[a:b]
                lo, hi = int(idx.min()), int(idx.max()) + 1
                return np.asarray(read(lo, hi), dtype=np.float32)[idx - lo]

            yield rows


class Map(RowSource):
    """``fn`` applied to every chunk of rows: a row-local fix-up (``torch.Tensor [n, cols] -> same``)."""

    def __init__(self, src: RowSource, fn: Callable[[torch.Tensor], torch.Tensor], what: str = ""):
        self.src, self.fn, self.what, self.shape = src, fn, what or getattr(fn, "__name__", "fix-up"), tuple(src.shape)

    @property
    def refs(self) -> list[TensorRef]:
        return self.src.refs

    def describe(self) -> str:
        return f"{self.what}({self.src.describe()})"

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        with self.src.open() as read:
            def rows(a: int, b: int):
                x = read(a, b)
                x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
                y = self.fn(x)
                if tuple(y.shape) != tuple(x.shape):
                    raise ConversionError(f"{self.describe()}: fix-up changed a chunk's shape "
                                          f"{list(x.shape)} -> {list(y.shape)}")
                return y

            yield rows


class Transpose(RowSource):
    """A 3-D source ``[H, a, b]`` as ``[H, b, a]``: each slice transposed, read one slice at a time
    (DeepSeek's per-head ``attn_k_b``)."""

    def __init__(self, src: RowSource):
        self.src = src
        h, a, b = src.shape
        self.shape = (h, b, a)

    @property
    def refs(self):
        return self.src.refs

    def describe(self) -> str:
        return f"transposed {self.src.describe()}"

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        _, b, a = self.shape
        with self.src.open() as read:
            def rows(r0: int, r1: int):
                out = []
                while r0 < r1:  # output rows of slice i are the columns of source rows i*a .. (i+1)*a
                    i, off = divmod(r0, b)
                    n = min(r1 - r0, b - off)
                    blk = np.asarray(read(i * a, (i + 1) * a), dtype=np.float32)  # [a, b]
                    out.append(np.ascontiguousarray(blk[:, off:off + n].T))
                    r0 += n
                return out[0] if len(out) == 1 else np.concatenate(out)

            yield rows


class Pad(RowSource):
    """A 2-D ``src`` extended to ``n_rows``: rows past its end are copies of its row ``fill_row``,
    or zeros when ``fill_row`` is None (Gemma 3n's per-layer table padded to the vocabulary)."""

    def __init__(self, src: RowSource, n_rows: int, fill_row: int | None = None):
        if len(src.shape) != 2 or n_rows < src.shape[0]:
            raise ConversionError(f"cannot pad {src.describe()} {list(src.shape)} to {n_rows} rows")
        if fill_row is not None and not 0 <= fill_row < src.shape[0]:
            raise ConversionError(f"{src.describe()} has no row {fill_row} to pad with")
        self.src, self.fill_row, self.shape = src, fill_row, (n_rows, src.shape[1])

    @property
    def refs(self) -> list[TensorRef]:
        return self.src.refs

    def describe(self) -> str:
        fill = "zeros" if self.fill_row is None else f"row {self.fill_row}"
        return f"{self.src.describe()} + {self.shape[0] - self.src.shape[0]} rows of {fill}"

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        n, cols = self.src.shape
        with self.src.open() as read:
            fill = (np.zeros((1, cols), dtype=np.float32) if self.fill_row is None
                    else np.asarray(read(self.fill_row, self.fill_row + 1), dtype=np.float32))

            def rows(a: int, b: int):
                out = [np.asarray(read(a, min(b, n)), dtype=np.float32)] if a < n else []
                if b > n:
                    out.append(np.repeat(fill, b - max(a, n), axis=0))
                return out[0] if len(out) == 1 else np.concatenate(out)

            yield rows


class Constant(RowSource):
    """A tensor of ``shape`` holding ``value`` everywhere, produced a chunk at a time (never whole in
    memory): placeholders for tensors a loader requires but never reads."""

    def __init__(self, shape: tuple[int, ...], value: float = 0.0, what: str = ""):
        self.shape, self.value, self.what = tuple(shape), float(value), what or f"constant {value:g}"

    def describe(self) -> str:
        return self.what

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        yield lambda a, b: np.full((b - a, self.cols), self.value, dtype=np.float32)


class Generated(RowSource):
    """A tensor computed at plan time (small: kept in memory)."""

    def __init__(self, x: torch.Tensor, what: str = "generated"):
        self.x = x.to(torch.float32).contiguous()
        self.shape, self.what = tuple(self.x.shape), what

    def describe(self) -> str:
        return self.what

    @contextlib.contextmanager
    def open(self) -> Iterator[Reader]:
        x2 = self.x.reshape(self.rows, self.cols)
        yield lambda a, b: x2[a:b]
