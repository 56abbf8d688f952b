"""The torch engine on the default model (SmolLM2-135M Q4_1 + Q8_0) vs llama.cpp on the same file.

What the numbers mean (measured while writing these tests, printed by every run):

* On an **F32 copy** of the default model (``llama_model_quantize`` to ALL_F32: the same weights,
  dequantized exactly) llama.cpp and the torch engine agree to ~2e-6 relative logit error and
  100 % top-1, and greedy generation is token-identical. That is the proof that model, RoPE layout,
  tied head, KV cache and tokenizer are right.
* On the **Q4_1 file** itself llama.cpp quantizes every activation vector to 8 bits (Q8_1/Q8_0
  blocks) inside its quantized dot products; our CPU path rounds activations to bf16 instead. The
  two engines then differ by ~3 % relative logit error (the exact-dequantize path shows the same
  gap vs llama.cpp, and matches transformers to 1e-6), which flips the argmax where the top two
  logits are within a few tenths of each other: top-1 agreement ~97 % on natural text, not 99 %.
  So the Q4_1 checks assert (a) top-1 >= 95 %, (b) every disagreement is at a position whose
  llama.cpp top-2 margin is below a noise bound measured on the *other* positions, and (c) greedy
  decoding diverges, if at all, only at such a near-tie.
* ``numerics="llama.cpp"`` (``tests/test_ggml_numerics.py``) reproduces those 8-bit activations
  exactly (layer outputs within 1e-6 of ggml's ``mul_mat``) and still measures ~97 %: with 8-bit
  activation codes, 1-ulp float32 differences are amplified to ~3 % logit differences (llama.cpp
  vs itself, decode steps vs one batched pass: 96.3 %), so 99 % is below the reproducibility floor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _llama_quant as lq
from edgeinfer.backend import Backend, DoneEvent, LoadOptions, SamplingParams
from edgeinfer.kernels import ggml_cpu

N_POS = 300
# One torch thread: on a shared 2-core machine two OpenMP threads that spin-wait on each other
# were 10-20x slower than one (measured); speed is the benchmark's business, not the tests'.
THREADS = 1
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is."]


def natural_text() -> str:
    """English prose read at test time: docstrings of a few standard-library modules."""
    import argparse
    import json
    import logging
    import textwrap
    import unittest

    return "\n\n".join(textwrap.dedent(m.__doc__).strip() for m in (argparse, json, unittest, logging, textwrap))


def llama_logits(path, tokens, f32_kv: bool = False) -> np.ndarray:
    """llama.cpp's teacher-forced logits [len(tokens), vocab] (float64)."""
    from edgeinfer.backends.llama_placement import open_llama

    kw = dict(type_k=0, type_v=0) if f32_kv else {}
    llm = open_llama(str(path), n_ctx=1024, n_threads=2, n_batch=512, logits_all=True, verbose=False, **kw)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Relative L2 error, KL(ref || got) per position, top-1 agreement, top-2 margins of ref."""
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    a, b = ref.argmax(-1), got.argmax(-1)
    rows = np.arange(len(ref))
    # noise of the "top-1 minus top-2" margin between the engines
    second = np.argsort(ref, axis=-1)[:, -2]
    dmargin = (ref[rows, a] - ref[rows, second]) - (got[rows, a] - got[rows, second])
    return dict(rel=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), kl_mean=float(kl.mean()),
                kl_max=float(kl.max()), top1=float((a == b).mean()), disagree=np.nonzero(a != b)[0],
                margin=top2[:, 1] - top2[:, 0], dmargin_std=float(dmargin.std()))


@pytest.fixture(scope="module")
def torch_default(default_gguf):
    from edgeinfer.backends.torch_engine import TorchBackend

    b = TorchBackend(default_gguf, LoadOptions(n_ctx=1024, n_threads=THREADS, device="cpu", seed=0))
    yield b
    b.close()


@pytest.fixture(scope="module")
def text_tokens(torch_default):
    toks = torch_default.tokenize(natural_text(), add_special=False)
    assert len(toks) >= N_POS
    return toks[:N_POS]


@pytest.fixture(scope="module")
def q4_stats(default_gguf, torch_default, text_tokens):
    ref = llama_logits(default_gguf, text_tokens)
    got = torch_default.logits(text_tokens).double().numpy()
    return compare(ref, got)


def test_backend_protocol_and_info(torch_default, llama_default):
    assert isinstance(torch_default, Backend)
    info = torch_default.info()
    print(info)
    assert info.backend == "torch" and info.device.startswith("cpu") and info.architecture == "llama"
    path = "ggml-cpu" if ggml_cpu.available() else "cpu-packed"  # the compiled kernels, or torch's int4 planes
    assert info.extra["kernels"] == {f"Q4_1:{path}": 210, f"Q8_0:{path}": 1}
    assert info.extra["decode_step"] == (f"fused ({ggml_cpu.ISA})" if ggml_cpu.available() else "model forward")
    mem = torch_default.memory_bytes()
    assert mem["rss"] > 0 and mem["peak"] >= mem["rss"] // 2
    # weights stay quantized: what the layers hold is about the file size, not 4x it
    size = torch_default.path.stat().st_size
    print(f"weights on device {info.extra['weight_bytes'] / 2**20:.1f} MiB, file {size / 2**20:.1f} MiB")
    assert info.extra["weight_bytes"] < 1.1 * size
    # same tokenizer and chat rendering as the llama.cpp backend
    msgs = [{"role": "user", "content": "Hi there, ünïcode ✓"}]
    assert torch_default.format_chat(msgs) == llama_default.format_chat(msgs)
    text = natural_text()[:500]
    assert torch_default.tokenize(text) == llama_default.tokenize(text)
    assert torch_default.detokenize(torch_default.tokenize(text, add_special=False)) == text


def test_q4_parity_vs_llamacpp(q4_stats):
    s = q4_stats
    noise = 4 * s["dmargin_std"]
    flips = [(int(i), round(float(s["margin"][i]), 3)) for i in s["disagree"]]
    print(f"default Q4_1, {N_POS} positions of natural text: rel err {s['rel']:.3e}, KL/pos mean {s['kl_mean']:.2e} "
          f"max {s['kl_max']:.2e}, top-1 agreement {s['top1']:.2%}; margin noise (4 sd) {noise:.3f}; "
          f"disagreements (pos, llama.cpp top-2 margin): {flips}")
    assert s["top1"] >= 0.95
    assert s["rel"] < 0.06 and s["kl_mean"] < 5e-3
    assert all(m < noise for _, m in flips), "a disagreement at a confident position is not numerical noise"


@pytest.fixture(scope="module")
def f32_copy(default_gguf, tmp_path_factory):
    """The default model requantized by llama.cpp to ALL_F32 (exactly the dequantized weights)."""
    out = lq.llama_quantize(default_gguf, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf", "ALL_F32",
                            allow_requantize=True)
    yield out
    out.unlink()


@pytest.mark.slow
def test_f32_copy_exact_parity_and_greedy(f32_copy, text_tokens):
    from edgeinfer.backends.llama_placement import open_llama

    from edgeinfer.backends.torch_engine import TorchBackend

    tb = TorchBackend(f32_copy, LoadOptions(n_ctx=1024, n_threads=THREADS, device="cpu"))
    try:
        assert set(tb.info().extra["kernels"]) == {"F32:dense"}
        s = compare(llama_logits(f32_copy, text_tokens, f32_kv=True), tb.logits(text_tokens).double().numpy())
        print(f"F32 copy: rel err {s['rel']:.2e}, KL/pos mean {s['kl_mean']:.2e}, top-1 {s['top1']:.2%}")
        assert s["rel"] < 1e-4 and s["top1"] == 1.0
        llm = open_llama(str(f32_copy), n_ctx=512, n_threads=2, verbose=False, type_k=0, type_v=0)
        sp = SamplingParams(temperature=0, max_tokens=32)
        for p in PROMPTS:
            ours = [e.token_id for e in tb.generate([{"role": "user", "content": p}], sp) if not isinstance(e, DoneEvent)]
            prompt = tb.tokenize(tb.prompts.prompt_text([{"role": "user", "content": p}])[0])
            theirs = []
            for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if len(theirs) == len(ours) or tb.is_eog(tok):
                    break
                theirs.append(tok)
            ours = [t for t in ours if t >= 0 and not tb.is_eog(t)]
            print(f"F32 greedy {p!r}: {len(ours)} tokens, identical={ours == theirs}")
            assert ours == theirs
        llm.close()
    finally:
        tb.close()


def test_llamacpp_made_k_quant_mix_loads_and_matches(default_gguf, tmp_path, text_tokens):
    # llama.cpp's own Q4_K_M recipe on the default model: Q5_0/Q8_0 fallbacks (576-wide rows are
    # not whole 256-blocks), Q4_K and Q6_K ffn_down -- a mix of every kernel path on CPU.
    from edgeinfer.backends.torch_engine import TorchBackend

    out = lq.llama_quantize(default_gguf, tmp_path / "q4_k_m.gguf", "Q4_K_M", allow_requantize=True)
    tb = TorchBackend(out, LoadOptions(n_ctx=512, n_threads=THREADS, device="cpu"))
    try:
        kernels = tb.info().extra["kernels"]
        toks = text_tokens[:160]
        s = compare(llama_logits(out, toks), tb.logits(toks).double().numpy())
        print(f"llama.cpp Q4_K_M mix {kernels}: rel err {s['rel']:.3e}, KL/pos {s['kl_mean']:.2e}, top-1 {s['top1']:.2%}")
        # (Q6_K: four int4 planes for decode; this 160-token pass takes its dequantize path)
        path = "ggml-cpu" if ggml_cpu.available() else "cpu-packed"
        assert {f"Q4_K:{path}", f"Q6_K:{path}", f"Q5_0:{path}"} <= set(kernels)
        # the exact fp32 dequantize path measures rel 3.1e-2 / KL 6.3e-3 / top-1 96 % against
        # llama.cpp on this file too (its 8-bit activations); bounds ~2x those
        assert s["rel"] < 0.06 and s["kl_mean"] < 1.5e-2 and s["top1"] >= 0.93
    finally:
        tb.close()


def test_greedy_q4_matches_llamacpp_or_diverges_at_near_tie(default_gguf, torch_default, llama_default, q4_stats):
    greedy_agrees_or_near_tie(default_gguf, torch_default, llama_default, 4 * q4_stats["dmargin_std"], "greedy")


def greedy_agrees_or_near_tie(gguf_path, torch_backend, llama_backend, noise: float, label: str) -> None:
    """Greedy 32 tokens on every prompt from both backends: identical, or the first divergence
    is a near-tie (llama.cpp's own margin between the two tokens below ``noise``)."""
    sp = SamplingParams(temperature=0, max_tokens=32)
    for p in PROMPTS:
        chat = [{"role": "user", "content": p}]
        ours = [e.token_id for e in torch_backend.generate(chat, sp) if not isinstance(e, DoneEvent) and e.token_id >= 0]
        theirs = [e.token_id for e in llama_backend.generate(chat, sp) if not isinstance(e, DoneEvent) and e.token_id >= 0]
        n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if n is None:
            print(f"{label} {p!r}: identical for {min(len(ours), len(theirs))} tokens")
            assert len(ours) == len(theirs) or min(len(ours), len(theirs)) >= 32
            continue
        prefix = torch_backend.tokenize(torch_backend.prompts.prompt_text(chat)[0]) + ours[:n]
        ref = llama_logits(gguf_path, prefix)[-1]
        a, b = theirs[n], ours[n]
        margin = float(ref[a] - ref[b])
        # llama.cpp's own batched re-evaluation of the same prefix may even prefer our token
        # (its step-by-step and batched matmuls round differently): |margin| is what matters.
        print(f"{label} {p!r}: identical for {n} tokens, then llama.cpp picks {a} and torch {b}; "
              f"llama.cpp (batched) margin between them {margin:+.3f}, |margin| < noise bound {noise:.3f}")
        assert abs(margin) < noise


def _step_vs_full(m, toks):
    full = m(torch.tensor([toks]), 0)[0]
    steps = [m(torch.tensor([toks[:16]]), 0)[0]]
    for i in range(16, len(toks)):
        steps.append(m(torch.tensor([[toks[i]]]), i)[0])
    step = torch.cat(steps)
    rel = (step - full).abs().amax(-1) / full.abs().amax()  # per position, of the largest logit
    return float(rel.max()), float(rel.median()), float((step.argmax(-1) == full.argmax(-1)).float().mean())


def test_kv_cache_step_decode_equals_full_forward(torch_default, text_tokens, default_gguf, monkeypatch):
    # The cache logic, measured where it is exact: float activations (weights dequantized, fp32
    # matmuls) make single steps and the batched pass differ only by fp32 summation order, so a
    # wrong cache position, slot or mask (O(1) errors) cannot hide under a loose bound.
    from edgeinfer.engine.loader import load_model
    from edgeinfer.kernels import qlinear

    toks = text_tokens[:40]
    monkeypatch.setattr(qlinear, "FORCE_PATH", "dequant")
    ref, _ = load_model(default_gguf, torch.device("cpu"), 64)
    monkeypatch.undo()
    with torch.inference_mode():
        err, med, agree = _step_vs_full(ref, toks)
    print(f"float activations: 16 + 24 single steps vs one pass: max rel diff {err:.2e} (tol 1e-4), "
          f"median {med:.1e}, top-1 {agree:.0%}")
    assert err < 1e-4 and agree == 1.0
    # The engine's own path (8-bit activations on the ggml-cpu kernels): a 1e-7 change of an
    # attention sum flips some activation's rounding and the flips cascade, so the max difference
    # is chaotic -- 2.8e-2 on AVX2/VNNI, 3.0e-2 with EDGEINFER_ISA=scalar (same arithmetic up to
    # float summation order) -- and one near-tie may swap its top-1. Bounded by its typical size
    # (median over positions: 1.35e-2 AVX2/VNNI, 1.39e-2 scalar; bound 3e-2), the top-1 agreement
    # (100 % / 98 %; bound 95 %) and a 3x margin on the max (0.1).
    with torch.inference_mode():
        err, med, agree = _step_vs_full(torch_default.model, toks)
    print(f"engine path: max rel diff {err:.2e}, median {med:.2e} (tol 3e-2), top-1 {agree:.0%} (>= 95 %), max tol 0.1")
    assert med < 3e-2 and agree >= 0.95 and err < 0.1
    torch_default._cached = []


def test_generate_stops_and_streams(torch_default):
    sp = SamplingParams(temperature=0.7, max_tokens=12, seed=5)
    a = [e for e in torch_default.generate("Once upon a time", sp)]
    b = [e for e in torch_default.generate("Once upon a time", sp)]
    assert isinstance(a[-1], DoneEvent) and a[-1].text == b[-1].text  # seeded sampling is repeatable
    assert a[-1].finish_reason == "length" and a[-1].timings.generated_tokens == 12
    t = a[-1].timings
    print(f"TTFT {t.ttft_s * 1000:.0f} ms, prefill {t.prefill_tok_s:.1f} tok/s, decode {t.decode_tok_s:.1f} tok/s")
    stop_at = a[-1].text.strip().split()[1]
    c = list(torch_default.generate("Once upon a time", SamplingParams(temperature=0.7, max_tokens=12, seed=5,
                                                                       stop=[stop_at])))
    assert c[-1].finish_reason == "stop" and stop_at not in c[-1].text


def test_prompt_too_long_is_a_clear_error(torch_default):
    from edgeinfer.errors import BackendError

    with pytest.raises(BackendError, match="context"):
        list(torch_default.generate("word " * 1100, SamplingParams(max_tokens=1)))


def test_cli_run_torch_stats(cli_env):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgeinfer", "run", "--backend", "torch", "--device", "cpu", "--stats",
                        "-p", "Say hi", "-n", "8", "--temp", "0", "--threads", str(THREADS)],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr[-800:])
    assert r.returncode == 0
    for word in ("torch on cpu", "load", "TTFT", "prefill", "decode", "tok/s", "peak"):
        assert word in r.stderr


def test_chat_prefix_reuse_matches_a_fresh_prefill(torch_default):
    # A follow-up turn re-uses the cached K/V of the shared prefix and prefills only the rest;
    # its next-token logits must equal a full prefill of the whole prompt (bf16 kernel noise:
    # M-dependent rounding, ~1e-2 of the largest logit; a stale or shifted cache gives O(1)).
    sp = SamplingParams(temperature=0, max_tokens=6)
    chat = [{"role": "user", "content": "Name a color."}]
    first = [e for e in torch_default.generate(chat, sp)][-1].text
    chat2 = chat + [{"role": "assistant", "content": first}, {"role": "user", "content": "And a fruit?"}]
    calls = []
    model = torch_default.model
    real_forward = model.forward

    def spy(ids, pos0, last_only=False):
        out = real_forward(ids, pos0, last_only)
        calls.append((ids.shape[1], pos0, out[0, -1].clone()))
        return out

    model.forward = spy
    try:
        list(torch_default.generate(chat2, SamplingParams(temperature=0, max_tokens=1)))
    finally:
        del model.forward
    n_prompt = len(torch_default.tokenize(torch_default.prompts.prompt_text(chat2)[0]))
    s, pos0, reused = calls[0]
    assert pos0 > 0 and pos0 + s == n_prompt  # only the new suffix was prefilled
    fresh = torch_default.logits(torch_default.tokenize(torch_default.prompts.prompt_text(chat2)[0]))[-1]
    err = float((reused - fresh).abs().max() / fresh.abs().max())
    print(f"prefix reuse: {pos0} cached tokens, {s} prefilled; max rel diff vs fresh prefill {err:.2e} (tol 3e-2)")
    assert err < 3e-2 and int(reused.argmax()) == int(fresh.argmax())


def test_bos_default_follows_llamacpp_for_spm_without_add_bos_key(tmp_path):
    """A SentencePiece GGUF (tokenizer.ggml.model = "llama") without tokenizer.ggml.add_bos_token:
    llama.cpp's vocab adds BOS by default for it, and its chat code then drops a template's leading
    BOS (common/chat.cpp). Both backends must build the same prompt with exactly one BOS, and
    imatrix chunks start with BOS as llama-imatrix's would."""
    import json

    import _tiny_models
    from edgeinfer.backends.llamacpp import LlamaCppBackend
    from edgeinfer.backends.torch_engine import TorchBackend
    from edgeinfer.imatrix_collect import collect_imatrix
    from edgeinfer.quant.convert import convert

    folder = _tiny_models.make_tiny_checkpoint("gemma3", tmp_path / "spm")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["add_bos_token"]
    cfg["chat_template"] = "{{ bos_token }}" + cfg["chat_template"]  # like Gemma's own template
    cfg_path.write_text(json.dumps(cfg))
    path = convert(folder, tmp_path / "spm.gguf", "F32")
    opts = LoadOptions(n_ctx=64, n_threads=THREADS, device="cpu")
    tb, lb = TorchBackend(path, opts), LlamaCppBackend(path, opts)
    try:
        meta = tb.header.metadata
        assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.add_bos_token" not in meta
        bos = int(meta["tokenizer.ggml.bos_token_id"])
        chat = [{"role": "user", "content": "hello world"}]
        t_toks, l_toks = tb._prompt_tokens(chat, 64), lb._prompt_tokens(chat, 64)
        print(f"bos={bos} torch prompt {t_toks[:5]}... llama.cpp prompt {l_toks[:5]}...")
        assert t_toks == l_toks
        assert t_toks[0] == bos and t_toks[1] != bos, "BOS doubled (or missing) in the chat prompt"
        assert tb.tokenize("hello")[0] == bos  # a raw prompt gets llama.cpp's BOS too
        seen = []
        real_logits = tb.logits
        tb.logits = lambda toks: (seen.append(list(toks)), real_logits(toks))[1]
        collect_imatrix(tb, natural_text(), n_ctx=16, max_chunks=2)
        print("imatrix chunk starts:", [c[:3] for c in seen])
        assert seen and all(c[0] == bos and len(c) == 16 for c in seen)
    finally:
        tb.close()
        lb.close()
