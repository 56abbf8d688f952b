"""OpenAI's API: ``/v1/chat/completions`` and ``/v1/completions`` bodies -> :class:`GenRequest`, and
events -> OpenAI's response objects and SSE chunks (``data: {...}`` ... ``data: [DONE]``).

Sampling fields OpenAI has (``temperature``, ``top_p``, penalties, ``seed``, ``stop``, ``max_tokens``)
map to llama.cpp's; llama-server's extensions (``top_k``, ``min_p``, ``repeat_penalty``) are accepted
too. What is not given keeps edgeinfer's defaults (those of ``edgeinfer run``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from edgeinfer.backend import DoneEvent, TokenEvent
from edgeinfer.server.grammar import openai_response_format
from edgeinfer.server.request import (ApiError, GenRequest, bad, expect, messages_from, number, sampling_fields,
                                      stop_list)

FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


def _common(body: dict, chat: bool) -> GenRequest:
    if expect(body, "n", (int,), 1) != 1:
        raise bad("only n=1 is supported", "n")
    if expect(body, "best_of", (int,), 1) != 1:
        raise bad("only best_of=1 is supported", "best_of")
    if body.get("tools") or body.get("functions"):
        raise bad("tools / function calling are not supported by edgeinfer serve", "tools")
    p = sampling_fields(body)
    mt = number(body, "max_completion_tokens", "max_tokens", kind=int) if chat else None
    if mt is None:
        mt = number(body, "max_tokens", "max_tokens", kind=int)
    p.max_tokens = (-1 if chat else 16) if mt is None else mt  # <= 0: until the context is full
    seed = number(body, "seed", "seed", kind=int)
    p.seed = seed
    p.stop = stop_list(body.get("stop"))
    if isinstance(body.get("reasoning_effort"), str):
        p.think = body["reasoning_effort"] not in ("none", "minimal")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (GET /v1/models lists the served models)", "model")
    return GenRequest(model=model, prompt="", params=p, grammar=openai_response_format(body.get("response_format")))


def chat_request(body: dict) -> GenRequest:
    req = _common(body, chat=True)
    req.prompt = messages_from(body.get("messages"))
    if expect(body, "logprobs", (bool,), False):
        req.logprobs = number(body, "top_logprobs", lo=0, hi=20, kind=int, default=0)
    elif body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return req


def completion_request(body: dict) -> GenRequest:
    req = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if body.get("suffix"):
        raise bad("'suffix' (fill in the middle) is not supported", "suffix")
    req.prompt = prompt
    lp = number(body, "logprobs", lo=0, hi=5, kind=int)
    req.logprobs = lp
    return req


def stream_options(body: dict) -> bool:
    """Whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return bool(expect(so, "include_usage", (bool,), False))


class Reply:
    """Accumulates one generation's text, tokens and log-probabilities and renders OpenAI's objects."""

    def __init__(self, engine, req: GenRequest, job, n_prompt: int, chat: bool, echo: str = ""):
        self.engine, self.req, self.job, self.chat = engine, req, job, chat
        self.n_prompt = n_prompt
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.text = echo
        self.k = 0  # generated tokens seen (index into job.logprobs)
        self.n_completion = 0
        self.pending_lp: list[tuple[int, list]] = []  # (token id, [lp, top]) not yet sent
        self.done: DoneEvent | None = None
        self.offset = len(echo)

    # -- events ----------------------------------------------------------------------------------
    def push(self, ev) -> str:
        """Record an event; returns the new text it adds."""
        if isinstance(ev, DoneEvent):
            self.done = ev
            return ""
        assert isinstance(ev, TokenEvent)
        if ev.token_id >= 0:
            self.n_completion += 1
            if self.req.logprobs is not None and self.k < len(self.job.logprobs):
                self.pending_lp.append((ev.token_id, self.job.logprobs[self.k]))
            self.k += 1
        self.text += ev.text
        return ev.text

    def finish_reason(self) -> str:
        return FINISH.get(self.done.finish_reason if self.done else "stop", "stop")

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_completion,
                "total_tokens": self.n_prompt + self.n_completion}

    # -- log-probabilities -----------------------------------------------------------------------
    def _tok(self, tid: int) -> tuple[str, list[int]]:
        b = self.engine.backend.piece(tid)
        return b.decode("utf-8", errors="replace"), list(b)

    def take_logprobs(self) -> Any:
        """The pending tokens' log-probabilities in this endpoint's shape (None when not asked)."""
        if self.req.logprobs is None:
            return None
        items, self.pending_lp = self.pending_lp, []
        if self.chat:
            content = []
            for tid, (lp, top) in items:
                t, b = self._tok(tid)
                content.append({"token": t, "logprob": lp, "bytes": b,
                                "top_logprobs": [dict(zip(("token", "bytes"), self._tok(i)), logprob=v)
                                                 for i, v in top]})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, (lp, top) in items:
            t, _ = self._tok(tid)
            out["tokens"].append(t)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._tok(i)[0]: v for i, v in top})
            out["text_offset"].append(self.offset)
            self.offset += len(t)
        return out

    # -- objects ---------------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                "system_fingerprint": f"edgeinfer-{self.engine.kind}"}

    def full(self) -> dict:
        """The non-streaming response."""
        lp = self.take_logprobs()
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": lp,
                      "finish_reason": self.finish_reason()}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": lp, "finish_reason": self.finish_reason()}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str | None, finish: bool = False, role: bool = False, include_usage: bool = False) -> dict:
        """One streaming chunk (``usage: null`` on every chunk when the stream ends with a usage chunk)."""
        fr = self.finish_reason() if finish else None
        lp = self.take_logprobs()
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": fr}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": fr}
            obj = "text_completion"
        out = {**self._head(obj), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}


def model_list(pool) -> dict:
    """``GET /v1/models``."""
    data = []
    for m in pool.models.values():
        try:
            created = int(m.path.stat().st_mtime)
        except OSError:
            created = 0
        data.append({"id": m.name, "object": "model", "created": created, "owned_by": "edgeinfer"})
    return {"object": "list", "data": data}


def check_model(pool, name) -> None:
    """404 in OpenAI's shape for a model that is not served."""
    pool.lookup(name)


__all__ = ["chat_request", "completion_request", "Reply", "model_list", "stream_options", "ApiError"]
