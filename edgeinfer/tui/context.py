"""Build the chat sent to the model: system prompt, history without reasoning, trimmed to fit.

Pure functions over the :class:`edgeinfer.backend.Backend` Protocol (``format_chat`` and
``tokenize``); no Textual, no backend module. Token counts are those of the fully rendered
chat template, so they match what the backend will actually prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from edgeinfer.backend import Backend, Message
from edgeinfer.tui.reasoning import strip_reasoning


def history_messages(system_prompt: str, turns: Sequence[Message]) -> list[Message]:
    """Chat messages for the model: the system prompt (if any) then every turn.

    Assistant turns lose their reasoning segments (``<think>...``), which are for the reader,
    not for the next prompt; empty assistant turns (a reply stopped before any text) are skipped.
    """
    out: list[Message] = []
    if system_prompt.strip():
        out.append({"role": "system", "content": system_prompt})
    for m in turns:
        if m["role"] == "assistant":
            text = strip_reasoning(m["content"])
            if not text:
                continue
            out.append({"role": "assistant", "content": text})
        elif m["role"] in ("user", "system"):
            out.append({"role": m["role"], "content": m["content"]})
    return out


def count_tokens(backend: Backend, messages: Sequence[Message]) -> int:
    """Tokens of ``messages`` rendered with the backend's chat template (with generation prompt)."""
    return len(backend.tokenize(backend.format_chat(messages, add_generation_prompt=True)))


def reply_reserve(n_ctx: int, max_tokens: int) -> int:
    """Tokens kept free for the reply: ``max_tokens``, at most half the context (a quarter if unlimited)."""
    if max_tokens <= 0:
        return n_ctx // 4
    return min(max_tokens, n_ctx // 2)


@dataclass
class Fitted:
    """The chat that fits, how many history messages were dropped, and its token count."""

    messages: list[Message]
    dropped: int
    prompt_tokens: int
    fits: bool


def fit_to_context(backend: Backend, messages: Sequence[Message], n_ctx: int, max_tokens: int) -> Fitted:
    """Drop the oldest turns (never the system prompt nor the last user message) until the chat fits.

    A turn is a user message with the replies that follow it; dropping stops at the last user
    message. ``fits`` is false when even the system prompt plus the last user message is too long.
    """
    msgs = list(messages)
    budget = n_ctx - reply_reserve(n_ctx, max_tokens)
    head = [m for m in msgs[:1] if m["role"] == "system"]
    body = msgs[len(head):]
    dropped = 0
    n = count_tokens(backend, head + body)
    while n > budget:
        users = [i for i, m in enumerate(body) if m["role"] == "user"]
        if len(users) <= 1 and (not users or users[0] == 0):
            return Fitted(head + body, dropped, n, fits=n < n_ctx)
        # drop everything before the second user message (the oldest turn)
        cut = users[1] if users[0] == 0 else users[0]
        body = body[cut:]
        dropped += cut
        n = count_tokens(backend, head + body)
    return Fitted(head + body, dropped, n, fits=True)
