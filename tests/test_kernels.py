"""Kernels: reference dequantize bit-exact vs the gguf package; CPU matmul paths vs float64.

Oracles: ``gguf.quants.dequantize`` (numpy) for every format, on seeded random blocks (with
finite fp16 scale fields) and on real tensors of the default model; ``dequantize + float64
matmul`` for the CPU matmul paths, with the tolerances stated next to each check.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgeinfer.kernels import cpu_packed
from edgeinfer.kernels.dequant import SUPPORTED, dequantize, row_bytes

T = gguf.GGMLQuantizationType
# byte offsets of the fp16 fields inside one block (d, m/dmin), so random blocks get finite scales
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_blocks(qtype: T, rows: int, cols: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Random GGML data [rows, row_bytes]: random codes, finite random fp16 scales."""
    rng = np.random.default_rng(seed)
    if qtype in (T.F32, T.F16, T.BF16):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == T.F32:
            return x.view(np.uint8)
        if qtype == T.F16:
            return x.astype(np.float16).view(np.uint8)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // bs * ts), dtype=np.uint8)
    blk = raw.reshape(-1, ts)
    for off in F16_FIELDS[qtype]:
        d = (rng.standard_normal(blk.shape[0]) * scale).astype(np.float16)
        blk[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("qtype", list(SUPPORTED), ids=lambda t: t.name)
def test_dequantize_bit_exact_random(qtype):
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    cols = max(bs, 32) * 3
    raw = random_blocks(qtype, 9, cols, seed=int(qtype))
    ref = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(raw), qtype).numpy()
    n_diff = int((ref.view(np.uint32) != got.view(np.uint32)).sum()) if ref.shape == got.shape else -1
    print(f"{qtype.name}: {ref.size} values, {n_diff} differing bit patterns")
    assert bits_equal(ref, got)


def test_dequantize_bit_exact_real_tensors(default_gguf):
    reader = gguf.GGUFReader(default_gguf)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen or t.tensor_type not in SUPPORTED or len(t.shape) < 2:
            continue
        seen.add(t.tensor_type)
        data = np.asarray(t.data)[:256]  # [rows, row_bytes] (first 256 rows are plenty)
        ref = gguf.quants.dequantize(data, t.tensor_type)
        got = dequantize(torch.from_numpy(np.array(data)), t.tensor_type).numpy()
        print(f"{t.name} {t.tensor_type.name}: {ref.size} values bit-exact={bits_equal(ref, got)}")
        assert bits_equal(ref, got), t.name
    assert {T.Q4_1, T.Q8_0} <= seen


def test_dequantize_rejects_bad_input():
    from edgeinfer.errors import InvalidModelError

    with pytest.raises(InvalidModelError, match="Q2_K"):
        dequantize(torch.zeros(1, 84, dtype=torch.uint8), T.Q2_K)
    with pytest.raises(InvalidModelError, match="whole number"):
        dequantize(torch.zeros(1, 35, dtype=torch.uint8), T.Q8_0)
    with pytest.raises(InvalidModelError, match="block size"):
        row_bytes(T.Q4_K, 100)


def _ref_matmul(x: torch.Tensor, raw: np.ndarray, qtype: T) -> torch.Tensor:
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()
    return x.double() @ w.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("qtype", cpu_packed.GROUP32_TYPES, ids=lambda t: t.name)
def test_codes_scales_exact(qtype):
    # the packed CPU path's rewrite w = c*s + z reproduces the gguf package's values exactly
    raw = random_blocks(qtype, 8, 512, seed=2, scale=0.02)
    c, s, z = cpu_packed.codes_scales(torch.from_numpy(raw), qtype, 8, 512)
    w = (c.reshape(8, 16, 32).astype(np.float32) * s[..., None] + z[..., None]).reshape(8, 512)
    ref = gguf.quants.dequantize(raw, qtype)
    print(f"{qtype.name}: codes < {int(c.max()) + 1}, max |c*s+z - gguf| = {np.abs(w - ref).max():.1e}")
    assert np.array_equal(w, ref)


def test_q6_k_planes_exact():
    # Q6_K's four group-32 planes: sum over planes of c*s + z (float64) equals the gguf values
    n, k = 8, 512
    raw = random_blocks(T.Q6_K, n, k, seed=4, scale=0.02)
    planes = cpu_packed.q6_k_planes(torch.from_numpy(raw), n, k)
    w = sum((c.reshape(n, k // 32, 32) * s[..., None].astype(np.float64) + z[..., None]).reshape(n, k)
            for c, s, z in planes)
    ref = gguf.quants.dequantize(raw, T.Q6_K).astype(np.float64)
    print(f"Q6_K planes: codes < {max(int(c.max()) for c, _, _ in planes) + 1}, "
          f"max |sum(c*s+z) - gguf| = {np.abs(w - ref).max():.1e}")
    assert all(c.max() < 16 for c, _, _ in planes) and np.array_equal(w, ref)


# The packed CPU kernels take bfloat16 activations and bf16 (scale, zero) pairs, and return bf16:
# three roundings of relative size <= 2^-9 each; over K-term dot products they average out to
# ~3e-3 of the output norm. Tolerance 1e-2.
PACKED_TOL = 1e-2


@pytest.mark.skipif(not cpu_packed.has_int4pack(), reason="torch build lacks the CPU int4pack kernels")
@pytest.mark.parametrize("qtype", cpu_packed.PACKED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 7, 40])  # Q6_K: 40 rows take the dequantize path (prefill)
def test_cpu_packed_matmul(qtype, m):
    n, k = 96, 512
    raw = random_blocks(qtype, n, k, seed=m + int(qtype), scale=0.02)  # random codes, incl. extremes
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got = cpu_packed.PackedCPU(torch.from_numpy(raw), qtype, n, k).matmul(x)
    err = _rel(got, _ref_matmul(x, raw, qtype))
    print(f"packed {qtype.name} M={m}: rel err {err:.2e} (tol {PACKED_TOL})")
    assert got.shape == (m, n) and err < PACKED_TOL


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.F16, T.BF16], ids=lambda t: t.name)
def test_dequant_linear_chunked(qtype, monkeypatch):
    # fp32 dequantize + fp32 matmul: only summation-order error, tolerance 1e-5. A tiny chunk
    # size forces the bounded row-chunk loop.
    monkeypatch.setattr(cpu_packed, "CHUNK_ELEMS", 256 * 5)
    n, k = 37, 256
    raw = random_blocks(qtype, n, k, seed=3, scale=0.02)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    got = cpu_packed.dequant_linear(x, torch.from_numpy(raw), qtype, n)
    err = _rel(got, _ref_matmul(x, raw, qtype))
    print(f"dequant_linear {qtype.name}: rel err {err:.2e} (tol 1e-5)")
    assert err < 1e-5


@pytest.fixture
def without_native(monkeypatch):
    """The paths taken when the compiled kernels (kernels/ggml_cpu.py) are absent."""
    from edgeinfer.kernels import ggml_cpu

    monkeypatch.setattr(ggml_cpu, "LIB", None)


def test_quant_linear_paths_and_bias(without_native):
    from edgeinfer.kernels.qlinear import QuantEmbedding, QuantLinear

    k = 256
    for qtype, n, path in [(T.Q4_1, 64, "cpu-packed"), (T.Q6_K, 64, "cpu-packed"), (T.Q6_K, 40, "dequant"),
                           (T.F16, 64, "dense")]:
        raw = torch.from_numpy(random_blocks(qtype, n, k, seed=5, scale=0.02))
        bias = torch.randn(n)
        layer = QuantLinear(raw, qtype, n, k, bias=bias, name="blk.0.attn_q.weight")
        x = torch.randn(2, 3, k)
        ref = _ref_matmul(x.reshape(-1, k), raw.numpy(), qtype) + bias.double()
        err = _rel(layer(x).reshape(-1, n), ref)
        print(f"QuantLinear {qtype.name} path={layer.path}: rel err {err:.2e}")
        assert layer.path == path and err < PACKED_TOL
    raw = random_blocks(T.Q8_0, 50, 64, seed=1)
    emb = QuantEmbedding(torch.from_numpy(raw), T.Q8_0, 64)
    ids = torch.tensor([[3, 49, 0]])
    assert torch.equal(emb(ids)[0], torch.from_numpy(gguf.quants.dequantize(raw, T.Q8_0))[[3, 49, 0]])


def test_packed_row_chunks_and_fusion_are_exact(monkeypatch, without_native):
    # Packing a large matrix in row chunks, or several matrices fused into one, must give the
    # very same products as packing each matrix whole (same kernel, same bits): exact equality.
    from edgeinfer.kernels.qlinear import QuantLinear, fuse

    n, k = 64 * 5 + 16, 256
    raw = torch.from_numpy(random_blocks(T.Q8_0, n, k, seed=9, scale=0.02))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    whole = cpu_packed.PackedCPU(raw, T.Q8_0, n, k).matmul(x)
    monkeypatch.setattr(cpu_packed, "ROW_CHUNK_ELEMS", 64 * k)
    chunked = cpu_packed.PackedCPU(raw, T.Q8_0, n, k).matmul(x)
    assert torch.equal(whole, chunked)
    sizes = [128, 64, 144]
    parts = [QuantLinear(raw[a:a + m], T.Q8_0, m, k) for a, m in zip([0, 128, 192], sizes)]
    singles = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse(parts)
    assert fused is not None and all(p.path == "fused" for p in parts)
    outs = fused(x)
    print(f"fused {sizes} vs separate: max diff {(torch.cat(outs, -1) - singles).abs().max():.1e}")
    assert [o.shape[-1] for o in outs] == sizes and torch.equal(torch.cat(outs, -1), singles)
    assert fuse([QuantLinear(raw[:80], T.Q8_0, 80, k), QuantLinear(raw[80:96], T.Q8_0, 16, k)]) is None
