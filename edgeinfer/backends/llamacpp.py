"""The llama.cpp backend (llama-cpp-python).

The GGUF is validated in Python first (:mod:`edgeinfer.gguf_check`) so a corrupt file never
reaches native code. Sampling is llama.cpp's own sampler chain; the text stream, stop strings
and timings come from :func:`edgeinfer.generation.stream_events`, shared with the torch engine.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from edgeinfer.backend import Event, LoadOptions, Message, ModelInfo, SamplingParams
from edgeinfer.backends.common import LlamaCppVocab, PromptBuilder, context_size, default_threads, process_memory
from edgeinfer.errors import BackendError, InvalidModelError
from edgeinfer.gguf_check import validate_gguf


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
    """A GGUF loaded in llama.cpp. Implements :class:`edgeinfer.backend.Backend`."""

    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike, opts: LoadOptions | None = None):
        opts = opts or LoadOptions()
        self.path = Path(path)
        self.header = validate_gguf(self.path)  # raises InvalidModelError before native code
        check_known_architecture(self.header)
        import llama_cpp

        self._lc = llama_cpp
        n_ctx = context_size(self.header, opts.n_ctx)
        self.n_threads = opts.n_threads or default_threads()
        t0 = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=opts.n_gpu_layers if opts.device != "cpu" else 0,
                seed=opts.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"{self.path}: llama.cpp could not load the model ({e}); "
                               f"architecture {self.header.architecture!r} may be unsupported by this llama.cpp") from None
        self.load_s = time.perf_counter() - t0
        self.seed = opts.seed
        self._cancel = threading.Event()
        self._init_vocab(self.llm)
        self.prompts = PromptBuilder(self.header.metadata, self._token_text, self.path.name, self.adds_bos())

    # -- info --------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        device = "cpu" if not self._lc.llama_supports_gpu_offload() else "gpu-offload"
        return self._model_info(device, self.llm.n_ctx(), {"threads": self.n_threads})

    def memory_bytes(self) -> dict:
        return {"rss": process_memory(), "device": 0}

    # -- generation --------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def generate(self, prompt: str | Sequence[Message], params: SamplingParams) -> Iterator[Event]:
        t0 = time.perf_counter()
        self._cancel.clear()
        n_ctx = self.llm.n_ctx()
        tokens = self._prompt_tokens(prompt, n_ctx)
        self.llm.set_seed(self.seed if params.seed is None else params.seed)
        temp = params.temperature if params.temperature > 0 else 0.0
        gen = self.llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=temp,
            repeat_penalty=params.repeat_penalty,
        )
        yield from self._stream(gen, tokens, params, n_ctx, t0)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None
