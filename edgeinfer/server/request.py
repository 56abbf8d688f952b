"""What both APIs turn a request into (:class:`GenRequest`), the error they answer with (:class:`ApiError`),
and the field checks they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from edgeinfer.backend import SAMPLING_BOUNDS, Message, SamplingParams


@dataclass
class ServeSampling(SamplingParams):
    """:class:`SamplingParams` plus OpenAI's penalties (llama.cpp's ``penalty_present`` / ``penalty_freq``)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class GenRequest:
    """One generation, whichever API asked for it.

    Attributes:
        model: the served model name the client asked for.
        prompt: a raw prompt (``str``) or a chat (list of messages).
        params: sampling and stop settings.
        grammar: GBNF (``root`` rule) the output must match, or None.
        logprobs: None = none; k >= 0 = the sampled token's log-probability and the k best.
        n_ctx: a per-request context cap (Ollama's ``num_ctx``), 0 = the engine's.
    """

    model: str
    prompt: str | Sequence[Message]
    params: ServeSampling = field(default_factory=ServeSampling)
    grammar: str | None = None
    logprobs: int | None = None
    n_ctx: int = 0


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message, and OpenAI's ``type`` / ``param`` / ``code``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    """A 400 naming the offending field."""
    return ApiError(400, message, param, "invalid_value" if param else None)


def expect(body: dict, name: str, kinds: tuple, default: Any = None) -> Any:
    """``body[name]`` if present and of one of ``kinds`` (bool is never a number), else ``default``; 400 otherwise."""
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise bad(f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, not a boolean", name)
    if not isinstance(v, kinds):
        if float in kinds and isinstance(v, int):
            return float(v)
        raise bad(f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, not {type(v).__name__}", name)
    return v


def number(body: dict, name: str, bound: str | None = None, lo: float | None = None, hi: float | None = None,
           kind: type = float, default: Any = None):
    """A numeric field checked against :data:`~edgeinfer.backend.SAMPLING_BOUNDS` ``[bound]`` or ``[lo, hi]``."""
    v = expect(body, name, (int,) if kind is int else (int, float), default)
    if v is None:
        return None
    v = kind(v)
    problem = SAMPLING_BOUNDS[bound].problem(v) if bound else None
    if problem is None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        problem = f"must be in [{lo}, {hi}]"
    if problem:
        raise bad(f"'{name}' {problem} (got {v})", name)
    return v


def sampling_fields(src: dict) -> ServeSampling:
    """The sampling fields both APIs share, checked and read from ``src`` (an OpenAI body, or an Ollama
    body's ``options``): temperature, top_p, min_p, repeat_penalty, top_k, presence/frequency penalty."""
    p = ServeSampling()
    for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
        v = number(src, name, name)
        if v is not None:
            setattr(p, name, v)
    v = number(src, "top_k", "top_k", kind=int)
    if v is not None:
        p.top_k = v
    for name in ("presence_penalty", "frequency_penalty"):
        v = number(src, name, lo=-2.0, hi=2.0)
        if v is not None:
            setattr(p, name, v)
    return p


def stop_list(v: Any, param: str = "stop", limit: int = 16) -> tuple[str, ...]:
    """A ``stop`` field (a string or a list of strings) -> a tuple."""
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > limit:
            raise bad(f"'{param}' holds {len(v)} strings; at most {limit}", param)
        return tuple(s for s in v if s)
    raise bad(f"'{param}' must be a string or a list of strings", param)


def messages_from(v: Any, param: str = "messages") -> list[Message]:
    """Check a chat: a non-empty list of ``{"role", "content"}`` whose content is text (or text parts)."""
    if not isinstance(v, list) or not v:
        raise bad(f"'{param}' must be a non-empty list of messages", param)
    out: list[Message] = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise bad(f"'{param}[{i}]' must be an object with 'role' and 'content'", param)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"'{param}[{i}].role' must be system, developer, user, assistant or tool (got {role!r})", param)
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad(f"'{param}[{i}].content' has a {kind!r} part; only text parts are supported", param)
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"'{param}[{i}].content' must be a string", param)
        if m.get("images"):
            raise bad(f"'{param}[{i}].images': images are not supported by edgeinfer serve", param)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
