"""The llama.cpp backend on the real embedded default model."""

from __future__ import annotations

import threading

from edgeinfer.backend import Backend, DoneEvent, SamplingParams, TokenEvent

CHAT = [{"role": "user", "content": "Name three primary colors."}]


def _collect(backend, request, params):
    evs = list(backend.generate(request, params))
    assert isinstance(evs[-1], DoneEvent)
    assert all(isinstance(e, TokenEvent) for e in evs[:-1])
    return evs


def test_backend_implements_protocol(llama_default):
    assert isinstance(llama_default, Backend)
    info = llama_default.info()
    assert info.architecture == "llama" and info.n_ctx == 2048 and info.quant == "Q4_1"
    assert llama_default.memory_bytes()["rss"] > 50 * 2**20


def test_greedy_is_deterministic_and_streams_timings(llama_default):
    p = SamplingParams(temperature=0, max_tokens=24)
    a = _collect(llama_default, CHAT, p)
    b = _collect(llama_default, CHAT, p)
    text = a[-1].text
    assert text.strip(), "the default model should answer"
    assert text == b[-1].text
    assert "".join(e.text for e in a[:-1]) == text
    t = a[-1].timings
    print(f"answer={text!r} ttft={t.ttft_s * 1000:.0f}ms prefill={t.prefill_tok_s:.0f} tok/s "
          f"decode={t.decode_tok_s:.0f} tok/s")
    assert t.prompt_tokens > 10 and t.generated_tokens > 0
    assert t.ttft_s > 0 and t.prefill_tok_s > 0 and t.decode_tok_s > 0


def test_seeded_sampling_is_reproducible(llama_default):
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, max_tokens=16, seed=123)
    assert _collect(llama_default, CHAT, p)[-1].text == _collect(llama_default, CHAT, p)[-1].text


def test_raw_prompt_and_stop_string(llama_default):
    p = SamplingParams(temperature=0, max_tokens=40, stop=["\n"])
    d = _collect(llama_default, "The capital of France is", p)[-1]
    assert "\n" not in d.text and d.finish_reason in ("stop", "length")


def test_tokenizer_round_trip(llama_default):
    text = "Hello, world! Café 😀 123"
    toks = llama_default.tokenize(text, add_special=False)
    assert llama_default.detokenize(toks) == text


def test_cancel_from_another_thread(llama_default):
    p = SamplingParams(temperature=0, max_tokens=400)
    seen = []
    timer = None
    for ev in llama_default.generate(CHAT, p):
        seen.append(ev)
        if len(seen) == 3:
            timer = threading.Thread(target=llama_default.cancel)
            timer.start()
            timer.join()
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].timings.generated_tokens < 10
