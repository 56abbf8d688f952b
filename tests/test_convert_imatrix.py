"""`edgeinfer convert --imatrix`: importance-weighted encoders and whole models vs llama.cpp, byte for byte.

Oracles: ggml's own ``ggml_quantize_chunk(type, src, dst, 0, rows, cols, imatrix)`` (ctypes into
llama-cpp-python's libggml-base) for the weighted legacy encoders on random data, and
``llama_model_quantize`` with the same imatrix entries for whole converted models (types and bytes of
every tensor). Every test prints the mismatches it found.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import _llama_quant as lq
import _tiny_models
from edgeinfer.errors import ConversionError
from edgeinfer.quant.convert import convert, plan_conversion
from edgeinfer.quant.imatrix import Imatrix, load_imatrix, save_imatrix
from edgeinfer.quant.legacy_weighted import WEIGHTED_TYPES, quantize_weighted
from edgeinfer.quant.quantizers import quantize


def ggml_quantize_chunk(x: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml's ``ggml_quantize_chunk`` (what llama_model_quantize calls per chunk of rows)."""
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    rows, cols = x.shape
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    out = np.zeros((rows, cols // bs * ts), np.uint8)
    n = fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None if qw is None else qw.ctypes.data)
    assert n == out.nbytes
    return out


def hard_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Mixed-scale rows plus the corner cases of the block searches (zero, constant, +-0.0, tiny, sparse)."""
    x = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 5, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 1.5
    x[2, :32] = -2.0
    x[3, :32] = -0.0
    x[4, 32:64] = np.abs(x[4, 32:64])
    x[4, 40], x[4, 41] = 0.0, -0.0                 # zero minimum of a non-negative block: C keeps the first zero
    x[5] *= np.float32(1e-7)                       # fp16-subnormal scales
    x[6, rng.random(cols) < 0.02] *= 300.0         # outliers
    x[7] = np.where(rng.random(cols) < 0.05, x[7], 0)
    x[8, :32] = rng.integers(-8, 8, 32)
    return x


def importance(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Like a real imatrix: mean squared activations, a few channels dominant, some exactly zero."""
    w = (rng.standard_normal(cols) ** 2 * rng.uniform(0.1, 5.0)).astype(np.float32)
    w[rng.random(cols) < 0.03] *= 100
    w[rng.random(cols) < 0.05] = 0.0
    return w


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES, ids=lambda t: t.name)
def test_weighted_legacy_encoders_match_ggml(qtype):
    """quantize_row_q{4,5}_{0,1}_impl: our numpy encoders == ggml on random rows (576 and 512 wide)."""
    bad = total = 0
    for seed, cols in ((0, 576), (1, 512), (2, 1536)):
        rng = np.random.default_rng(seed)
        x, qw = hard_rows(rng, 48, cols), importance(rng, cols)
        ours = quantize_weighted(x, qtype, qw)
        ref = ggml_quantize_chunk(x, qtype, qw)
        bad += lq.blocks_differ(ours, ref, qtype)
        total += ours.size // gguf.GGML_QUANT_SIZES[qtype][1]
        # the weights must matter: the plain (_ref) encoding differs somewhere
        assert not np.array_equal(ours, ggml_quantize_chunk(x, qtype, None))
    print(f"{qtype.name} with imatrix: {bad} of {total} blocks differ from ggml")
    assert bad == 0


def test_registry_imatrix_path():
    """quantize(imatrix=) picks the weighted encoder (K and legacy), Q8_0 ignores it; chunking and
    stacked-expert slices give the same bytes."""
    import edgeinfer.quant.quantizers as Q
    from edgeinfer.quant.kquants import quantize_k

    rng = np.random.default_rng(3)
    x, qw = hard_rows(rng, 40, 512), importance(rng, 512)
    assert np.array_equal(quantize(x, T.Q4_K, imatrix=qw), quantize_k(x, T.Q4_K, imatrix=qw))
    assert np.array_equal(quantize(x, T.Q5_0, imatrix=qw), ggml_quantize_chunk(x, T.Q5_0, qw))
    assert np.array_equal(quantize(x, T.Q8_0, imatrix=qw), ggml_quantize_chunk(x, T.Q8_0, None))
    experts = np.concatenate([qw, importance(rng, 512)])       # two experts of 20 rows each
    want = np.concatenate([quantize_weighted(x[:20], T.Q4_1, experts[:512]),
                           quantize_weighted(x[20:], T.Q4_1, experts[512:])])
    old = Q.CHUNK_ELEMENTS
    try:
        Q.CHUNK_ELEMENTS = 512 * 7                              # chunks of 7 rows straddle the expert boundary
        got = quantize(x, T.Q4_1, imatrix=experts, n_threads=2)
    finally:
        Q.CHUNK_ELEMENTS = old
    print("chunked stacked-expert Q4_1:", lq.blocks_differ(got, want, T.Q4_1), "blocks differ")
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="does not fit"):
        quantize(x, T.Q4_0, imatrix=qw[:100])


def synthetic_imatrix(f32_gguf, path, seed: int = 0, skip: tuple[str, ...] = ()) -> tuple[object, dict]:
    """An imatrix with positive per-column statistics for every blk.* matrix of a GGUF (minus ``skip``).

    Returns (saved path, {name: weights} as llama-quantize reads them back).
    """
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["synthetic"], chunk_count=2, chunk_size=64)
    for name, (_, raw) in lq.read_tensors(f32_gguf).items():
        if name.startswith("blk.") and raw.shape[0] > 1 and name not in skip:
            im.add(name, importance(rng, raw.shape[1] // 4) * 128, 128)
    p = save_imatrix(im, path)
    back = load_imatrix(p)
    return p, {n: back.weights(n) for n in back.entries}


def compare_imatrix(folder, tmp_path, recipes, imatrix_path, weights) -> None:
    """edgeinfer convert --imatrix == convert to F32 + llama_model_quantize with the same imatrix."""
    f32 = tmp_path / "f32.gguf"
    if not f32.exists():
        convert(folder, f32, "F32")
    failures = []
    for q in recipes:
        ours = lq.read_tensors(convert(folder, tmp_path / f"ours-{q}.gguf", q, imatrix=imatrix_path, force=True))
        ref = lq.read_tensors(lq.llama_quantize(f32, tmp_path / f"ref-{q}.gguf", q, imatrix=weights))
        if not lq.files_agree(ours, ref, f"{q}+imatrix"):
            failures.append(q)
    assert not failures


def test_tiny_model_mixes_with_imatrix_match_llama(tmp_path):
    """8 layers (so Q4_0's imatrix-only ffn_down -> Q4_1 rule fires), hidden 256 (K types), ffn 288
    (Q5_0/Q5_1/Q8_0 fallbacks); one tensor without an entry takes the plain encoder in both."""
    folder = _tiny_models.make_tiny_checkpoint("llama", tmp_path / "llama256", hidden_size=256,
                                               intermediate_size=288, num_attention_heads=4, num_key_value_heads=2,
                                               num_hidden_layers=8)
    f32 = convert(folder, tmp_path / "f32.gguf", "F32")
    im, weights = synthetic_imatrix(f32, tmp_path / "im.gguf", skip=("blk.2.attn_q.weight",))
    compare_imatrix(folder, tmp_path, ["Q4_K_M", "Q5_K_M", "Q4_0"], im, weights)
    plan = plan_conversion(folder, "Q4_0", imatrix=im)
    notes = {t.gguf_name: (t.ggml_type.name, t.imatrix_note) for t in plan.tensors}
    print({k: v for k, v in notes.items() if k.startswith("blk.0.") or k == "blk.2.attn_q.weight"})
    assert notes["blk.0.ffn_down.weight"] == ("Q4_1", "used")
    assert notes["blk.2.attn_q.weight"] == ("Q4_0", "no entry")
    assert notes["output.weight"] == ("Q6_K", "no entry")  # not in the imatrix (llama.cpp logs it too)


@pytest.mark.slow
def test_default_model_q4_k_m_imatrix_matches_llama(hf_default_checkpoint, tmp_path):
    """The whole SmolLM2-135M, Q4_K_M + an imatrix collected by the torch engine on two short chunks
    (and Q4_0 + imatrix), byte-identical to llama_model_quantize with the same imatrix."""
    from edgeinfer.backend import LoadOptions
    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.corpus import load_text
    from edgeinfer.imatrix_collect import collect_imatrix
    from edgeinfer.resolve import default_model_path

    backend = TorchBackend(default_model_path(), LoadOptions(n_ctx=64, n_threads=2))
    try:
        im = collect_imatrix(backend, load_text("@stdlib-calib")[:3000], n_ctx=64, max_chunks=2, dataset="test")
    finally:
        backend.close()
    p = save_imatrix(im, tmp_path / "im.gguf")
    back = load_imatrix(p)
    compare_imatrix(hf_default_checkpoint, tmp_path, ["Q4_K_M", "Q4_0"], p, {n: back.weights(n) for n in back.entries})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = _tiny_models.make_tiny_checkpoint("llama", tmp_path_factory.mktemp("imx") / "llama256", hidden_size=256,
                                               intermediate_size=288, num_attention_heads=4, num_key_value_heads=2,
                                               num_hidden_layers=2)
    return folder, convert(folder, folder.parent / "f32.gguf", "F32")


def test_imatrix_errors(tiny_llama, tmp_path):
    """Wrong-size entries (another model), non-finite values and unreadable files: ConversionError naming
    the file and the tensor; a wrong-size token_embd entry is skipped, as llama.cpp does."""
    folder, f32 = tiny_llama
    im = Imatrix(datasets=["x"], chunk_count=1, chunk_size=8)
    im.add("blk.0.attn_q.weight", np.ones(256, np.float32), 8)
    im.add("blk.1.ffn_down.weight", np.ones(576, np.float32), 8)          # ffn rows are 288 wide
    bad = save_imatrix(im, tmp_path / "bad.gguf")
    with pytest.raises(ConversionError) as e:
        plan_conversion(folder, "Q4_K_M", imatrix=bad)
    print(e.value)
    assert str(bad) in str(e.value) and "blk.1.ffn_down.weight" in str(e.value) and "576" in str(e.value)

    im.entries.pop("blk.1.ffn_down.weight")
    im.add("token_embd.weight", np.ones(100, np.float32), 8)
    ok = plan_conversion(folder, "Q4_K_M", imatrix=save_imatrix(im, tmp_path / "embd.gguf"))
    notes = {t.gguf_name: t.imatrix_note for t in ok.tensors}
    assert notes["token_embd.weight"] == "wrong size, ignored" and notes["blk.0.attn_q.weight"] == "used"

    im.entries["blk.0.attn_q.weight"].sums[0, 3] = np.inf
    nan = save_imatrix(im, tmp_path / "inf.gguf")
    with pytest.raises(ConversionError, match="non-finite") as e:
        plan_conversion(folder, "Q4_K_M", imatrix=nan)
    assert str(nan) in str(e.value)

    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x00\x00\x00\x05\x00\x00\x00blk")
    with pytest.raises(ConversionError, match="junk.dat"):
        plan_conversion(folder, "Q4_K_M", imatrix=junk)
    with pytest.raises(ConversionError, match="missing.gguf"):
        plan_conversion(folder, "Q4_K_M", imatrix=tmp_path / "missing.gguf")


def test_cli_dry_run_shows_imatrix_use(tiny_llama, tmp_path, cli_env):
    folder, f32 = tiny_llama
    im, _ = synthetic_imatrix(f32, tmp_path / "im.gguf", skip=("blk.1.attn_k.weight",))
    r = subprocess.run([sys.executable, "-m", "edgeinfer", "convert", str(folder), "--qtype", "Q4_K_M", "--imatrix",
                        str(im), "--dry-run"], capture_output=True, text=True, env=cli_env)
    print(r.stdout[-1500:], r.stderr[-500:])
    assert r.returncode == 0
    out = " ".join(r.stdout.split())
    assert "imatrix" in out and "no entry" in out and "used" in out and "ignored by Q8_0" in out
    # 14 blk matrices, 13 with entries, of which ffn_down (Q6_K -> Q8_0 fallback) ignores them; no entry for
    # blk.1.attn_k, token_embd, output
    assert "12 tensors quantized with importance weights, 3 without an entry" in out
    r = subprocess.run([sys.executable, "-m", "edgeinfer", "convert", str(folder), "--qtype", "Q4_K_M", "--imatrix",
                        str(tmp_path / "nope.gguf"), "--dry-run"], capture_output=True, text=True, env=cli_env)
    print(r.stderr)
    assert r.returncode == 2 and "nope.gguf" in r.stderr
