"""``numerics="llama.cpp"``: ggml's activation roundings reproduced, checked against ggml itself.

Figures measured while writing this (default model, 300 positions of natural text, printed by
every run):

* activation quantizers (x86 ``quantize_row_q8_0/q8_1/q8_K``): byte-identical to ggml's;
  one linear layer (:class:`GGMLMatmul`) vs ggml's own ``mul_mat``: ~3e-7 relative (the float
  path: ~7e-3), on random and on the default model's real weights.
* whole model vs llama.cpp: rel err 2.6e-2, KL/pos 4e-3, top-1 97 % -- NOT the 99 % of issue 4.
  The reason is numerical chaos, not a missing rounding: with 8-bit activation blocks, a 1-ulp
  difference anywhere (float32 summation order) flips an occasional code, and 30 layers amplify
  that to the same ~3 % logit difference. Proof: our own mode with float64 instead of float32
  accumulation differs from itself by rel 2.7e-2 / top-1 96.7 %, and **llama.cpp differs from
  itself** by rel 2.2e-2 / top-1 96.3 % between one-token decode steps (n_batch=1) and one
  batched pass (slow test). So 99 % top-1 against llama.cpp is below llama.cpp's own
  reproducibility on this Q4_1 model; the tests assert we are as close to llama.cpp as these floors.
* greedy, 32 tokens, 3 prompts (slow test): identical for 7 / 10 / 20 tokens, then a token whose
  llama.cpp (batched re-evaluation) margin is -0.150 / -0.049 / -0.008: llama.cpp itself prefers
  our token when it evaluates the prefix in one pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _ggml_ops
from test_torch_engine import THREADS, compare, greedy_agrees_or_near_tie, llama_logits, natural_text
from edgeinfer.backend import LoadOptions
from edgeinfer.errors import BackendError
from edgeinfer.kernels import ggml_numerics as gn

T = gn.T
N_POS = 300


def _x(seed: int, m: int, k: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = (g.standard_normal((m, k)) * g.uniform(0.01, 30, (m, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, :256] = 0.5  # ties everywhere: amax 0.5 -> x*127/amax = 127 exactly
    x[2, 3] = 1e-30  # tiny
    x[3, 40] = -x[3, 32:64].__abs__().max() * 1.5  # largest |x| negative (q8_K takes the signed max)
    return x


def test_activation_quantizers_are_byte_identical_to_ggml():
    x = _x(0, 64, 512)
    q, d = gn.quantize_q8_0(torch.from_numpy(x))
    ref = _ggml_ops.quantize_row("q8_0", x, 32, 34)
    ours = np.concatenate([d.reshape(-1, 1).half().numpy().view(np.uint8), q.reshape(-1, 32).numpy().astype(np.int8).view(np.uint8)], 1)
    q, d, s = gn.quantize_q8_1(torch.from_numpy(x))
    ref1 = _ggml_ops.quantize_row("q8_1", x, 32, 36)
    ours1 = np.concatenate([d.reshape(-1, 1).half().numpy().view(np.uint8), s.reshape(-1, 1).half().numpy().view(np.uint8),
                            q.reshape(-1, 32).numpy().astype(np.int8).view(np.uint8)], 1)
    q, d = gn.quantize_q8_k(torch.from_numpy(x))
    refk = _ggml_ops.quantize_row("q8_K", x, 256, 292)
    oursk = np.concatenate([d.reshape(-1, 1).numpy().view(np.uint8), q.reshape(-1, 256).numpy().astype(np.int8).view(np.uint8)], 1)
    bad = {n: int((a != b[:, :a.shape[1]]).any(1).sum()) for n, a, b in (("q8_0", ours, ref), ("q8_1", ours1, ref1), ("q8_K", oursk, refk))}
    print(f"blocks differing from ggml's quantize_row_*: {bad} (of {ref.shape[0]} / {refk.shape[0]})")
    assert bad == {"q8_0": 0, "q8_1": 0, "q8_K": 0}


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K, T.F16])
def test_ggml_matmul_matches_ggml_mul_mat(qtype):
    import gguf

    n, k, m = 48, 512, 7
    g = np.random.default_rng(int(qtype))
    w = g.standard_normal((n, k)).astype(np.float32)
    if qtype in (T.Q4_K, T.Q6_K):  # random blocks (the gguf package has no K-quant encoder), sane fp16 scales
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        raw = g.integers(0, 256, (n * k // bs, ts), dtype=np.uint8)
        for off in ((0, 2) if qtype == T.Q4_K else (208,)):
            raw[:, off:off + 2] = g.uniform(0.001, 0.05, (len(raw), 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(n, -1)
    else:
        raw = gguf.quants.quantize(w, qtype).reshape(n, -1).view(np.uint8)
    x = _x(int(qtype), m, k)
    ref = _ggml_ops.mul_mat(raw, int(qtype), n, k, x)
    got = gn.GGMLMatmul(torch.from_numpy(raw.copy()), qtype, n, k)(torch.from_numpy(x)).numpy()
    flt = x.astype(np.float64) @ gguf.quants.dequantize(raw, qtype).reshape(n, k).T
    err, ferr = (float(np.abs(a - ref).max() / np.abs(ref).max()) for a in (got, flt))
    print(f"{qtype.name}: llama.cpp numerics vs ggml mul_mat {err:.1e}; float activations vs ggml {ferr:.1e}")
    assert err < 5e-6 and ferr > 20 * err


def test_numerics_option(monkeypatch):
    monkeypatch.delenv(gn.ENV, raising=False)
    assert gn.resolve_numerics(None) == "fast"
    monkeypatch.setenv(gn.ENV, "llama.cpp")
    assert gn.resolve_numerics(None) == "llama.cpp" and gn.resolve_numerics("fast") == "fast"
    monkeypatch.setenv(gn.ENV, "exact")
    with pytest.raises(BackendError, match="EDGEINFER_NUMERICS"):
        gn.resolve_numerics(None)


@pytest.fixture(scope="module")
def torch_lcpp(default_gguf):
    from edgeinfer.backends.torch_engine import TorchBackend

    b = TorchBackend(default_gguf, LoadOptions(n_ctx=1024, n_threads=THREADS, device="cpu", seed=0), numerics="llama.cpp")
    yield b
    b.close()


@pytest.fixture(scope="module")
def lcpp_tokens(torch_lcpp):
    return torch_lcpp.tokenize(natural_text(), add_special=False)[:N_POS]


@pytest.fixture(scope="module")
def lcpp_stats(default_gguf, torch_lcpp, lcpp_tokens):
    """(ours vs llama.cpp, ours with float64 accumulation vs ours): the second is the floor that
    1-ulp summation differences alone produce through the 8-bit activation codes."""
    ref = llama_logits(default_gguf, lcpp_tokens)
    ours = torch_lcpp.logits(lcpp_tokens).double().numpy()
    gn.GGMLMatmul.ACCUM = torch.float64
    try:
        ours64 = torch_lcpp.logits(lcpp_tokens).double().numpy()
    finally:
        gn.GGMLMatmul.ACCUM = torch.float32
    return compare(ref, ours), compare(ours64, ours)


def test_llamacpp_numerics_parity_on_default_model(torch_lcpp, lcpp_stats):
    s, own = lcpp_stats
    assert torch_lcpp.info().extra["kernels"] == {"Q4_1:ggml": 210, "Q8_0:ggml": 1}
    noise = 4 * own["dmargin_std"]
    flips = [(int(i), round(float(s["margin"][i]), 3)) for i in s["disagree"]]
    print(f"numerics=llama.cpp, {N_POS} positions: rel err {s['rel']:.3e}, KL/pos mean {s['kl_mean']:.2e} max "
          f"{s['kl_max']:.2e}, top-1 {s['top1']:.2%}; disagreements (pos, llama.cpp margin) {flips}")
    print(f"same mode, float64 vs float32 accumulation: rel {own['rel']:.3e}, KL/pos mean {own['kl_mean']:.2e} max "
          f"{own['kl_max']:.2e}, top-1 {own['top1']:.2%} -- the floor that 1-ulp differences alone produce")
    # as close to llama.cpp as our own mode is to itself under a 1-ulp change (measured 97.0 % vs 96.7 %)
    assert s["top1"] >= own["top1"] - 0.02 and s["rel"] < 1.6 * own["rel"] and s["kl_mean"] < 2 * own["kl_mean"]
    assert all(m < noise for _, m in flips), "a disagreement at a confident position is not numerical noise"


@pytest.mark.slow
def test_llamacpp_reproducibility_floor(default_gguf, lcpp_tokens, lcpp_stats):
    # llama.cpp against itself: one-token decode steps (n_batch=1) vs one batched pass (~60 s)
    from edgeinfer.backends.llama_placement import open_llama

    llm = open_llama(str(default_gguf), n_ctx=1024, n_threads=2, n_batch=1, n_ubatch=1, logits_all=True, verbose=False)
    try:
        llm.eval(lcpp_tokens)
        steps = np.array(llm.scores[:N_POS], dtype=np.float64)
    finally:
        llm.close()
    own, s = compare(llama_logits(default_gguf, lcpp_tokens), steps), lcpp_stats[0]
    print(f"llama.cpp vs itself (n_batch=1 vs batched): rel {own['rel']:.3e}, KL/pos mean {own['kl_mean']:.2e}, "
          f"top-1 {own['top1']:.2%}; torch numerics=llama.cpp vs llama.cpp: rel {s['rel']:.3e}, top-1 {s['top1']:.2%}")
    assert own["top1"] < 0.99  # measured 96.3 %: 99 % is below llama.cpp's own reproducibility here
    assert s["top1"] >= own["top1"] - 0.02


@pytest.mark.slow
def test_llamacpp_numerics_greedy(default_gguf, torch_lcpp, llama_default, lcpp_stats):
    greedy_agrees_or_near_tie(default_gguf, torch_lcpp, llama_default, 4 * lcpp_stats[1]["dmargin_std"],
                              "llama.cpp numerics greedy")
