"""The llama.cpp backend: the model runs in a supervised runner process, the tokenizer here.

The GGUF is validated in Python first (:mod:`edgeinfer.gguf_check`) so a corrupt file never
reaches native code. The weights, the KV cache and every matrix multiply live in a child process
(:mod:`edgeinfer.backends.llama_runner`, as Ollama and LM Studio do): when llama.cpp crashes
(a signal, an abort, out of memory) only the runner dies, the caller gets one
:class:`~edgeinfer.errors.BackendCrashedError` naming the signal, the model and what to try, and
the next :meth:`LlamaCppBackend.generate` starts a new runner. This process keeps a
``vocab_only`` llama.cpp model for tokenizing, detokenizing and the chat template, so it never
multiplies a matrix. Sampling is llama.cpp's sampler chain in the runner; the text stream,
stop strings and timings come from :func:`edgeinfer.generation.stream_events`, shared with the
torch engine. Which buffer types hold the weights is decided by
:mod:`edgeinfer.backends.llama_placement` (no AMX unless ``EDGEINFER_LLAMA_AMX=1``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from edgeinfer.backend import DoneEvent, Event, LoadOptions, Message, ModelInfo, SamplingParams
from edgeinfer.backends.common import (LlamaCppVocab, PromptBuilder, context_size, default_threads, process_memory,
                                       vocab_only_log_filter)
from edgeinfer.backends.llama_placement import ENV_AMX, ENV_REPACK, BufferPolicy, TensorOverride, expert_overrides
from edgeinfer.backends.runner_client import RunnerDied, RunnerLoadError, RunnerProcess, child_env
from edgeinfer.backends.runner_protocol import sampling_dict, spec_dict
from edgeinfer.errors import BackendCrashedError, BackendError, InvalidModelError
from edgeinfer.gguf_check import validate_gguf

LOAD_TIMEOUT_S = 1800.0  # a runner that neither loads nor fails within this (a hang) is killed


def check_known_architecture(h) -> None:
    """Refuse a GGUF whose ``general.architecture`` llama.cpp does not know, before loading it."""
    import gguf

    if h.torch_only:
        raise InvalidModelError(f"{h.path}: this file runs in edgeinfer's torch engine only (architecture "
                                f"{h.architecture!r}: stock llama.cpp cannot run it correctly: {h.torch_only}); "
                                "use --backend torch")
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if h.architecture not in known:
        raise InvalidModelError(
            f"{h.path}: unknown architecture {h.architecture!r} (general.architecture); llama.cpp knows "
            f"{len(known)} architectures, e.g. llama, qwen2, qwen3, gemma3, mistral3 — is the file from a newer tool?")


class LlamaCppBackend(LlamaCppVocab):
    """A GGUF loaded in a llama.cpp runner process. Implements :class:`edgeinfer.backend.Backend`.

    Args:
        path: the GGUF.
        opts: context, threads, GPU layers, seed.
        n_seq: sequences the runner decodes together (1 for a single user).
        overrides: tensor -> buffer type overrides passed on to llama.cpp (they win over edgeinfer's).
        cpu_report: pretend the CPU offers these extra buffer types (``{"extra": [...]}``; tests).
    """

    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike, opts: LoadOptions | None = None, *, n_seq: int = 1,
                 overrides: Sequence[TensorOverride] = (), cpu_report: dict | None = None):
        opts = opts or LoadOptions()
        self.path = Path(path)
        self.header = validate_gguf(self.path)  # raises InvalidModelError before native code
        check_known_architecture(self.header)
        self.policy = BufferPolicy.from_env()  # a bad EDGEINFER_LLAMA_* value fails here, in one line
        self.n_threads = opts.n_threads or default_threads()
        self.seed = opts.seed
        spec = opts.speculative
        if spec is not None and spec.draft:
            raise BackendError(f"--draft {spec.draft}: a draft model needs --backend torch; the llama.cpp backend "
                               "drafts by --prompt-lookup")
        self._spec = spec_dict(spec)
        self._load = {"path": str(self.path), "n_ctx": context_size(self.header, opts.n_ctx), "n_seq": n_seq,
                      "n_batch": 512, "n_threads": self.n_threads,
                      "n_gpu_layers": opts.n_gpu_layers if opts.device != "cpu" else 0,
                      "policy": dataclasses.asdict(self.policy),
                      "overrides": [[o.pattern, o.buffer_type]
                                    for o in (*overrides, *expert_overrides(opts.n_cpu_moe))]}
        if cpu_report is not None:
            self._load["cpu_report"] = cpu_report
        self.runner: RunnerProcess | None = None
        self.restarts = 0
        self._cancel = threading.Event()
        self._current: int | None = None
        self._start_lock = threading.Lock()
        t0 = time.perf_counter()
        runner = RunnerProcess(self._load, child_env(), LOAD_TIMEOUT_S)  # it loads while we read the vocabulary
        try:
            import llama_cpp

            with vocab_only_log_filter():
                self._vocab_llm = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            runner.close()
            raise BackendError(f"{self.path}: llama.cpp could not load the vocabulary ({e})") from None
        self._init_vocab(self._vocab_llm)
        self.prompts = PromptBuilder(self.header.metadata, self._token_text, self.path.name, self.adds_bos())
        try:
            self.runner = self._wait(runner, "loading")
        except BackendError:
            self._vocab_llm.close()
            raise
        self.load_s = time.perf_counter() - t0

    # -- the runner ------------------------------------------------------------------------------
    def _wait(self, runner: RunnerProcess, doing: str) -> RunnerProcess:
        try:
            runner.wait_ready()
        except RunnerLoadError as e:
            runner.close()
            raise BackendError(f"{self.path}: llama.cpp could not load the model ({e})") from None
        except RunnerDied as e:
            runner.close()
            raise BackendCrashedError(self.crash_message(e, doing)) from None
        return runner

    def _ensure_runner(self) -> RunnerProcess:
        """The live runner; a new one if the last one died (the next request after a crash)."""
        with self._start_lock:
            if self.runner is None or self.runner.exited:
                if self.runner is not None:
                    self.runner.close()
                    self.restarts += 1
                self.runner = None
                self.runner = self._wait(RunnerProcess(self._load, child_env(), LOAD_TIMEOUT_S), "loading")
            return self.runner

    @property
    def runner_pid(self) -> int | None:
        """The pid of the runner process (None before it starts or after close)."""
        return self.runner.pid if self.runner is not None else None

    def crash_message(self, died: RunnerDied, doing: str) -> str:
        """One line: what crashed, how, with which model, and what to try."""
        name = str(self.header.metadata.get("general.name") or self.path.stem)
        tips = ["--backend torch"]
        if self.policy.allow_amx:
            tips.append(f"unset {ENV_AMX} (AMX is known to crash)")
        if self.policy.allow_extra:
            tips.append(f"{ENV_REPACK}=0 (plain CPU buffers, no repacking)")
        detail = f" [{died.detail}]" if died.detail else ""
        return (f"llama.cpp crashed with {died.reason} while {doing} {name} ({self.path}){detail}; "
                f"try {' or '.join(tips)}")

    # -- info --------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return int(self.runner.info["n_ctx"]) if self.runner is not None and self.runner.info else self._load["n_ctx"]

    def info(self) -> ModelInfo:
        device = "cpu" if not self._lc.llama_supports_gpu_offload() or not self._load["n_gpu_layers"] else "gpu-offload"
        ready = self.runner.info if self.runner is not None else {}
        return self._model_info(device, self.n_ctx, {
            "threads": self.n_threads, "runner_pid": self.runner_pid, "buffers": dict(ready.get("buffers", {})),
            "placement": ready.get("placement", ""), "runner_restarts": self.restarts,
            **({"speculative": f"prompt lookup, {self._spec['n_draft']} drafts"} if self._spec else {})})

    def memory_bytes(self) -> dict:
        """The runner's memory (the model lives there): ``rss``, ``peak``; ``host_rss`` is this process."""
        mem = self.runner.memory() if self.runner is not None else {"rss": 0, "peak": 0}
        return {"rss": mem["rss"], "device": 0, "peak": mem["peak"], "host_rss": process_memory()}

    # -- generation --------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()
        runner, rid = self.runner, self._current
        if runner is not None and rid is not None:
            runner.cancel(rid)  # the runner stops after its current step, even inside a long prompt

    def generate(self, prompt: str | Sequence[Message], params: SamplingParams) -> Iterator[Event]:
        t0 = time.perf_counter()
        self._cancel.clear()
        runner = self._ensure_runner()
        n_ctx = self.n_ctx
        tokens = self._prompt_tokens(prompt, n_ctx, params.think)
        left = n_ctx - len(tokens)
        n_max = min(params.max_tokens, left) if params.max_tokens > 0 else left
        seed = self.seed if params.seed is None else params.seed
        rid = runner.submit(tokens, n_max, sampling_dict(params), seed, self._spec)
        self._current = rid
        end: dict = {}
        try:
            for ev in self._stream(self._token_ids(runner, rid, end), tokens, params, n_ctx, t0):
                if isinstance(ev, DoneEvent) and end.get("reason") == "cancelled" and ev.finish_reason == "stop":
                    ev.finish_reason = "cancelled"  # the runner stopped first; stream_events saw the end
                if isinstance(ev, DoneEvent) and end.get("spec"):
                    tm = ev.timings
                    tm.draft_tokens, tm.draft_accepted, tm.verify_steps = (int(x) for x in end["spec"])
                yield ev
        finally:
            self._current = None

    def _token_ids(self, runner: RunnerProcess, rid: int, end: dict, on_token=None) -> Iterator[int]:
        """Token ids of request ``rid`` as they come; cancels the request if closed early. ``end``
        receives the end event (and the speculative counts so far); ``on_token(msg)`` sees each token
        event first (the server reads its log-probabilities there)."""
        finished = False
        try:
            for msg in runner.events(rid):
                ev = msg.get("ev")
                if ev == "tok":
                    if "spec" in msg:
                        end["spec"] = msg["spec"]  # the counts so far (the end event may go unread)
                    if on_token is not None:
                        on_token(msg)
                    yield int(msg["tok"])
                elif ev == "end":
                    finished = True
                    end.update(msg)
                    return
                elif ev == "error":
                    finished = True
                    raise BackendError(f"{self.path}: llama.cpp failed while generating: {msg.get('message')}")
        except RunnerDied as e:
            finished = True
            raise BackendCrashedError(self.crash_message(e, "generating with")) from None
        finally:
            if not finished:
                runner.cancel(rid)
            runner.forget(rid)

    def close(self) -> None:
        runner, self.runner = getattr(self, "runner", None), None
        if runner is not None:
            runner.close()
        if getattr(self, "_vocab_llm", None) is not None:
            self._vocab_llm.close()
            self._vocab_llm = None
