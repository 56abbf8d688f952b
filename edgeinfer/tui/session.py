"""The model side of the chat, run in a worker thread: load a backend, fit the history, stream.

:class:`ModelHost` owns the loaded backend (one at a time) and runs a :class:`GenJob` in the
calling thread, reporting progress as Textual messages posted to a target (``post_message`` is
thread-safe). Nothing here touches a widget, so the UI never blocks on the model.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from textual.message import Message

from edgeinfer.backend import Backend, DoneEvent, LoadOptions, ModelInfo, SamplingParams
from edgeinfer.errors import BackendCrashedError, EdgeinferError
from edgeinfer.tui.context import count_tokens, fit_to_context

log = logging.getLogger(__name__)

POST_INTERVAL_S = 0.1  # the worker sends text to the UI at most this often (the first token at once)

Loader = Callable[[str, str, LoadOptions], Backend]  # (model name, backend name, options) -> Backend


# -- messages from the worker to the UI -------------------------------------------------------
class ModelLoading(Message):
    def __init__(self, model: str, backend: str) -> None:
        self.model, self.backend = model, backend
        super().__init__()


class ModelLoaded(Message):
    def __init__(self, info: ModelInfo, memory: dict) -> None:
        self.info, self.memory = info, memory
        super().__init__()


class ModelFailed(Message):
    def __init__(self, error: str) -> None:
        self.error = error
        super().__init__()


class ContextInfo(Message):
    """The prompt that was sent: its tokens, the context size and how many messages were dropped."""

    def __init__(self, job_id: int, prompt_tokens: int, n_ctx: int, dropped: int, fits: bool = True) -> None:
        self.job_id, self.prompt_tokens, self.n_ctx, self.dropped, self.fits = job_id, prompt_tokens, n_ctx, dropped, fits
        super().__init__()


class TokenChunk(Message):
    """Text of one or more generated tokens; ``t`` is when the worker got the last one."""

    def __init__(self, job_id: int, text: str, n_tokens: int, t: float) -> None:
        self.job_id, self.text, self.n_tokens, self.t = job_id, text, n_tokens, t
        super().__init__()


class GenerationDone(Message):
    """The reply ended: ``done`` on success, else ``error`` (``crashed``: the model's process died)."""

    def __init__(self, job_id: int, done: DoneEvent | None, error: str | None = None, crashed: bool = False) -> None:
        self.job_id, self.done, self.error, self.crashed = job_id, done, error, crashed
        super().__init__()


@dataclass
class GenJob:
    """One reply to generate. ``cancel`` may be set from the UI thread at any time."""

    id: int
    conversation_id: int
    model: str
    backend: str
    messages: list
    params: SamplingParams
    cancel: threading.Event = field(default_factory=threading.Event)
    n_cpu_moe: int | None = None  # the chat's MoE expert offload (None: the app's --cpu-moe/--n-cpu-moe)


class ModelHost:
    """Holds the loaded backend and loads another one when a job asks for a different model."""

    def __init__(self, loader: Loader, opts: LoadOptions):
        self.loader, self.opts = loader, opts
        self.backend: Backend | None = None
        self.key: tuple[str, str, int] | None = None  # (model, backend, n_cpu_moe) of the loaded backend
        self._lock = threading.Lock()  # guards self.backend while loading / counting
        self._busy = threading.Lock()  # held while a job generates, so close() waits for it

    def ensure(self, model: str, backend: str, post: Callable[[Message], object],
               n_cpu_moe: int | None = None) -> Backend:
        """Return a backend for ``(model, backend)`` with ``n_cpu_moe`` layers' experts in host memory
        (None: the load options' value), loading it (and closing the old one) if needed.

        Raises:
            EdgeinferError: the model cannot be resolved or loaded.
        """
        opts = self.opts if n_cpu_moe is None else dataclasses.replace(self.opts, n_cpu_moe=n_cpu_moe)
        with self._lock:
            if self.backend is not None and self.key == (model, backend, opts.n_cpu_moe):
                return self.backend
            post(ModelLoading(model, backend))
            if self.backend is not None:  # free the old model first: two may not fit in memory
                self.backend.close()
                self.backend, self.key = None, None
            b = self.loader(model, backend, opts)
            self.backend, self.key = b, (model, backend, opts.n_cpu_moe)
            post(ModelLoaded(b.info(), b.memory_bytes()))
            return b

    def count(self, messages: list) -> tuple[int, int] | None:
        """``(tokens, n_ctx)`` of ``messages`` with the loaded backend, or ``None`` if none is loaded."""
        with self._lock:
            b = self.backend
            if b is None:
                return None
            return count_tokens(b, messages), b.info().n_ctx

    def run(self, job: GenJob, post: Callable[[Message], object]) -> None:
        """Generate ``job`` in the calling thread, posting :class:`TokenChunk` s and a :class:`GenerationDone`."""
        with self._busy:
            self._run(job, post)

    def _run(self, job: GenJob, post: Callable[[Message], object]) -> None:
        try:
            b = self.ensure(job.model, job.backend, post, job.n_cpu_moe)
            if job.cancel.is_set():
                post(GenerationDone(job.id, DoneEvent("cancelled", "")))
                return
            n_ctx = b.info().n_ctx
            fitted = fit_to_context(b, job.messages, n_ctx, job.params.max_tokens)
            post(ContextInfo(job.id, fitted.prompt_tokens, n_ctx, fitted.dropped, fitted.fits))
            if not fitted.fits:
                post(GenerationDone(job.id, None, f"the message is {fitted.prompt_tokens} tokens with the system "
                                                  f"prompt; the context holds {n_ctx} (raise --ctx or shorten it)"))
                return
            done = None
            n = 0
            pending: list[str] = []
            t_post = 0.0
            for ev in b.generate(fitted.messages, job.params):
                if job.cancel.is_set():
                    b.cancel()  # generate() clears the flag when it starts; set it again
                if isinstance(ev, DoneEvent):
                    done = ev
                    continue
                n += 1
                pending.append(ev.text)
                now = time.perf_counter()
                if n == 1 or now - t_post >= POST_INTERVAL_S:  # batch: fewer wake-ups of the UI thread
                    post(TokenChunk(job.id, "".join(pending), n, now))
                    pending.clear()
                    t_post = now
            if pending:
                post(TokenChunk(job.id, "".join(pending), n, time.perf_counter()))
            post(GenerationDone(job.id, done))
        except BackendCrashedError as e:  # the model's process died; the backend starts a new one next time
            post(GenerationDone(job.id, None, f"{e}. The messages so far are kept; the next message starts "
                                              "a new runner (ctrl+s switches the backend)", crashed=True))
        except EdgeinferError as e:
            post(GenerationDone(job.id, None, str(e)))
        except Exception as e:  # a backend bug must not kill the UI: report it in the chat
            log.exception("generation failed")
            post(GenerationDone(job.id, None, f"{type(e).__name__}: {e}"))

    def close(self, timeout: float = 10.0) -> None:
        """Free the backend, after waiting (up to ``timeout`` s) for a running job to stop."""
        if self.backend is not None:
            self.backend.cancel()
        if not self._busy.acquire(timeout=timeout):
            log.warning("a generation did not stop within %.0f s; the model is left loaded", timeout)
            return
        try:
            with self._lock:
                if self.backend is not None:
                    self.backend.close()
                    self.backend, self.key = None, None
        finally:
            self._busy.release()
