"""Backend-independent generation loop: detokenize incrementally, stop strings, timings.

Each backend supplies an iterator of sampled token ids (its first ``next()`` includes the
prefill) and a way to turn a token into bytes; :func:`stream_events` does the rest identically
for every backend, so both produce the same text for the same tokens.
"""

from __future__ import annotations

import codecs
import time
from typing import Callable, Iterable, Iterator, Sequence

from edgeinfer.backend import DoneEvent, Event, SamplingParams, Timings, TokenEvent


class StopStringFilter:
    """Holds back text that could be the start of a stop string; reports a full match.

    ``push(text)`` returns ``(safe_text, stopped)``: ``safe_text`` can be shown now; when
    ``stopped`` is true the stop string and anything after it were dropped.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_events(
    tokens: Iterable[int],
    *,
    piece: Callable[[int], bytes],
    is_eog: Callable[[int], bool],
    params: SamplingParams,
    prompt_tokens: int,
    n_ctx_left: int,
    cancelled: Callable[[], bool],
    t_start: float | None = None,
) -> Iterator[Event]:
    """Turn sampled token ids into :class:`TokenEvent` s and a final :class:`DoneEvent`.

    Args:
        tokens: sampled ids; the first ``next()`` runs the prefill.
        piece: token id -> raw bytes of its text (may be part of a UTF-8 character).
        is_eog: true for end-of-generation tokens (EOS, EOT, ...), which are not shown.
        params: max_tokens and stop strings are applied here.
        prompt_tokens: length of the prompt, for timings.
        n_ctx_left: room left in the context; reaching it ends with ``finish_reason="context"``.
        cancelled: polled after every token.
        t_start: when the request started (defaults to now).
    """
    t0 = time.perf_counter() if t_start is None else t_start
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopStringFilter(params.stop)
    text_parts: list[str] = []
    n = 0
    t_first = None
    reason = "length"
    limit = min(params.max_tokens if params.max_tokens > 0 else n_ctx_left, n_ctx_left)
    it = iter(tokens)
    while n < limit:
        if cancelled():
            reason = "cancelled"
            break
        try:
            tok = next(it)
        except StopIteration:
            reason = "context" if n >= n_ctx_left else "stop"
            break
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if is_eog(tok):
            reason = "stop"
            break
        text, stopped = stops.push(decoder.decode(piece(tok)))
        if text:
            text_parts.append(text)
        yield TokenEvent(text, tok)
        if stopped:
            reason = "stop"
            break
    else:
        reason = "context" if limit == n_ctx_left and n >= n_ctx_left else "length"
    if reason != "stop":
        tail = stops.flush() + decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            yield TokenEvent(tail, -1)
    t_end = time.perf_counter()
    tm = Timings(prompt_tokens=prompt_tokens, generated_tokens=n, total_s=t_end - t0)
    if t_first is not None:
        tm.ttft_s = t_first - t0
        tm.prefill_tok_s = prompt_tokens / tm.ttft_s if tm.ttft_s > 0 else 0.0
        if n > 1 and t_end > t_first:
            tm.decode_tok_s = (n - 1) / (t_end - t_first)
    yield DoneEvent(reason, "".join(text_parts), tm)
