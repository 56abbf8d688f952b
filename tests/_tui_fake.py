"""A scripted fake backend for the TUI tests: streams given pieces with a delay, records requests.

It implements the :class:`edgeinfer.backend.Backend` Protocol like the real backends do, so the
app cannot tell the difference: tokenize (one token per word), format_chat, generate (honours
cancel(), max_tokens and the context size), memory_bytes.
"""

from __future__ import annotations

import threading
import time

from edgeinfer.backend import DoneEvent, ModelInfo, SamplingParams, Timings, TokenEvent


class FakeBackend:
    name = "fake"

    def __init__(self, replies=None, delay: float = 0.002, n_ctx: int = 4096, model: str = "fake-model",
                 backend: str = "llama.cpp"):
        self.replies = list(replies or [["Hello", " there", "!"]])
        self.delay = delay
        self.n_ctx = n_ctx
        self.model = model
        self.backend = backend
        self.requests: list = []  # every prompt passed to generate()
        self.params: list = []  # the SamplingParams of every generate()
        self.closed = False
        self._cancel = threading.Event()
        self.started = threading.Event()  # set when the first token of a reply is out

    def info(self) -> ModelInfo:
        return ModelInfo(path=f"/models/{self.model}.gguf", name=self.model, architecture="llama", backend=self.backend,
                         device="cpu", n_ctx=self.n_ctx, n_ctx_train=self.n_ctx, quant="Q4_1", load_s=0.01)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(range(len(text.split()) + (1 if add_special else 0)))

    def detokenize(self, tokens) -> str:
        return " ".join("w" for _ in tokens)

    def format_chat(self, messages, add_generation_prompt: bool = True) -> str:
        out = "".join(f"<{m['role']}> {m['content']} " for m in messages)
        return out + ("<assistant> " if add_generation_prompt else "")

    def cancel(self) -> None:
        self._cancel.set()

    def memory_bytes(self) -> dict:
        return {"rss": 123 * 2**20, "device": 0}

    def close(self) -> None:
        self.closed = True

    def generate(self, prompt, params: SamplingParams):
        self._cancel.clear()
        self.started.clear()
        self.requests.append([dict(m) for m in prompt] if not isinstance(prompt, str) else prompt)
        self.params.append(params)
        pieces = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(pieces, str):
            pieces = [pieces]
        t0 = time.perf_counter()
        text, n, reason = "", 0, "stop"
        t_first = None
        for p in pieces:
            if self._cancel.is_set():
                reason = "cancelled"
                break
            if params.max_tokens > 0 and n >= params.max_tokens:
                reason = "length"
                break
            time.sleep(self.delay)
            n += 1
            t_first = t_first or time.perf_counter()
            text += p
            yield TokenEvent(p, n)
            self.started.set()
        t1 = time.perf_counter()
        tm = Timings(prompt_tokens=len(self.tokenize(self.format_chat(prompt))), generated_tokens=n, total_s=t1 - t0,
                     ttft_s=(t_first or t1) - t0,
                     decode_tok_s=(n - 1) / (t1 - t_first) if t_first and n > 1 and t1 > t_first else 0.0)
        yield DoneEvent(reason, text, tm)


class FakeLoader:
    """The app's ``loader``: hands out FakeBackends and records which (model, backend) were loaded."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loads: list[tuple[str, str]] = []
        self.options: list = []  # the LoadOptions of every load
        self.backends: list[FakeBackend] = []

    def __call__(self, model: str, backend: str, opts) -> FakeBackend:
        self.loads.append((model, backend))
        self.options.append(opts)
        b = FakeBackend(model=model, backend=backend, **self.kwargs)
        self.backends.append(b)
        return b

    @property
    def current(self) -> FakeBackend:
        return self.backends[-1]


def run_async(fn):
    """Run an ``async def`` test with ``asyncio.run`` (no pytest-asyncio plugin needed)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
