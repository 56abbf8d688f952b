"""Speculative decoding (edgeinfer/engine/speculative.py, prompt lookup in both backends).

Oracles:

* greedy: plain greedy decoding of the same backend. In the torch engine with the fused CPU step
  (F16 and quantized targets alike) the tokens must be identical: the prompt is prefilled as plain
  decoding prefills it and every verification pass is a batched fused step, whose rows equal the
  one-token steps exactly. Elsewhere (llama.cpp; the torch engine's forward) a batched pass rounds
  differently from a one-token pass (8-bit activation blocks), so where the two greedy texts differ,
  the first difference must be a near-tie: the teacher-forced margin between the two tokens below
  :data:`NEAR_TIE` (printed).
* sampled: the acceptance rule against the target's own distribution -- token frequencies over
  many seeded draws vs ``softmax(logits)``, a chi-square test with a fixed seed (p < 1e-3 fails);
  a rule that accepts every draft fails the same test (the test can fail).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import _llama_quant as lq
from edgeinfer.backend import DoneEvent, LoadOptions, SamplingParams, SpeculativeOptions
from edgeinfer.engine.prompt_lookup import PromptLookup
from edgeinfer.engine.speculative import verify
from edgeinfer.errors import BackendError
from edgeinfer.sampling import Sampler

THREADS = 1
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is."]
CODE = '''def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        key, value = line.split("=")
        config[key.strip()] = value.strip()
    return config
'''
EDIT = f"Here is a function:\n```python\n{CODE}```\nRewrite it, renaming `config` to `settings`. Output only the code."
#: logit margin below which a batched and a one-token pass of a quantized model may pick either token:
#: the two paths' logits differ by 0.4-1.9 (max abs per position, 30 positions of the default Q4_1
#: model, torch engine fused step vs batched forward); flips seen: margins up to 0.44. A speculation
#: bug (wrong position, cache slot or accepted count) is caught exactly by the F16 tests above
NEAR_TIE = 1.0
GREEDY = SamplingParams(temperature=0, max_tokens=40)


# -- the pieces ---------------------------------------------------------------------------------------
def test_prompt_lookup_drafts_the_continuation_of_the_longest_match():
    pl = PromptLookup(4, ngram_max=3, ngram_min=1)
    pl.extend([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3])
    assert pl.draft() == [7, 5, 2, 3]  # "2 3" -> latest followed occurrence is "2 3 7"
    pl.extend([7])
    assert pl.draft() == [5, 2, 3, 7]  # "2 3 7": the 3-gram match wins
    per = PromptLookup(6, 2, 2)
    per.extend([4, 5, 4, 5])
    assert per.draft() == [4, 5, 4, 5, 4, 5]
    per.feedback(6, 2)
    assert per.draft() == [4, 5, 4]  # after 2 of 6 accepted: 3 tokens, then doubling
    per.feedback(3, 3)
    assert len(per.draft()) == 6  # a periodic text drafts its period past the end
    none = PromptLookup(4, 3, 3)
    none.extend([1, 2, 3, 4, 5])
    assert none.draft() == [] and none.draft(0) == []
    none.sync([1, 2, 3, 4, 5, 1, 2, 3])
    assert none.draft(2) == [4, 5]
    none.sync([8, 8])  # not an extension: re-indexed
    assert none.tokens == [8, 8]


def _chi2_crit(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 1e-3 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom, bins with expected < 5 pooled."""
    exp = probs.double() * n
    stat, df, pool_o, pool_e = 0.0, -1, 0.0, 0.0
    for t in range(len(probs)):
        if exp[t] >= 5:
            stat += (counts.get(t, 0) - float(exp[t])) ** 2 / float(exp[t])
            df += 1
        else:
            pool_o += counts.get(t, 0)
            pool_e += float(exp[t])
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        df += 1
    return stat, df


def test_acceptance_rule_samples_the_target_distribution():
    torch.manual_seed(0)
    v = 10
    target = torch.randn(3, v) * 1.5  # rows: after no draft, after d1, after d1 d2
    draft = torch.randn(2, v) * 1.5  # a draft model that disagrees a lot (many rejections)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    s = Sampler(params, seed=1234)
    p0 = torch.softmax(target[0], -1)
    q = [torch.softmax(draft[i], -1) for i in range(2)]
    n = 12000
    first, wrong, lookup, n_acc = Counter(), Counter(), Counter(), 0
    for _ in range(n):
        d = [s.draw(q[0]), s.draw(q[1])]
        out = verify(target, d, q, s, [])
        first[out[0]] += 1
        n_acc += len(out) - 1
        wrong[d[0]] += 1  # "always accept the draft": its first token follows q, not p
        lookup[verify(target, [3], None, s, [])[0]] += 1  # a deterministic draft (prompt lookup)
    for name, counts in (("draft model", first), ("prompt lookup", lookup)):
        stat, df = _chi2(counts, p0, n)
        print(f"{name}: chi2 {stat:.1f} (df {df}, p=1e-3 bound {_chi2_crit(df):.1f})")
        assert stat < _chi2_crit(df)
    stat, df = _chi2(wrong, p0, n)
    print(f"accept-everything rule: chi2 {stat:.1f} (must fail), accepted {n_acc / n:.2f} drafts/step")
    assert stat > 10 * _chi2_crit(df)
    assert 0.2 < n_acc / n < 1.8  # both accepting and rejecting happened


def test_greedy_acceptance_is_argmax_with_penalties():
    logits = torch.tensor([[0.0, 5.0, 4.9], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    s = Sampler(SamplingParams(temperature=0), 0)
    assert verify(logits, [1, 0], None, s, []) == [1, 0, 2]  # both accepted + bonus
    assert verify(logits, [2], None, s, []) == [1]  # rejected: the target's own token
    pen = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0), 0)
    assert verify(logits, [2], None, pen, [1]) == [2, 0]  # token 1 penalized in the history: 2.5 < 4.9


# -- the torch engine on the offline pair: the default model as F16 (target) and Q4_0 (draft) ---------
@pytest.fixture(scope="module")
def pair(default_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    f16 = lq.llama_quantize(default_gguf, d / "smollm2-f16.gguf", "F16", allow_requantize=True)
    q4 = lq.llama_quantize(default_gguf, d / "smollm2-q4_0.gguf", "Q4_0", allow_requantize=True)
    return f16, q4


def _greedy(backend, prompt, params=GREEDY) -> tuple[list[int], DoneEvent]:
    toks, done = [], None
    for ev in backend.generate(prompt, params):
        if isinstance(ev, DoneEvent):
            done = ev
        elif ev.token_id >= 0:
            toks.append(ev.token_id)
    return toks, done


@pytest.mark.slow
def test_torch_draft_model_and_lookup_greedy_identical_on_f16(pair):
    from edgeinfer.backends.torch_engine import TorchBackend

    f16, q4 = pair
    opts = dict(n_ctx=1024, n_threads=THREADS, device="cpu")
    plain = TorchBackend(f16, LoadOptions(**opts))
    spec = TorchBackend(f16, LoadOptions(**opts, speculative=SpeculativeOptions(draft=str(q4), n_draft=4)))
    look = TorchBackend(f16, LoadOptions(**opts, speculative=SpeculativeOptions(prompt_lookup=True, n_draft=6)))
    try:
        assert "draft model" in spec.info().extra["speculative"]
        for p in PROMPTS + [EDIT]:
            chat = [{"role": "user", "content": p}]
            ref, _ = _greedy(plain, chat)
            for name, b in (("draft model", spec), ("prompt lookup", look)):
                got, done = _greedy(b, chat)
                t = done.timings
                print(f"F16 {name} {p[:24]!r}: {len(got)} tok, accepted {t.draft_accepted}/{t.draft_tokens} in "
                      f"{t.verify_steps} steps, identical={got == ref}")
                assert got == ref
                assert t.verify_steps < len(got) or name == "prompt lookup"
        assert spec.speculator.stats.accepted > 0
    finally:
        for b in (plain, spec, look):
            b.close()


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)


def assert_same_or_near_tie(ref, got, prompt_tokens, logits_fn, label) -> None:
    """``got == ref``, or they differ first at a near-tie of the teacher-forced logits."""
    i = _first_difference(ref, got)
    if i is None:
        n = min(len(ref), len(got))
        print(f"{label}: identical over {n} tokens")
        assert n > 0
        assert ref[:n] == got[:n] and (len(ref) == len(got) or n == 0 or ref[n - 1] == got[n - 1])
        return
    row = logits_fn(prompt_tokens + ref[:i])
    margin = abs(float(row[ref[i]]) - float(row[got[i]]))
    print(f"{label}: first difference at token {i}, teacher-forced margin {margin:.3f} (near-tie < {NEAR_TIE})")
    assert margin < NEAR_TIE


def test_torch_speculative_greedy_on_the_default_model(default_gguf, pair):
    from edgeinfer.backends.torch_engine import TorchBackend

    _, q4 = pair
    opts = dict(n_ctx=1024, n_threads=THREADS, device="cpu")
    plain = TorchBackend(default_gguf, LoadOptions(**opts))
    spec = TorchBackend(default_gguf, LoadOptions(**opts, speculative=SpeculativeOptions(draft=str(q4), n_draft=4)))
    look = TorchBackend(default_gguf, LoadOptions(**opts, speculative=SpeculativeOptions(prompt_lookup=True)))
    try:
        for p in PROMPTS[:2] + [EDIT]:
            chat = [{"role": "user", "content": p}]
            ptoks = plain._prompt_tokens(chat, plain.n_ctx)
            ref, _ = _greedy(plain, chat)
            for name, b in (("draft", spec), ("lookup", look)):
                got, done = _greedy(b, chat)
                label = (f"torch Q4_1 {name} {p[:20]!r} ({done.timings.draft_accepted}/"
                         f"{done.timings.draft_tokens} accepted)")
                if b._step is not None:  # verification passes are batched fused steps: plain decoding's numerics
                    print(f"{label}: identical={got == ref} over {len(ref)} tokens")
                    assert got == ref
                else:
                    assert_same_or_near_tie(ref, got, ptoks, lambda t: plain.logits(t)[-1], label)
        assert look.speculator.stats.accepted > 0  # the code edit copies from the prompt
    finally:
        for b in (plain, spec, look):
            b.close()


def test_llamacpp_prompt_lookup_greedy(default_gguf):
    from edgeinfer.backends.llamacpp import LlamaCppBackend
    from test_torch_engine import llama_logits

    # one thread each: two spinning llama.cpp threads on a busy 2-core machine are many times slower
    llama_default = LlamaCppBackend(default_gguf, LoadOptions(n_ctx=2048, n_threads=THREADS, seed=0))
    look = LlamaCppBackend(default_gguf, LoadOptions(n_ctx=2048, n_threads=THREADS, seed=0,
                                                     speculative=SpeculativeOptions(prompt_lookup=True)))
    try:
        assert look.info().extra["speculative"].startswith("prompt lookup")
        accepted = 0
        for p in [EDIT]:
            chat = [{"role": "user", "content": p}]
            ptoks = llama_default._prompt_tokens(chat, 2048)
            ref, _ = _greedy(llama_default, chat, SamplingParams(temperature=0, max_tokens=64))
            got, done = _greedy(look, chat, SamplingParams(temperature=0, max_tokens=64))
            t = done.timings
            accepted += t.draft_accepted
            assert_same_or_near_tie(ref, got, ptoks, lambda toks: llama_logits(default_gguf, toks)[-1],
                                    f"llama.cpp lookup {p[:20]!r} ({t.draft_accepted}/{t.draft_tokens} accepted, "
                                    f"{t.verify_steps} steps)")
        assert accepted > 0
        # the K/V of rejected guesses were dropped: the next request reuses the cache and still agrees
        raw = "def fibonacci(n):\n"
        ref, _ = _greedy(llama_default, raw)
        got, _ = _greedy(look, raw)
        assert len(ref) > 8
        assert_same_or_near_tie(ref, got, llama_default.tokenize(raw),
                                lambda toks: llama_logits(default_gguf, toks)[-1], "llama.cpp raw prompt after reuse")
    finally:
        look.close()
        llama_default.close()


# -- sampled output at the engine level: a tiny random model and a *different* tiny draft ----------
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    import _tiny_models
    from edgeinfer.quant.convert import convert

    d = tmp_path_factory.mktemp("tiny_spec")
    t = convert(_tiny_models.make_tiny_checkpoint("llama", d / "t", seed=0), d / "target.gguf", "F32")
    q = convert(_tiny_models.make_tiny_checkpoint("llama", d / "q", seed=1), d / "draft.gguf", "Q8_0")
    return t, q


def test_sampled_first_token_follows_the_target_softmax(tiny_pair):
    from edgeinfer.backends.torch_engine import TorchBackend

    target, draft = tiny_pair
    b = TorchBackend(target, LoadOptions(n_ctx=64, n_threads=THREADS, device="cpu",
                                         speculative=SpeculativeOptions(draft=str(draft), n_draft=3, p_min=0.0)))
    try:
        prompt = "the cat"
        ids = b.tokenize(prompt)
        p = torch.softmax(b.logits(ids)[-1] / 1.5, -1)
        params = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=1)
        n, counts, acc, drafted = 1500, Counter(), 0, 0
        for seed in range(n):
            # the speculator's own first pass (prompt + drafts verified together), not the backend's
            # (which prefills the prompt alone and samples its first token plainly)
            gen = b.speculator.tokens(ids, [], Sampler(SamplingParams(**params), seed))
            counts[next(gen)] += 1
            gen.close()
            acc += b.speculator.stats.accepted
            drafted += b.speculator.stats.drafted
        stat, df = _chi2(counts, p, n)
        print(f"tiny llama, different draft: chi2 {stat:.1f} (df {df}, bound {_chi2_crit(df):.1f}), "
              f"acceptance {acc / drafted:.1%}")
        assert stat < _chi2_crit(df)
        assert 0 < acc < drafted
    finally:
        b.close()


def test_draft_with_another_vocabulary_is_refused(default_gguf, tiny_pair):
    from edgeinfer.backends.torch_engine import TorchBackend

    with pytest.raises(BackendError, match="vocabulary differs.*49152 tokens|vocabulary differs"):
        TorchBackend(default_gguf, LoadOptions(n_ctx=256, n_threads=THREADS, device="cpu",
                                               speculative=SpeculativeOptions(draft=str(tiny_pair[1]))))


def test_cli_speculative_flags(cli_env, tiny_pair, default_gguf):
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "edgeinfer", "run", "-p", "hi", "-n", "4", *a],  # noqa: E731
                                    env=cli_env, capture_output=True, text=True, timeout=300)
    r = run("--draft", str(tiny_pair[1]))  # llama.cpp backend
    assert r.returncode == 2 and "needs --backend torch" in r.stderr and "Traceback" not in r.stderr
    r = run("--draft-n", "4")
    assert r.returncode == 2 and "--draft-n needs" in r.stderr
    r = run("-m", str(tiny_pair[0]), "--backend", "torch", "--draft", str(default_gguf))
    assert r.returncode == 2 and "vocabulary differs" in r.stderr and "Traceback" not in r.stderr
    r = run("-m", str(tiny_pair[0]), "--backend", "torch", "--draft", str(tiny_pair[1]), "--temp", "0", "--stats")
    print(r.stderr[-600:])
    assert r.returncode == 0 and "speculative (draft model, 8 drafts):" in r.stderr


# -- sliding-window (ring-buffer) caches: rejected drafts are rolled back --------------------------
def test_ring_cache_rollback_restores_the_window():
    from edgeinfer.models.cache import KVCache

    c = KVCache(1, 2, n_ctx=16, window=4, device="cpu", dtype=torch.float32)
    kv = lambda p0, s: torch.arange(p0, p0 + s, dtype=torch.float32).view(1, 1, s, 1).expand(1, 1, s, 2)  # noqa: E731
    c.update(kv(0, 6), kv(0, 6), 0)  # positions 2..5 in the ring
    before = c.k.clone()
    c.mark(6)
    c.update(kv(6, 3), kv(6, 3), 6)  # three guesses overwrite positions 2, 3, 4
    c.rollback(7)  # keep position 6, drop 7 and 8
    assert sorted(c.k[0, 0, :, 0].tolist()) == [3.0, 4.0, 5.0, 6.0]
    c.rollback(6)
    assert torch.equal(c.k, before)
    c.mark(6)
    for p in (6, 7):
        c.update(kv(p, 1), kv(p, 1), p)  # one token at a time (a draft model)
    c.rollback(6)
    assert torch.equal(c.k, before)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    import _tiny_models
    from edgeinfer.quant.convert import convert

    d = tmp_path_factory.mktemp("tiny_gemma3")
    target = convert(_tiny_models.make_tiny_checkpoint("gemma3", d / "g"), d / "g-f32.gguf", "F32")
    # a different random gemma3 (same tokenizer) as the draft: it is often wrong, so its ring rolls back too
    draft = convert(_tiny_models.make_tiny_checkpoint("gemma3", d / "h", seed=1), d / "h-q8.gguf", "Q8_0")
    return target, draft


def test_sliding_window_model_speculative_greedy_identical(tiny_gemma3):
    from edgeinfer.backends.torch_engine import TorchBackend

    f32, q8 = tiny_gemma3
    opts = dict(n_ctx=96, n_threads=THREADS, device="cpu")
    plain = TorchBackend(f32, LoadOptions(**opts))
    assert any(layer.attn.cache.ring for layer in plain.model.layers)  # window 4 < context: ring buffers
    specs = {"draft": TorchBackend(f32, LoadOptions(**opts, speculative=SpeculativeOptions(draft=str(q8), n_draft=6,
                                                                                           p_min=0.0))),
             "lookup": TorchBackend(f32, LoadOptions(**opts, speculative=SpeculativeOptions(
                 prompt_lookup=True, ngram_min=1, ngram_max=2)))}
    try:
        params = SamplingParams(temperature=0, max_tokens=48)
        for prompt in ("the cat sat on the mat and the cat", "def add(a, b): return a + b"):
            ref, _ = _greedy(plain, prompt, params)
            for name, b in specs.items():
                got, done = _greedy(b, prompt, params)
                t = done.timings
                print(f"gemma3 (window 4) {name} {prompt[:12]!r}: {len(got)} tok, accepted {t.draft_accepted}/"
                      f"{t.draft_tokens}, identical={got == ref}")
                assert got == ref
                assert b.speculator.n_draft <= 3  # clamped below the window
                assert 0 < t.draft_accepted < t.draft_tokens or name == "draft"
    finally:
        for b in (plain, *specs.values()):
            b.close()
