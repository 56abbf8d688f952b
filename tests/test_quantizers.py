"""Quantizer bit-exactness: edgeinfer's torch encoders vs the gguf package and vs llama.cpp itself.

Oracles: ``gguf.quants.quantize`` (numpy reference of ggml's ``quantize_row_*_ref``) on random and
real tensors, and ``llama_cpp.llama_model_quantize`` (ggml's C code) on whole converted models,
where the per-tensor type choice of our policy is checked at the same time. Every test prints the
number of differing blocks it found.
"""

from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import _llama_quant as lq
import _tiny_models
from edgeinfer.quant.quantizers import REGISTRY, quantize

# the corner-case tensor has values near the fp16 limit: the numpy reference warns when a scale overflows
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1]


def hard_tensor(rows: int = 96, cols: int = 256, seed: int = 0) -> np.ndarray:
    """Random rows of mixed scale plus the corner cases of block quantizers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(1e-3, 10, (rows, 1)).astype(np.float32)
    x[0, :32] = 0.0  # all-zero block: d = 0, id = 0
    x[1, :32] = 1.5  # constant block: max - min = 0
    x[2, :32] = -3.0
    x[3, 0], x[3, 1] = 2.0, -2.0  # |max| tie: the first one wins
    x[4, :32] = rng.integers(-8, 8, 32)  # values that land exactly on .5 boundaries after scaling
    x[5, :32] = np.float32(1e-40)  # denormals
    x[6, :32] = rng.standard_normal(32) * 6e4  # near the fp16 range
    x[7] = x[7] * 1e-6
    x[8, :32] = np.linspace(-1, 1, 32)
    x[9, 5] = 1e4  # one outlier
    return x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_tensors_match_gguf_reference(qtype):
    for seed in range(3):
        x = hard_tensor(seed=seed)
        ours = quantize(torch.from_numpy(x), qtype)
        ref = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(ours.shape)
        bad = lq.blocks_differ(ours, ref, qtype)
        print(f"{qtype.name} seed {seed}: {bad} of {ours.size // gguf.GGML_QUANT_SIZES[qtype][1]} blocks differ")
        assert bad == 0


@pytest.fixture(scope="module")
def real_weights(default_gguf) -> dict[str, np.ndarray]:
    """A few weights of the default model (first 2048 rows, dequantized from its GGUF), read once."""
    reader = gguf.GGUFReader(str(default_gguf))
    out = {}
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight"):
            raw = np.asarray(t.data)[:2048]  # rows of blocks
            w = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1, int(t.shape[0]))
            out[t.name] = np.ascontiguousarray(w, dtype=np.float32)
    assert len(out) == 3
    return out


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_real_tensors_match_gguf_reference(real_weights, qtype):
    """Weights of the default model re-quantized both ways."""
    for name, w in real_weights.items():
        ours = quantize(torch.from_numpy(w), qtype)
        ref = gguf.quants.quantize(w, qtype).view(np.uint8).reshape(ours.shape)
        bad = lq.blocks_differ(ours, ref, qtype)
        print(f"{qtype.name} {name} {w.shape}: {bad} differing blocks")
        assert bad == 0


def test_registry_geometry_and_chunking():
    """Every registered type encodes to its declared block size, also across chunk boundaries."""
    import edgeinfer.quant.quantizers as Q

    x = torch.from_numpy(hard_tensor(rows=200, cols=64))
    old = Q.CHUNK_ELEMENTS
    try:
        Q.CHUNK_ELEMENTS = 64 * 7  # 7 rows per chunk: the last chunk is partial
        chunked = {t: quantize(x, t) for t in TYPES}
    finally:
        Q.CHUNK_ELEMENTS = old
    for t in TYPES:
        whole = quantize(x, t)
        qt = REGISTRY[t]
        assert whole.shape == (200, qt.row_bytes(64))
        assert np.array_equal(whole, chunked[t]), t.name
    with pytest.raises(ValueError, match="not a multiple"):
        quantize(torch.zeros(2, 48), T.Q4_0)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_corner_cases_match_llama_model_quantize(tmp_path, qtype):
    """ggml's C code itself on the corner-case tensor, plus blocks of -0.0 and of +m/-m ties
    (where the numpy reference and C could disagree: C keeps +0.0 and the first of a tie)."""
    x = hard_tensor(rows=64, cols=256, seed=5)
    x[6] = np.clip(x[6], -6e4, 6e4)  # llama.cpp rejects (validation) a min that overflows fp16
    x[10, :32] = -0.0
    x[11, :32] = 0.0
    x[11, 7] = -0.0
    x[12, :32] = np.tile(np.float32([-2.0, 2.0]), 16)
    x[13, :32] = np.tile(np.float32([1.0, -1.0]), 16)
    name = "blk.0.ffn_up.weight"
    src = lq.write_f32_gguf(tmp_path / "f32.gguf", {name: x})
    lq.llama_quantize(src, tmp_path / "q.gguf", qtype.name, pure=True)
    qt, ref = lq.read_tensors(tmp_path / "q.gguf")[name]
    assert qt == qtype
    ours = quantize(torch.from_numpy(x), qtype).reshape(-1)
    bad = lq.blocks_differ(ours, ref, qtype)
    print(f"{qtype.name}: {bad} of {ours.size // gguf.GGML_QUANT_SIZES[qtype][1]} blocks differ from llama.cpp")
    assert bad == 0


def compare_with_llama_quantize(folder, tmp_path, qtypes) -> None:
    """Convert with edgeinfer to each qtype, and to F32 then llama_model_quantize: same types, same bytes."""
    from edgeinfer.quant.convert import convert

    f32 = convert(folder, tmp_path / "f32.gguf", "F32")
    failures = []
    for q in qtypes:
        ours = lq.read_tensors(convert(folder, tmp_path / f"ours-{q}.gguf", q))
        lq.llama_quantize(f32, tmp_path / f"ref-{q}.gguf", q)
        ref = lq.read_tensors(tmp_path / f"ref-{q}.gguf")
        if not lq.files_agree(ours, ref, q):
            failures.append(q)
    assert not failures


def test_converted_model_matches_llama_model_quantize(tmp_path):
    """hidden 256: the output projection takes llama.cpp's Q6_K path for the 4/5-bit types."""
    folder = _tiny_models.make_tiny_checkpoint("llama", tmp_path / "llama256", hidden_size=256,
                                               intermediate_size=288, num_attention_heads=4, num_key_value_heads=2)
    compare_with_llama_quantize(folder, tmp_path, ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])


def test_k_quant_mixes_match_llama_model_quantize(tmp_path):
    """`--qtype Q4_K_M` etc.: recipes.py's mix + kquants.py's encoders through the converter == llama-quantize."""
    folder = _tiny_models.make_tiny_checkpoint("llama", tmp_path / "llama256", hidden_size=256,
                                               intermediate_size=288, num_attention_heads=4, num_key_value_heads=2,
                                               num_hidden_layers=3)
    compare_with_llama_quantize(folder, tmp_path, ["Q4_K_M", "Q5_K_S", "Q6_K", "Q3_K_M"])


@pytest.mark.slow
def test_real_model_matches_llama_model_quantize(hf_default_checkpoint, tmp_path):
    """The exported SmolLM2 checkpoint: every tensor of every type byte-identical to llama.cpp's."""
    compare_with_llama_quantize(hf_default_checkpoint, tmp_path, ["Q8_0", "Q4_0", "Q5_1", "Q4_K_M"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_cuda_encoders_match_cpu(qtype):
    """The same torch encoders on a GPU give the same bytes as on the CPU."""
    x = torch.from_numpy(hard_tensor(seed=3))
    cpu = quantize(x, qtype)
    gpu = quantize(x.cuda(), qtype)
    bad = lq.blocks_differ(cpu, gpu, qtype)
    print(f"{qtype.name}: {bad} blocks differ between CUDA and CPU")
    assert bad == 0
