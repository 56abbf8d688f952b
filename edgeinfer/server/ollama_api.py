"""Ollama's API: ``/api/chat`` and ``/api/generate`` bodies (``options`` with Ollama's names) ->
:class:`GenRequest`, and events -> Ollama's NDJSON objects (``done: false`` fragments, then one
``done: true`` object with ``eval_count``, ``prompt_eval_count`` and durations in nanoseconds);
``/api/tags``, ``/api/show``, ``/api/ps`` describe the served models.

Options that are not given keep edgeinfer's defaults (those of ``edgeinfer run``), not Ollama's
(which adds ``repeat_penalty`` 1.1 and ``top_p`` 0.9). ``num_ctx`` caps the context of a request
within the one the model was loaded with (``serve --ctx``); Ollama would reload the model instead.
"""

from __future__ import annotations

import functools
import hashlib
import time
from datetime import datetime, timezone
from typing import Any

from edgeinfer.backend import DoneEvent, TokenEvent
from edgeinfer.server.grammar import ollama_format
from edgeinfer.server.request import (GenRequest, ServeSampling, bad, expect, messages_from, number, sampling_fields,
                                      stop_list)

DONE_REASON = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _options(body: dict) -> tuple[ServeSampling, int]:
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise bad("'options' must be an object", "options")
    p = sampling_fields(opts)
    v = number(opts, "seed", "seed", kind=int)
    if v is not None:
        p.seed = v
    v = number(opts, "repeat_last_n", lo=-1, hi=1 << 20, kind=int)
    if v is not None:
        p.repeat_last_n = v
    n = number(opts, "num_predict", lo=-2, hi=1 << 30, kind=int)
    p.max_tokens = -1 if n is None or n < 0 else max(1, n)  # -1 infinite, -2 fill the context
    p.stop = stop_list(opts.get("stop"), "options.stop")
    num_ctx = number(opts, "num_ctx", lo=0, hi=1 << 24, kind=int) or 0
    think = body.get("think")
    if isinstance(think, bool):
        p.think = think
    return p, int(num_ctx)


def _base(body: dict) -> GenRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (GET /api/tags lists the served models)", "model")
    p, num_ctx = _options(body)
    req = GenRequest(model=model, prompt="", params=p, grammar=ollama_format(body.get("format")), n_ctx=num_ctx)
    if expect(body, "logprobs", (bool,), False):
        req.logprobs = number(body, "top_logprobs", lo=0, hi=20, kind=int, default=0)
    return req


def chat_request(body: dict) -> GenRequest | None:
    """The request, or None for Ollama's "load the model" call (no messages)."""
    req = _base(body)
    if body.get("tools"):
        raise bad("tools are not supported by edgeinfer serve", "tools")
    msgs = body.get("messages")
    if not msgs:
        return None
    req.prompt = messages_from(msgs)
    return req


def generate_request(body: dict) -> GenRequest | None:
    """The request, or None for Ollama's "load the model" call (no prompt)."""
    req = _base(body)
    if body.get("images"):
        raise bad("images are not supported by edgeinfer serve", "images")
    if body.get("template"):
        raise bad("'template' (a Go template) is not supported; edgeinfer uses the GGUF's chat template, or "
                  "pass 'raw': true with a formatted prompt", "template")
    if body.get("suffix"):
        raise bad("'suffix' (fill in the middle) is not supported", "suffix")
    prompt = expect(body, "prompt", (str,), "")
    system = expect(body, "system", (str,), "")
    if not prompt:
        return None
    if expect(body, "raw", (bool,), False):
        req.prompt = prompt
    else:
        req.prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return req


class Reply:
    """One generation rendered as Ollama's objects (``chat`` or ``generate`` shape)."""

    def __init__(self, engine, req: GenRequest, job, prompt_tokens: list[int], chat: bool, load_s: float):
        self.engine, self.req, self.job, self.chat = engine, req, job, chat
        self.prompt_tokens = prompt_tokens
        self.load_s = load_s
        self.t0 = time.perf_counter()
        self.text = ""
        self.tokens: list[int] = []
        self.k = 0
        self.pending_lp: list = []
        self.done: DoneEvent | None = None

    def push(self, ev) -> str:
        if isinstance(ev, DoneEvent):
            self.done = ev
            return ""
        assert isinstance(ev, TokenEvent)
        if ev.token_id >= 0:
            self.tokens.append(ev.token_id)
            if self.req.logprobs is not None and self.k < len(self.job.logprobs):
                self.pending_lp.append((ev.token_id, self.job.logprobs[self.k]))
            self.k += 1
        self.text += ev.text
        return ev.text

    def _logprobs(self) -> list | None:
        if self.req.logprobs is None:
            return None
        items, self.pending_lp = self.pending_lp, []
        tok = lambda i: self.engine.backend.piece(i).decode("utf-8", errors="replace")  # noqa: E731
        return [{"token": tok(t), "logprob": lp, "top_logprobs": [{"token": tok(i), "logprob": v} for i, v in top]}
                for t, (lp, top) in items]

    def _obj(self, text: str, done: bool) -> dict:
        out: dict[str, Any] = {"model": self.req.model, "created_at": now_rfc3339()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        lp = self._logprobs()
        if lp is not None:
            out["logprobs"] = lp
        out["done"] = done
        return out

    def fragment(self, text: str) -> dict:
        return self._obj(text, False)

    def final(self, text: str = "") -> dict:
        """The ``done: true`` object (with the whole text when not streaming)."""
        out = self._obj(text, True)
        t = self.done.timings if self.done else None
        total = time.perf_counter() - self.t0 + self.load_s
        ns = lambda s: int(s * 1e9)  # noqa: E731
        out.update({"done_reason": DONE_REASON.get(self.done.finish_reason if self.done else "stop", "stop"),
                    "total_duration": ns(total), "load_duration": ns(self.load_s),
                    "prompt_eval_count": len(self.prompt_tokens),
                    "prompt_eval_duration": ns(t.ttft_s if t else 0.0),
                    "eval_count": len(self.tokens),
                    "eval_duration": ns(max(0.0, (t.total_s - t.ttft_s)) if t else 0.0)})
        if not self.chat:
            out["context"] = list(self.prompt_tokens) + self.tokens
        return out


def load_reply(model: str, chat: bool, reason: str = "load") -> dict:
    """What Ollama answers to a chat / generate call without messages / prompt (load or unload the model)."""
    out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update({"done": True, "done_reason": reason})
    return out


# -- describing models ----------------------------------------------------------------------------
def _digest(path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def _header(path):
    """The validated GGUF header (cached per file version: /api/tags is polled by front ends)."""
    return _header_cached(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _header_cached(path: str, mtime_ns: int):
    from edgeinfer.gguf_check import validate_gguf

    return validate_gguf(path)


def details(path) -> dict:
    """Ollama's ``details`` of a GGUF: format, family, parameter size, quantization."""
    from edgeinfer.inspect_gguf import quant_label

    h = _header(path)
    n_params = sum(t.n_elements for t in h.tensors)
    size = (f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M") if n_params else ""
    return {"parent_model": "", "format": "gguf", "family": h.architecture, "families": [h.architecture],
            "parameter_size": size, "quantization_level": quant_label(h)}


def _modified(path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")


def tags(pool) -> dict:
    """``GET /api/tags``: every served model."""
    out = []
    for m in pool.models.values():
        out.append({"name": m.name, "model": m.name, "modified_at": _modified(m.path), "size": m.path.stat().st_size,
                    "digest": _digest(m.path), "details": details(m.path)})
    return {"models": out}


def ps(pool) -> dict:
    """``GET /api/ps``: the loaded models and when they expire."""
    out = []
    for m in pool.loaded():
        exp = m.expires_at
        exp_s = "9999-12-31T23:59:59Z" if exp == float("inf") else \
            datetime.fromtimestamp(exp, timezone.utc).isoformat().replace("+00:00", "Z")
        out.append({"name": m.name, "model": m.name, "size": m.engine.memory_bytes(), "digest": _digest(m.path),
                    "details": details(m.path), "expires_at": exp_s, "size_vram": 0,
                    "context_length": m.engine.n_ctx})
    return {"models": out}


def show(pool, body: dict) -> dict:
    """``POST /api/show``: details, scalar GGUF metadata as ``model_info``, the chat template."""
    name = body.get("model") or body.get("name")
    m = pool.lookup(name)
    h = _header(m.path)
    info = {k: v for k, v in h.metadata.items()
            if isinstance(v, (int, float, str, bool)) and not k.startswith("tokenizer.chat_template")
            and not (isinstance(v, str) and len(v) > 1024)}
    template = h.metadata.get("tokenizer.chat_template")
    params = "\n".join(f"{k:<16}{v}" for k, v in (("num_ctx", pool.opts.n_ctx),))
    return {"modelfile": f"# edgeinfer serves {m.path}\nFROM {m.path}\n", "parameters": params,
            "template": template if isinstance(template, str) else "", "details": details(m.path),
            "model_info": info, "capabilities": ["completion"], "modified_at": _modified(m.path)}
