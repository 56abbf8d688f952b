"""Split a reply into reasoning ("thinking") and answer segments, driven by a table of markers.

Reasoning models wrap their chain of thought in markers that differ per family. They are data
here, not code: adding a family is one row in :data:`REASONING_MARKERS`.

* ``<think> ... </think>``: DeepSeek-R1, Qwen3, SmolLM3, Phi-4-reasoning.
* ``<|channel>thought ... <channel|>``: Gemma 4's thinking channel (its chat template opens a
  model turn with ``<|turn>model`` and the model writes ``<|channel>thought\\n...<channel|>``
  before the answer).
* ``<|channel|>analysis<|message|> ... <|end|>``: gpt-oss (Harmony format).

The parser works on the whole text produced so far, so it can be called on every streamed
chunk; an opened but not yet closed segment is reported with ``closed=False``. Reasoning is
shown collapsed in the UI and removed by :func:`strip_reasoning` before a reply is sent back to
the model as context (chat templates of these families drop it from history themselves).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Markers:
    """Opening and closing marker of one reasoning format."""

    family: str
    open: str
    close: str


REASONING_MARKERS: tuple[Markers, ...] = (
    Markers("think-tag", "<think>", "</think>"),
    Markers("gemma4-channel", "<|channel>thought", "<channel|>"),
    Markers("harmony", "<|channel|>analysis<|message|>", "<|end|>"),
)


@dataclass
class Segment:
    """A piece of a reply: ``kind`` is ``"thinking"`` or ``"answer"``."""

    kind: str
    text: str
    closed: bool = True


def _next_open(text: str, start: int, markers) -> tuple[int, Markers | None]:
    best, found = -1, None
    for m in markers:
        i = text.find(m.open, start)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, m
    return best, found


def _partial_open_suffix(text: str, markers) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of an opening marker."""
    hold = 0
    for m in markers:
        for k in range(min(len(m.open) - 1, len(text)), 0, -1):
            if text.endswith(m.open[:k]):
                hold = max(hold, k)
                break
    return hold


def split_reasoning(text: str, markers: tuple[Markers, ...] = REASONING_MARKERS,
                    streaming: bool = False) -> list[Segment]:
    """Split ``text`` into answer and thinking segments (empty answer segments are dropped).

    Args:
        text: the reply so far.
        markers: the formats to recognise.
        streaming: when true, a trailing fragment that may be the start of an opening marker
            (``"<thi"``) is held back instead of being shown as answer text.
    """
    out: list[Segment] = []
    pos = 0
    while pos < len(text):
        i, m = _next_open(text, pos, markers)
        if m is None:
            tail = text[pos:]
            if streaming:
                tail = tail[: len(tail) - _partial_open_suffix(tail, markers)]
            if tail.strip():
                out.append(Segment("answer", tail))
            break
        if text[pos:i].strip():
            out.append(Segment("answer", text[pos:i]))
        body_start = i + len(m.open)
        j = text.find(m.close, body_start)
        if j < 0:
            body = text[body_start:]
            if streaming:  # hide a half-written closing marker
                for k in range(min(len(m.close) - 1, len(body)), 0, -1):
                    if body.endswith(m.close[:k]):
                        body = body[:-k]
                        break
            out.append(Segment("thinking", body.strip("\n"), closed=False))
            break
        out.append(Segment("thinking", text[body_start:j].strip("\n"), closed=True))
        pos = j + len(m.close)
    for s in out:
        if s.kind == "answer":
            s.text = s.text.strip("\n")
    return out


def strip_reasoning(text: str, markers: tuple[Markers, ...] = REASONING_MARKERS) -> str:
    """The answer part of a reply only (what is sent back to the model as context)."""
    return "\n\n".join(s.text for s in split_reasoning(text, markers) if s.kind == "answer").strip()
