"""Engines: one loaded model that serves up to ``parallel`` generations at once, from worker threads.

* :class:`LlamaEngine`: a :class:`~edgeinfer.backends.llamacpp.LlamaCppBackend` whose runner holds
  ``parallel`` sequences; each request is one runner request id, and the runner's
  :class:`~edgeinfer.backends.llama_slots.SlotEngine` decodes every running sequence in one
  ``llama_decode`` per step. A runner crash fails the requests in flight
  (:class:`~edgeinfer.errors.BackendCrashedError`); the next request starts a fresh runner.
* :class:`TorchEngine`: a :class:`~edgeinfer.backends.torch_engine.TorchBackend` driven by one
  scheduler thread: new prompts are prefilled one by one into their own cache set, then one batched
  call of the fused CPU step (:func:`edgeinfer.kernels.cpu_step.batch`) decodes a token of every
  running sequence -- or, for models it does not cover and on GPUs, one
  :meth:`~edgeinfer.models.base.Transformer.forward_rows`.

Both turn token ids into events with :func:`edgeinfer.generation.stream_events`, exactly as
``edgeinfer run`` does, so the same tokens give the same text.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from edgeinfer.backend import Event, LoadOptions
from edgeinfer.errors import BackendError
from edgeinfer.generation import stream_events
from edgeinfer.server.grammar import check_grammar
from edgeinfer.server.request import ApiError, GenRequest

log = logging.getLogger(__name__)


class Job:
    """One generation in flight: its cancel flag (set from the event loop) and its log-probabilities.

    ``logprobs[i]`` belongs to the i-th generated token (``[logprob, [[id, logprob], ...]]``).
    """

    def __init__(self):
        self.cancelled = threading.Event()
        self.logprobs: list[list] = []
        self.n_tokens = 0  # generated token ids (the end-of-generation token included)
        self._on_cancel: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_cancel(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled.is_set():
                self._on_cancel.append(fn)
                return
        fn()

    def cancel(self) -> None:
        """Stop the generation as soon as possible (thread-safe, idempotent)."""
        with self._lock:
            if self.cancelled.is_set():
                return
            self.cancelled.set()
            hooks, self._on_cancel = self._on_cancel, []
        for fn in hooks:
            fn()


@dataclass
class Prepared:
    """A request's prompt tokens and the context it may use."""

    tokens: list[int]
    n_ctx: int
    t0: float = field(default_factory=time.perf_counter)


class Engine:
    """What both engines share: the backend's tokenizer / template and the prompt checks."""

    backend = None
    parallel = 1

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, Path(path)
        self.size = os.path.getsize(path)

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.backend.tokenize(text, add_special=add_special)

    def prepare(self, req: GenRequest) -> Prepared:
        """Render and tokenize the prompt; 400 for an empty one, 413 when it leaves no room in the context."""
        b = self.backend
        text, add_special = b.prompts.prompt_text(req.prompt, req.params.think)
        tokens = b.tokenize(text, add_special=add_special)
        if not tokens:
            raise ApiError(400, "the prompt is empty after tokenization", "prompt")
        n_ctx = min(req.n_ctx, self.n_ctx) if req.n_ctx > 0 else self.n_ctx
        if len(tokens) >= n_ctx:
            raise ApiError(413, f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; shorten it "
                                "(or start the server with a larger --ctx)", "messages", "context_length_exceeded")
        if req.grammar:
            check_grammar(b._vocab, req.grammar)
        return Prepared(tokens, n_ctx)

    def _events(self, ids: Iterator[int], prep: Prepared, req: GenRequest, job: Job) -> Iterator[Event]:
        def counted():
            for t in ids:
                job.n_tokens += 1
                yield t

        gen = counted()
        try:
            yield from stream_events(gen, piece=self.backend.piece, is_eog=self.backend.is_eog, params=req.params,
                                     prompt_tokens=len(prep.tokens), n_ctx_left=prep.n_ctx - len(prep.tokens),
                                     cancelled=job.cancelled.is_set, t_start=prep.t0)
        finally:
            gen.close()
            ids.close()

    def n_max(self, prep: Prepared, req: GenRequest) -> int:
        left = prep.n_ctx - len(prep.tokens)
        return min(req.params.max_tokens, left) if req.params.max_tokens > 0 else left

    def seed(self, req: GenRequest) -> int:
        return self.backend.seed if req.params.seed is None else int(req.params.seed)

    def memory_bytes(self) -> int:
        """Resident bytes this model costs (the runner's RSS for llama.cpp; the file size for torch)."""
        return self.size

    def close(self) -> None:
        self.backend.close()


class LlamaEngine(Engine):
    """llama.cpp in its supervised runner process, ``parallel`` sequences decoded together."""

    kind = "llama.cpp"

    def __init__(self, name: str, path: Path, opts: LoadOptions, parallel: int):
        from edgeinfer.backends.llamacpp import LlamaCppBackend

        super().__init__(name, path)
        self.parallel = max(1, parallel)
        self.backend = LlamaCppBackend(path, opts, n_seq=self.parallel)

    def generate(self, prep: Prepared, req: GenRequest, job: Job) -> Iterator[Event]:
        """Stream the events of ``req`` (blocking; call from a worker thread)."""
        from edgeinfer.backends.runner_protocol import sampling_dict

        runner = self.backend._ensure_runner()  # a fresh runner after a crash
        sampling = sampling_dict(req.params)
        if req.grammar:
            sampling["grammar"] = req.grammar
        if req.logprobs is not None:
            sampling["n_probs"] = int(req.logprobs)
        rid = runner.submit(prep.tokens, self.n_max(prep, req), sampling, self.seed(req))
        job.on_cancel(lambda: runner.cancel(rid))  # the runner drops the sequence after its current step
        yield from self._events(self._ids(runner, rid, job), prep, req, job)

    def _ids(self, runner, rid: int, job: Job) -> Iterator[int]:
        def logprobs(msg: dict) -> None:
            if "lp" in msg:
                job.logprobs.append(msg["lp"])

        return self.backend._token_ids(runner, rid, {}, on_token=logprobs)

    def memory_bytes(self) -> int:
        rss = self.backend.memory_bytes().get("rss", 0)
        return max(rss, self.size)


_END = object()


@dataclass
class _TorchJob:
    tokens: list[int]
    n_max: int
    sample: Callable  # (logits [V] CPU float32, history) -> token id
    out: "queue.SimpleQueue"
    job: Job


@dataclass
class _Seq:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V this sequence's caches hold
    tj: _TorchJob | None = None
    history: list[int] = field(default_factory=list)
    next_tok: int | None = None


class TorchEngine(Engine):
    """edgeinfer's torch engine with one scheduler thread; sequences decode together in one forward."""

    kind = "torch"

    def __init__(self, name: str, path: Path, opts: LoadOptions, parallel: int):
        from edgeinfer.backends.torch_engine import TorchBackend

        super().__init__(name, path)
        self.backend = TorchBackend(path, opts)
        self.model = self.backend.model
        self.parallel = max(1, parallel)
        if self.parallel > 1:
            try:
                self.model.add_sequences(self.parallel)
            except NotImplementedError as e:
                log.warning("%s: the torch engine decodes one sequence at a time for this model (%s)", path.name, e)
                self.parallel = 1
        self.reuse_prefix = self.backend._reuse_prefix
        self.seqs = [_Seq(i) for i in range(self.parallel)]
        self._steps: dict = {}  # seq -> its fused decode step (built on first use)
        self.inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name=f"torch-engine-{name}", daemon=True)
        self.thread.start()

    def memory_bytes(self) -> int:
        kv = self.model.cache_bytes_per_token() * self.n_ctx * self.parallel
        return self.size + kv

    # -- the request side ------------------------------------------------------------------------
    def generate(self, prep: Prepared, req: GenRequest, job: Job) -> Iterator[Event]:
        """Stream the events of ``req`` (blocking; call from a worker thread)."""
        from edgeinfer.server.torch_sampling import RequestSampler

        sampler = RequestSampler(req, self.seed(req), self.backend, job)
        out: queue.SimpleQueue = queue.SimpleQueue()
        tj = _TorchJob(prep.tokens, self.n_max(prep, req), sampler, out, job)
        job.on_cancel(lambda: out.put(_END))  # the reader stops at once; the scheduler frees the slot
        self.inbox.put(tj)

        def ids():
            try:
                while True:
                    item = out.get()
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                job.cancel()  # tell the scheduler (no-op when it finished the request itself)
                sampler.close()

        yield from self._events(ids(), prep, req, job)

    # -- the scheduler thread --------------------------------------------------------------------
    def _admit(self, block: bool) -> None:
        while True:
            free = [s for s in self.seqs if s.tj is None]
            if not free:
                return
            try:
                tj = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if tj is None:
                self._stop = True
                return
            block = False
            if tj.job.cancelled.is_set():
                continue
            s = max(free, key=lambda s: _prefix(s.cached, tj.tokens) if self.reuse_prefix else 0)
            s.tj, s.history, s.next_tok = tj, [], None
            self._prefill(s)

    def _prefill(self, s: _Seq) -> None:
        import torch

        tj = s.tj
        start = min(_prefix(s.cached, tj.tokens), len(tj.tokens) - 1) if self.reuse_prefix else 0
        s.cached = tj.tokens[:start]
        logits = self.model(torch.tensor([tj.tokens[start:]], device=self.backend.device), start,
                            last_only=True, seq=s.seq)[0, -1]
        s.cached = list(tj.tokens)
        self._sampled(s, logits)

    def _sampled(self, s: _Seq, logits) -> None:
        tj = s.tj
        tok = tj.sample(logits.float().cpu(), s.history)
        s.history.append(tok)
        tj.out.put(tok)
        if self.backend.is_eog(tok) or len(s.history) >= tj.n_max or len(s.cached) >= self.n_ctx:
            self._finish(s)
        else:
            s.next_tok = tok

    def _finish(self, s: _Seq) -> None:
        if s.tj is not None:
            s.tj.out.put(_END)
        s.tj, s.next_tok = None, None

    def _step(self) -> None:
        import torch

        for s in self.seqs:  # drop cancelled requests before spending a forward on them
            if s.tj is not None and s.tj.job.cancelled.is_set():
                self._finish(s)
        live = [s for s in self.seqs if s.tj is not None and s.next_tok is not None]
        if not live:
            return
        steps = [self._fused_step(s.seq) for s in live]
        if None not in steps:
            # every sequence's token in one call of the CPU kernels: the weights read once, no torch op
            # per layer, and each row's logits exactly its sequence's own step (the text a request gets
            # does not depend on the requests beside it)
            from edgeinfer.kernels import cpu_step

            toks, pos, n = [s.next_tok for s in live], [len(s.cached) for s in live], cpu_step.MAX_ROWS
            logits = torch.cat([cpu_step.batch(steps[i:i + n], toks[i:i + n], pos[i:i + n])
                                for i in range(0, len(live), n)])
        else:
            ids = torch.tensor([[s.next_tok] for s in live], device=self.backend.device)  # [B, 1]
            rows = [(s.seq, len(s.cached)) for s in live]
            logits = self.model.forward_rows(ids, rows) if len(live) > 1 else \
                self.model(ids, rows[0][1], last_only=True, seq=live[0].seq)[:, -1]  # [B, V]
        for s, lg in zip(live, logits):
            s.cached.append(s.next_tok)
            self._sampled(s, lg)

    def _fused_step(self, seq: int):
        """The fused CPU decode step over sequence ``seq``'s caches (kernels/cpu_step.py), or None
        where the backend decodes through the model's forward."""
        if self.backend._step is None:
            return None
        if seq == 0:
            return self.backend._step
        if seq not in self._steps:
            from edgeinfer.kernels import cpu_step

            self._steps[seq] = cpu_step.build(self.model, seq)
        return self._steps[seq]

    def _loop(self) -> None:
        while not self._stop:
            busy = any(s.tj is not None for s in self.seqs)
            try:
                self._admit(block=not busy)
                self._step()
            except Exception as e:  # noqa: BLE001 -- an engine bug or OOM fails the requests in flight, not the server
                log.exception("torch engine %s failed", self.name)
                err = BackendError(f"{self.path}: the torch engine failed while generating ({type(e).__name__}: {e})")
                for s in self.seqs:
                    if s.tj is not None:
                        s.tj.out.put(err)
                        s.tj, s.next_tok = None, None
                    s.cached = []

    def close(self) -> None:
        self._stop = True
        self.inbox.put(None)
        self.thread.join(timeout=10)
        super().close()


def _prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def load_engine(backend: str, name: str, path: Path, opts: LoadOptions, parallel: int) -> Engine:
    """Load ``path`` as served model ``name`` with ``backend`` (``llama.cpp`` or ``torch``)."""
    from edgeinfer.backends import normalize_backend

    if normalize_backend(backend) == "llama.cpp":
        return LlamaEngine(name, path, opts, parallel)
    return TorchEngine(name, path, opts, parallel)
