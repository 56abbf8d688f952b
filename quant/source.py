"""A Hugging Face checkpoint on disk: resolve it, read its config, stream its tensors lazily.

``open_checkpoint(SRC)`` accepts a local folder or a hub repo id (resolved from the local Hugging
Face cache; downloaded only when online is allowed). Tensors come from ``*.safetensors`` files
(single or sharded with ``model.safetensors.index.json``), whose headers are parsed and validated
here; tensor data is read through a memory map opened per tensor and dropped right after, so
resident memory never holds more than the tensor being converted. Pickle checkpoints
(``.bin``/``.pt``) are refused: loading them can execute code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeinfer.errors import ConversionError

log = logging.getLogger(__name__)

# safetensors dtype -> (numpy storage dtype, bytes per element). bf16 is stored as uint16.
ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
ST_KNOWN = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class TensorRef:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int  # absolute offset in file
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def _check_dtype(self) -> None:
        if self.dtype not in ST_DTYPES:
            raise ConversionError(
                f"{self.file}: tensor {self.name!r} has dtype {self.dtype}; only F32, F16 and BF16 weights "
                f"can be converted (re-save the checkpoint in one of those, e.g. torch_dtype=bfloat16)")

    def open_rows(self) -> "RowReader":
        """A context manager that maps this tensor and reads row ranges as float32."""
        self._check_dtype()
        return RowReader(self)

    def load_f32(self) -> torch.Tensor:
        """Read the tensor as float32 (one copy in memory; the map is released on return).

        Raises:
            ConversionError: unsupported dtype.
        """
        self._check_dtype()
        np_dtype, _ = ST_DTYPES[self.dtype]
        if self.n_elements == 0:
            return torch.zeros(self.shape, dtype=torch.float32)
        mm = np.memmap(self.file, dtype=np_dtype, mode="r", offset=self.start, shape=self.shape)
        out = to_f32(mm, self.dtype)
        del mm  # the last reference: the map (and its resident pages) is released here
        return torch.from_numpy(out)


def to_f32(a: np.ndarray, st_dtype: str) -> np.ndarray:
    """Stored values (float32/float16/bf16-as-uint16) -> a new float32 array."""
    if st_dtype == "BF16":
        u = a.astype(np.uint32)
        np.left_shift(u, 16, out=u)
        return u.view(np.float32)
    return np.array(a, dtype=np.float32)


class RowReader:
    """One 2-D tensor open for the duration of a ``with`` block; ``rows(r0, r1)`` -> float32 copy.

    Rows are read with ``os.pread`` (thread-safe, releases the GIL) rather than through a memory
    map, so file pages never count toward this process's resident memory.
    """

    def __init__(self, ref: TensorRef):
        self.ref = ref
        self.fd: int | None = None
        self.np_dtype, self.itemsize = ST_DTYPES[ref.dtype]
        self.cols = ref.shape[-1] if ref.shape else 1

    def __enter__(self) -> "RowReader":
        self.fd = os.open(self.ref.file, os.O_RDONLY)
        return self

    def rows(self, r0: int, r1: int) -> np.ndarray:
        assert self.fd is not None
        row_bytes = self.cols * self.itemsize
        n = (r1 - r0) * row_bytes
        raw = os.pread(self.fd, n, self.ref.start + r0 * row_bytes)
        if len(raw) != n:
            raise ConversionError(f"{self.ref.file}: tensor {self.ref.name!r} is truncated; re-download the file")
        a = np.frombuffer(raw, dtype=self.np_dtype).reshape(r1 - r0, self.cols)
        return to_f32(a, self.ref.dtype)  # [r1-r0, cols]

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Checkpoint:
    """A resolved checkpoint folder: config, tensor table and tokenizer files."""

    path: Path
    config: dict
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    repo_id: str | None = None

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: {what} is not valid JSON ({e}); re-download the checkpoint") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read {what} ({e.strerror})") from None


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate one ``.safetensors`` file's header.

    Returns:
        name -> :class:`TensorRef` with absolute offsets.
    Raises:
        ConversionError: truncated file, bad header JSON, offsets out of range or inconsistent sizes.
    """
    size = path.stat().st_size
    fix = "the file is corrupt or truncated: re-download or re-save it"
    if size < 8:
        raise ConversionError(f"{path}: too small to be a safetensors file ({size} bytes); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{path}: safetensors header length {n} is invalid for a {size}-byte file; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: safetensors header is not valid JSON ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not a JSON object; {fix}")
    base = 8 + n
    out: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: header entry for tensor {name!r} is malformed; {fix}") from None
        if dtype not in ST_KNOWN:
            raise ConversionError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; {fix}")
        if not (0 <= b <= e and base + e <= size) or e - b != math.prod(shape) * ST_KNOWN[dtype]:
            raise ConversionError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets [{b}, {e}) that do not fit "
                f"the file ({size - base} data bytes); {fix}")
        out[name] = TensorRef(name, path, dtype, shape, base + b, base + e)
    return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        idx = _read_json(index, "the shard index")
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConversionError(f"{index}: no 'weight_map' in the shard index; re-download the checkpoint")
        files = sorted(set(wm.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ConversionError(
                f"{folder}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json are missing; "
                f"download the complete checkpoint")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise ConversionError(
            f"{folder}: only pickle weights ({', '.join(pickles)}) were found; edgeinfer does not load pickles "
            f"(they can run code). Convert them to safetensors first, e.g. load the model with transformers "
            f"and call save_pretrained(..., safe_serialization=True)")
    raise ConversionError(f"{folder}: no model weights (*.safetensors) found; download the full checkpoint")


def resolve_source(src: str, offline: bool | None = None) -> tuple[Path, str | None]:
    """Turn SRC (folder or hub repo id) into a local folder.

    Returns:
        ``(folder, repo_id_or_None)``.
    Raises:
        ConversionError: nothing found locally and downloading is not possible/allowed.
    """
    p = Path(src).expanduser()
    if p.is_dir():
        return p.resolve(), None
    if p.exists():
        raise ConversionError(f"{src}: SRC must be a checkpoint folder (with config.json), not a file")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise ConversionError(f"{src}: no such folder, and not a Hugging Face repo id (owner/name)")
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    # the cache location as the environment says now (huggingface_hub reads it once, at import)
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    try:
        folder = snapshot_download(src, allow_patterns=patterns, local_files_only=True, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - hub raises many types; any miss means "not cached"
        if offline:
            raise ConversionError(
                f"{src}: not found in the Hugging Face cache and --offline is set; download it first "
                f"(`edgeinfer pull {src}` or `huggingface-cli download {src}`)") from None
        log.info("%s not cached (%s); downloading", src, type(e).__name__)
        try:
            folder = snapshot_download(src, allow_patterns=patterns, cache_dir=cache_dir)
        except Exception as e2:  # noqa: BLE001
            raise ConversionError(f"{src}: cannot download from the Hugging Face Hub ({e2})") from None
    return Path(folder), src


def open_checkpoint(src: str | os.PathLike, offline: bool | None = None) -> Checkpoint:
    """Resolve SRC, read ``config.json`` and index every tensor of every safetensors file.

    Raises:
        ConversionError: missing config or weights, missing shard, corrupt header, duplicated tensor.
    """
    folder, repo = resolve_source(str(src), offline)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{folder}: no config.json; SRC must be a Hugging Face model folder")
    config = _read_json(cfg_path, "config.json")
    ck = Checkpoint(folder, config, repo_id=repo)
    for f in _weight_files(folder):
        for name, ref in read_safetensors_header(f).items():
            if name in ck.tensors:
                raise ConversionError(f"{f}: tensor {name!r} also appears in {ck.tensors[name].file.name}")
            ck.tensors[name] = ref
    return ck
