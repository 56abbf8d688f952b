"""K-quant encoders vs llama.cpp's quantizer (``llama_model_quantize``), byte for byte.

Oracle: the float32 test tensors are written into a minimal llama GGUF, quantized by
llama.cpp with ``pure=True`` (every 2-D tensor gets the ftype's default K type), with
and without an importance matrix, and every output block is compared with
``edgeinfer.quant.kquants.quantize_k`` on the same floats.  Each test prints the number
of mismatching blocks and the largest dequantized difference it found.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

import _llama_quant as lq
from edgeinfer.quant import searches
from edgeinfer.quant.kquants import K_TYPES, KQuantError, quantize_k


def _distributions(rng: np.random.Generator, cols: int = 512) -> dict[str, np.ndarray]:
    """Named float32 test tensors [rows, cols], one distribution each (blk.N names)."""
    normal = rng.standard_normal((8, cols)).astype(np.float32)
    outliers = (rng.standard_normal((8, cols)) * 0.02).astype(np.float32)
    outliers[rng.random(outliers.shape) < 0.01] *= 300.0
    zeros = rng.standard_normal((8, cols)).astype(np.float32)
    zeros[0] = 0.0                                   # whole zero blocks
    zeros[1, :40] = 0.0                              # a zero sub-block inside a block
    zeros[2, 256:] = 1.5                             # constant block
    zeros[3, ::2] = 0.0
    tiny = (rng.standard_normal((8, cols)) * 1e-6).astype(np.float32)      # fp16 subnormal scales
    tinier = (rng.standard_normal((8, cols)) * 1e-9).astype(np.float32)    # scales flush to 0
    positive = np.abs(rng.standard_normal((8, cols))).astype(np.float32)
    negative = -np.abs(rng.standard_normal((8, cols))).astype(np.float32) - 0.5
    uniform = rng.uniform(-1, 1, (8, cols)).astype(np.float32)
    large = (rng.standard_normal((8, cols)) * 300).astype(np.float32)
    sparse = np.where(rng.random((8, cols)) < 0.05, rng.standard_normal((8, cols)), 0).astype(np.float32)
    subnormal = (rng.standard_normal((8, cols)) * 1e-40).astype(np.float32)  # 1/span overflows to inf
    kinds = [normal, outliers, zeros, tiny, tinier, positive, negative, uniform, large, sparse, subnormal]
    return {f"blk.{i}.ffn_up.weight": a for i, a in enumerate(kinds)}


def _imatrix(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Importance weights like llama.cpp's (mean squared activations), some exactly zero."""
    w = (rng.standard_normal(cols) ** 2 * rng.uniform(0.1, 5.0)).astype(np.float32)
    w[rng.random(cols) < 0.05] = 0.0
    return w


def _compare(tmp_path, tensors: dict[str, np.ndarray], qtype: QT, imatrix: dict | None) -> None:
    """Quantize ``tensors`` with llama.cpp and with quantize_k; assert identical bytes."""
    n_layer = max(int(n.split(".")[1]) for n in tensors if n.startswith("blk.")) + 1
    src = lq.write_f32_gguf(tmp_path / "in.gguf", tensors, lq.Hparams(n_layer=n_layer))
    dst = lq.llama_quantize(src, tmp_path / "out.gguf", lq.PURE_FTYPE[qtype], pure=True, imatrix=imatrix)
    ref = lq.read_tensors(dst)
    type_size = GGML_QUANT_SIZES[qtype][1]
    total_bad = total = 0
    for name, x in tensors.items():
        rtype, rbytes = ref[name]
        assert rtype == qtype, f"{name}: llama.cpp wrote {rtype.name}, expected {qtype.name}"
        ours = quantize_k(x, qtype, None if imatrix is None else imatrix[name])
        bad = lq.block_mismatch(ours, rbytes, type_size)
        dq_ours = gguf.quants.dequantize(ours, qtype)
        dq_ref = gguf.quants.dequantize(rbytes, qtype)
        diff = float(np.max(np.abs(dq_ours - dq_ref)))
        rel = float(np.sqrt(np.mean((dq_ref - x) ** 2) / max(np.mean(x ** 2), 1e-30)))
        print(f"{qtype.name} {'imatrix' if imatrix else 'plain  '} {name:24s} mismatching blocks "
              f"{bad}/{ours.size // type_size}  max|dq diff| {diff:.3g}  rel rmse vs f32 {rel:.3g}")
        total_bad += bad
        total += ours.size // type_size
    assert total_bad == 0, f"{qtype.name}: {total_bad}/{total} blocks differ from llama.cpp"


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("impl", ["native", "numpy"])
def test_random_tensors_match_llama_cpp(tmp_path, monkeypatch, qtype, weighted, impl):
    """Both implementations of the group searches (compiled and numpy) against llama.cpp."""
    if impl == "numpy":
        monkeypatch.setattr(searches, "_LIB", None)
    else:
        assert searches.implementation() == "native", "the compiled searches were not built (pip install -e .)"
    rng = np.random.default_rng(1234 + int(qtype))
    tensors = _distributions(rng)
    imatrix = {n: _imatrix(rng, a.shape[1]) for n, a in tensors.items()} if weighted else None
    _compare(tmp_path, tensors, qtype, imatrix)


def _real_tensors(path, max_values: int = 250_000) -> dict[str, np.ndarray]:
    """Weights of the default model, dequantized to float32, rows re-cut to 256-multiples."""
    r = gguf.GGUFReader(str(path))
    wanted = ["blk.0.ffn_down.weight", "blk.29.ffn_down.weight", "blk.3.attn_v.weight",
              "blk.7.ffn_gate.weight", "token_embd.weight"]
    by_name = {t.name: t for t in r.tensors}
    out = {}
    for i, name in enumerate(wanted):
        t = by_name[name]
        rows_needed = -(-max_values // int(t.shape[0]))
        raw = np.asarray(t.data)[:rows_needed]                      # first rows only
        x = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.tensor_type)).astype(np.float32)
        x = x.reshape(-1)[: (x.size // 2304) * 2304].reshape(-1, 2304)
        out[f"blk.{i}.ffn_up.weight"] = x                               # names only matter to llama.cpp
    return out


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda t: t.name)
def test_real_tensors_match_llama_cpp(tmp_path, default_gguf, qtype):
    tensors = _real_tensors(default_gguf)
    _compare(tmp_path, tensors, qtype, None)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_real_tensors_imatrix_match_llama_cpp(tmp_path, default_gguf, qtype):
    tensors = _real_tensors(default_gguf)
    rng = np.random.default_rng(7)
    imatrix = {n: _imatrix(rng, a.shape[1]) for n, a in tensors.items()}
    _compare(tmp_path, tensors, qtype, imatrix)


def test_rows_split_across_threads_agree():
    """Chunked multi-threaded encoding equals single-threaded encoding (many blocks)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 1024)).astype(np.float32)
    imatrix = _imatrix(rng, 1024)
    for qtype in (QT.Q4_K, QT.Q6_K):
        a = quantize_k(x, qtype, imatrix, n_threads=1)
        b = quantize_k(x, qtype, imatrix, n_threads=2)
        print(qtype.name, "threaded mismatching bytes", int((a != b).sum()))
        assert np.array_equal(a, b)


def test_bad_input_is_refused():
    x = np.zeros((2, 576), dtype=np.float32)
    with pytest.raises(KQuantError, match="multiple of 256"):
        quantize_k(x, QT.Q4_K)
    with pytest.raises(KQuantError, match="float32"):
        quantize_k(np.zeros((2, 512), dtype=np.float64), QT.Q4_K)
    with pytest.raises(KQuantError, match="imatrix has 100 entries"):
        quantize_k(np.zeros((2, 512), dtype=np.float32), QT.Q4_K, np.ones(100, np.float32))
    nan = np.zeros((2, 512), dtype=np.float32)
    nan[1, 300] = np.nan
    with pytest.raises(KQuantError, match="row 1, column 300"):
        quantize_k(nan, QT.Q6_K)
    with pytest.raises(KQuantError, match="not a K-quant"):
        quantize_k(np.zeros((2, 512), dtype=np.float32), QT.Q8_0)


@pytest.mark.slow
def test_default_model_q4_k_m_end_to_end(tmp_path, default_gguf):
    """The whole default model (as F16) through llama.cpp's Q4_K_M vs recipes + quantize_k.

    Every tensor's type must equal recipes.plan(); every K-quant tensor's bytes must equal
    quantize_k on the same values (Q5_0/Q8_0 fallbacks are the converter's encoders).
    """
    from edgeinfer.quant.recipes import RecipeContext, plan

    r = gguf.GGUFReader(str(default_gguf))
    f = {k: r.fields[k].contents() for k in ("llama.block_count", "llama.embedding_length",
                                             "llama.feed_forward_length", "llama.attention.head_count",
                                             "llama.attention.head_count_kv", "llama.vocab_size")}
    hp = lq.Hparams(n_layer=f["llama.block_count"], n_embd=f["llama.embedding_length"],
                    n_ff=f["llama.feed_forward_length"], n_head=f["llama.attention.head_count"],
                    n_head_kv=f["llama.attention.head_count_kv"], n_vocab=f["llama.vocab_size"])
    tensors = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(np.asarray(t.data), QT(t.tensor_type)).astype(np.float32)
        tensors[t.name] = x if x.ndim == 1 else x.astype(np.float16)    # F16 file: half the size
    src = lq.write_f32_gguf(tmp_path / "f16.gguf", tensors, hp)
    ref = lq.read_tensors(lq.llama_quantize(src, tmp_path / "q4km.gguf", "Q4_K_M"))
    ctx = RecipeContext(n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv)
    entries = plan([(n, tuple(reversed(a.shape))) for n, a in tensors.items()], "Q4_K_M", ctx)
    wrong_type = [e.name for e in entries if ref[e.name][0] != e.ggml_type]
    bad_blocks = n_blocks = 0
    for e in entries:
        if e.ggml_type in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
            ours = quantize_k(tensors[e.name].astype(np.float32), e.ggml_type)
            ts = GGML_QUANT_SIZES[e.ggml_type][1]
            bad_blocks += lq.block_mismatch(ours, ref[e.name][1], ts)
            n_blocks += ours.size // ts
    print(f"Q4_K_M default model: {len(entries)} tensors, {len(wrong_type)} with another type; "
          f"K-quant blocks differing {bad_blocks}/{n_blocks}")
    assert not wrong_type and bad_blocks == 0


def test_stacked_experts_with_per_expert_imatrix(tmp_path):
    """A 3-D expert tensor [n_expert, rows, cols] with one imatrix vector per expert."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 8, 512)).astype(np.float32)
    im = np.concatenate([_imatrix(rng, 512) for _ in range(4)])
    name = "blk.0.ffn_down_exps.weight"
    hp = lq.Hparams(n_layer=1, n_expert=4, n_expert_used=2)
    src = lq.write_f32_gguf(tmp_path / "in.gguf", {name: x}, hp)
    for qtype in (QT.Q4_K, QT.Q6_K):
        ref = lq.read_tensors(lq.llama_quantize(src, tmp_path / "out.gguf", lq.PURE_FTYPE[qtype], pure=True,
                                                imatrix={name: im}))[name][1]
        ours = quantize_k(x, qtype, im)
        bad = lq.block_mismatch(ours, ref, GGML_QUANT_SIZES[qtype][1])
        print(qtype.name, "experts with per-expert imatrix: mismatching blocks", bad, "/", ours.size // GGML_QUANT_SIZES[qtype][1])
        assert ours.shape[:2] == (4, 8) and bad == 0


def test_fused_weighted_sums_follow_c_order():
    """kquants_search._wsum (einsum, one pass) equals C's loop: products left to right, summed in order.

    Oracle: an explicit float32 loop ``s += a[i]*b[i](*c[i])`` over the value index.  Covers
    the einsum path (contiguous, many groups) and the fallbacks (one group, a strided view).
    """
    from edgeinfer.quant import kquants_search as ks

    rng = np.random.default_rng(5)

    def c_loop(*ops):
        s = np.zeros(ops[0].shape[1], dtype=np.float32)
        for i in range(ops[0].shape[0]):
            p = ops[0][i] * ops[1][i]
            for o in ops[2:]:
                p = p * o[i]
            s = s + p
        return s

    for n, g in ((32, 4096), (16, 300), (8, 1), (32, 2)):
        ops = [(rng.standard_normal((n, g)) * s).astype(np.float32) for s in (1.0, 7e3, 3e-3)]
        ops[1][:, ::3] = np.rint(ops[1][:, ::3] / 1e3)            # integer levels, like L
        for k in (2, 3):
            got, want = ks._wsum(*ops[:k]), c_loop(*ops[:k])
            bad = int((got.view(np.int32) != want.view(np.int32)).sum())
            print(f"_wsum {k} operands [{n}, {g}] (einsum path {ks.EINSUM_IS_SEQUENTIAL and g > 1}): "
                  f"{bad}/{g} sums differ in bits from the C loop")
            assert bad == 0
    strided = (rng.standard_normal((16, 64)) * 5).astype(np.float32)[:, ::2]
    assert np.array_equal(ks._wsum(strided, strided), c_loop(strided, strided))
