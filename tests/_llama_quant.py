"""llama.cpp's quantizer as a test oracle: write an F32 GGUF, run ``llama_model_quantize``.

``llama_model_quantize`` only reads the model's metadata (hyper-parameters, tensor names
and shapes) and never builds the graph, so a GGUF with llama hyper-parameters and any
set of named 2-D/3-D float32 tensors is enough.  The helpers here write such a file,
quantize it with a llama ftype (optionally ``pure`` and with an importance matrix), and
read every output tensor back as (type, raw bytes).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# ftype whose *default* tensor type is each K type (used with pure=True)
PURE_FTYPE = {
    gguf.GGMLQuantizationType.Q2_K: "Q2_K",
    gguf.GGMLQuantizationType.Q3_K: "Q3_K_M",
    gguf.GGMLQuantizationType.Q4_K: "Q4_K_M",
    gguf.GGMLQuantizationType.Q5_K: "Q5_K_M",
    gguf.GGMLQuantizationType.Q6_K: "Q6_K",
}


@dataclass
class Hparams:
    """The llama hyper-parameters the quantizer reads (only counts matter to it)."""

    n_layer: int = 2
    n_embd: int = 256
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int = 4
    n_expert: int = 0
    n_expert_used: int = 0
    n_vocab: int = 512


def write_f32_gguf(path: Path, tensors: dict[str, np.ndarray], hp: Hparams | None = None) -> Path:
    """Write ``tensors`` (numpy shape [.., rows, cols], stored as GGUF ne = (cols, rows, ..)).

    float16 arrays are stored as F16, everything else as F32.
    """
    hp = hp or Hparams()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("oracle")
    w.add_context_length(256)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(hp.n_vocab)
    w.add_file_type(0)                          # LLAMA_FTYPE_ALL_F32
    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used or 2)
    for name, arr in tensors.items():
        dtype = np.float16 if arr.dtype == np.float16 else np.float32      # F16 kept, the rest F32
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, dst: Path, recipe: str, *, pure: bool = False,
                   imatrix: dict[str, np.ndarray] | None = None, nthread: int = 2,
                   allow_requantize: bool = False) -> Path:
    """Run ``llama_model_quantize(src -> dst)``; raise if it fails.

    ``recipe``: a llama_ftype name without ``MOSTLY_`` ("Q4_K_M", "F16", ...) or "ALL_F32".
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[recipe if recipe == "ALL_F32" else f"MOSTLY_{recipe}"])
    params.nthread = nthread
    params.pure = pure
    params.allow_requantize = allow_requantize
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {recipe}) returned {rc}")
    return dst


def read_tensors(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """Every tensor of a GGUF as name -> (type, raw bytes [rows, row_bytes] uint8)."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        raw = np.asarray(t.data).view(np.uint8)
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        out[t.name] = (gguf.GGMLQuantizationType(t.tensor_type), raw.reshape(rows, -1))
    return out


def block_mismatch(a: np.ndarray, b: np.ndarray, type_size: int) -> int:
    """Number of type_size-byte blocks that differ between two equal-size byte arrays."""
    return int((a.reshape(-1, type_size) != b.reshape(-1, type_size)).any(axis=1).sum())


def blocks_differ(a: np.ndarray, b: np.ndarray, qtype: gguf.GGMLQuantizationType) -> int:
    """:func:`block_mismatch` with the block size of ``qtype``."""
    return block_mismatch(a, b, gguf.GGML_QUANT_SIZES[qtype][1])


def files_agree(ours: dict, ref: dict, label: str) -> bool:
    """Print how two :func:`read_tensors` results differ (types, then bytes); True if they do not.

    Both must hold the same tensor names (asserted).
    """
    assert set(ours) == set(ref)
    type_diff = [(n, ours[n][0].name, ref[n][0].name) for n in ref if ours[n][0] != ref[n][0]]
    byte_diff = [(n, ref[n][0].name, blocks_differ(ours[n][1], ref[n][1], ref[n][0]))
                 for n in ref if ours[n][0] == ref[n][0] and not np.array_equal(ours[n][1], ref[n][1])]
    kinds = sorted({t.name for t, _ in ref.values()})
    print(f"{label}: {len(ref)} tensors ({', '.join(kinds)}): type mismatches {type_diff}, "
          f"byte mismatches (tensor, type, blocks) {byte_diff}")
    return not (type_diff or byte_diff)
