"""The backend-independent streaming loop: stop strings, UTF-8 pieces, limits, timings."""

from __future__ import annotations

from edgeinfer.backend import DoneEvent, SamplingParams, TokenEvent
from edgeinfer.generation import StopStringFilter, stream_events


def test_stop_filter_holds_back_prefixes():
    f = StopStringFilter(["</s>", "User:"])
    assert f.push("Hello <") == ("Hello ", False)
    assert f.push("/") == ("", False)
    assert f.push("x") == ("</x", False)
    assert f.push(" Us") == (" ", False)
    assert f.push("er: more") == ("", True)


def test_stop_filter_without_stops_passes_through():
    f = StopStringFilter([])
    assert f.push("abc") == ("abc", False)
    assert f.flush() == ""


def _run(pieces, params, eog=(), n_ctx_left=100, cancel_after=None):
    ids = list(range(len(pieces)))
    count = {"n": 0}

    def toks():
        for i in ids:
            count["n"] += 1
            yield i

    def cancelled():
        return cancel_after is not None and count["n"] >= cancel_after

    return list(stream_events(toks(), piece=lambda i: pieces[i], is_eog=lambda i: i in eog, params=params,
                              prompt_tokens=5, n_ctx_left=n_ctx_left, cancelled=cancelled))


def test_utf8_split_across_tokens_and_timings():
    emoji = "😀".encode()
    evs = _run([b"Hi ", emoji[:2], emoji[2:], b"!"], SamplingParams(max_tokens=10))
    done = evs[-1]
    assert isinstance(done, DoneEvent) and done.text == "Hi 😀!" and done.finish_reason == "stop"
    assert [e.text for e in evs[:-1]] == ["Hi ", "", "😀", "!"]
    assert done.timings.generated_tokens == 4 and done.timings.prompt_tokens == 5
    assert done.timings.ttft_s > 0 and done.timings.decode_tok_s > 0


def test_eog_max_tokens_stop_string_and_context():
    assert _run([b"a", b"b", b"c"], SamplingParams(max_tokens=10), eog={1})[-1].text == "a"
    d = _run([b"a", b"b", b"c"], SamplingParams(max_tokens=2))[-1]
    assert (d.text, d.finish_reason) == ("ab", "length")
    d = _run([b"x", b"ST", b"OP", b"y"], SamplingParams(stop=["STOP"]))[-1]
    assert (d.text, d.finish_reason) == ("x", "stop")
    d = _run([b"a", b"b", b"c"], SamplingParams(max_tokens=-1), n_ctx_left=2)[-1]
    assert (d.text, d.finish_reason) == ("ab", "context")


def test_cancel_keeps_partial_text():
    evs = _run([b"a", b"b", b"c", b"d"], SamplingParams(), cancel_after=2)
    assert evs[-1].finish_reason == "cancelled" and evs[-1].text == "ab"
    assert all(isinstance(e, TokenEvent) for e in evs[:-1])
