"""The evaluator: perplexity, KL-divergence and top-1 agreement, saved reference log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeinfer.corpus import CALIB_MODULES, EVAL_MODULES, load_text
from edgeinfer.errors import EdgeinferError
from edgeinfer.evaluate import LlamaCppLogits, chunks, evaluate, load_saved_logprobs, log_softmax


class FakeLogits:
    """A deterministic 'model': logits depend only on the previous token."""

    n_vocab, add_bos, bos_id = 7, True, 0

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.float32)

    def tokenize(self, text):
        return [1 + (ord(c) % 6) for c in text]

    def logits(self, tokens):
        return self.table[np.asarray(tokens)]


def test_perplexity_and_kl_against_hand_computation():
    rng = np.random.default_rng(0)
    a, b = FakeLogits(rng.standard_normal((7, 7))), FakeLogits(rng.standard_normal((7, 7)))
    text = "the quick brown fox jumps over the lazy dog " * 3
    res = evaluate(a, text, n_ctx=16, ref=b, progress=False)
    # independent computation
    nll, kl, agree, n = 0.0, [], 0, 0
    for ch in chunks(a.tokenize(text), 16, True, 0, None):
        for pos in range(8, 15):
            la, lb = log_softmax(a.table[[ch[pos]]])[0], log_softmax(b.table[[ch[pos]]])[0]
            nll -= la[ch[pos + 1]]
            kl.append(float((np.exp(lb) * (lb - la)).sum()))
            agree += int(la.argmax() == lb.argmax())
            n += 1
    assert res.n_tokens == n
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-12)
    assert res.mean_kl == pytest.approx(np.mean(kl), rel=1e-9)
    assert res.top1_agreement == pytest.approx(agree / n)
    print(res.as_dict())


def test_text_too_short_is_a_clear_error():
    with pytest.raises(EdgeinferError, match="fewer than one chunk"):
        evaluate(FakeLogits(np.zeros((7, 7))), "abc", n_ctx=64, progress=False)


def test_corpora_are_real_disjoint_text():
    ev, cal = load_text("@stdlib-eval"), load_text("@stdlib-calib")
    assert len(ev) > 50_000 and len(cal) > 50_000
    assert not set(EVAL_MODULES) & set(CALIB_MODULES)
    paragraphs_ev = {p for p in ev.split("\n\n") if len(p) > 80}
    paragraphs_cal = {p for p in cal.split("\n\n") if len(p) > 80}
    overlap = paragraphs_ev & paragraphs_cal
    print(f"eval {len(ev)} chars, calib {len(cal)} chars, shared long paragraphs: {len(overlap)}")
    assert len(overlap) <= 0.01 * len(paragraphs_ev)


def test_default_model_self_reference_and_saved_logits(default_gguf, tmp_path):
    text = load_text("@stdlib-eval")[:6000]
    m = LlamaCppLogits(default_gguf, n_ctx=128, n_threads=2)
    saved = tmp_path / "ref.npz"
    r1 = evaluate(m, text, n_ctx=128, max_chunks=3, save_logprobs=saved, progress=False)
    assert 1.5 < r1.perplexity < 60, r1.perplexity
    r2 = evaluate(m, text, n_ctx=128, max_chunks=3, ref_logprobs=load_saved_logprobs(saved), progress=False)
    print(f"ppl={r1.perplexity:.4f} self-KL via saved fp16 logprobs={r2.mean_kl:.2e} top1={r2.top1_agreement}")
    assert r2.perplexity == pytest.approx(r1.perplexity, rel=1e-9)
    assert r2.mean_kl < 1e-3 and r2.top1_agreement > 0.97  # fp16 storage of the reference only
    with pytest.raises(EdgeinferError, match="--ctx"):
        evaluate(m, text, n_ctx=64, max_chunks=1, ref_logprobs=load_saved_logprobs(saved), progress=False)


def test_f32_gguf_perplexity_equals_transformers(hf_default_checkpoint, tmp_path):
    """The evaluator (llama.cpp logits) on an F32 GGUF vs transformers on the same tokens: within 0.5 %."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeinfer.quant.convert import convert

    f32 = convert(hf_default_checkpoint, tmp_path / "smol-f32.gguf", "F32")
    text = load_text("@stdlib-eval")[:8000]
    n_ctx, n_chunks = 256, 3
    m = LlamaCppLogits(f32, n_ctx=n_ctx, n_threads=1)
    ours = evaluate(m, text, n_ctx=n_ctx, max_chunks=n_chunks, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_default_checkpoint, torch_dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for ch in chunks(m.tokenize(text), n_ctx, m.add_bos, m.bos_id, n_chunks):
            logits = hf(torch.tensor([ch])).logits[0].double()
            lp = torch.log_softmax(logits[n_ctx // 2:-1], -1)
            tgt = torch.tensor(ch[n_ctx // 2 + 1:])
            nll -= lp[torch.arange(len(tgt)), tgt].sum().item()
            n += len(tgt)
    ref_ppl = math.exp(nll / n)
    rel = abs(ours.perplexity - ref_ppl) / ref_ppl
    print(f"F32 GGUF perplexity: edgeinfer eval {ours.perplexity:.5f}, transformers {ref_ppl:.5f}, "
          f"relative difference {rel:.2e} over {n} tokens")
    assert ours.n_tokens == n
    assert rel < 0.005
