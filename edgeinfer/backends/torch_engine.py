"""The torch backend: edgeinfer's own PyTorch engine behind the :class:`~edgeinfer.backend.Backend` Protocol.

Loading memory-maps the GGUF and keeps the weights quantized (:mod:`edgeinfer.engine.loader`);
tokenization is llama.cpp's own (llama-cpp-python with ``vocab_only=True``, after the GGUF was
validated in Python), chat templates and BOS handling come from
:class:`~edgeinfer.backends.common.PromptBuilder`, and the text stream, stop strings and timings
from :func:`edgeinfer.generation.stream_events` -- all shared with the llama.cpp backend, so both
backends turn the same tokens into the same text.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from edgeinfer.backend import DoneEvent, Event, LoadOptions, Message, ModelInfo, SamplingParams
from edgeinfer.backends.common import (LlamaCppVocab, PromptBuilder, context_size, default_threads, load_vocab_model,
                                       process_memory)
from edgeinfer.engine.loader import load_model, pick_device
from edgeinfer.errors import BackendError
from edgeinfer.kernels import cpu_step, ggml_cpu
from edgeinfer.kernels.qlinear import FusedLinear, QuantLinear
from edgeinfer.kernels.ggml_numerics import resolve_numerics
from edgeinfer.gguf_check import validate_gguf
from edgeinfer.sampling import Sampler


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (0 where the OS does not say).

    Linux: ``VmHWM`` of /proc/self/status (``ru_maxrss`` would include the RSS of the process
    that forked us, e.g. a test runner); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (AttributeError, OSError):
        return 0
    return r if sys.platform == "darwin" else r * 1024


class TorchBackend(LlamaCppVocab):
    """A GGUF loaded in edgeinfer's PyTorch engine. Implements :class:`edgeinfer.backend.Backend`."""

    name = "torch"

    def __init__(self, path: str | os.PathLike, opts: LoadOptions | None = None, numerics: str | None = None):
        """Load ``path``. ``numerics``: "fast" (default) or "llama.cpp" (reproduce llama.cpp's CPU
        roundings for parity checks; slow, float32 weights); None reads ``$EDGEINFER_NUMERICS``."""
        opts = opts or LoadOptions()
        self.numerics = resolve_numerics(numerics)
        self.path = Path(path)
        self.header = validate_gguf(self.path)  # raises InvalidModelError before native code
        self.device = pick_device(opts.device)
        self.n_threads = opts.n_threads or default_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.n_threads)
        self.n_ctx = n_ctx = context_size(self.header, opts.n_ctx)
        t0 = time.perf_counter()
        self.model, self.report = load_model(self.path, self.device, n_ctx, self.header, self.numerics,
                                             offload_layers=opts.n_cpu_moe)
        # CPU decode: the whole step in one call of the compiled kernels where the model allows
        # (kernels/cpu_step.py); otherwise (and for prompts) the model's own forward
        self._step = None
        if self.device.type == "cpu":
            ggml_cpu.notice()  # once per process when the compiled kernels are missing
            if self.numerics == "fast":
                self._step = cpu_step.build(self.model)
        if self.device.type == "cpu":
            self._cpu_threads()
        self._vocab_llm = load_vocab_model(self.header)
        self.load_s = time.perf_counter() - t0
        self._init_vocab(self._vocab_llm)
        self.seed = opts.seed
        self._cancel = threading.Event()
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self._prompt_logits: tuple[list[int], torch.Tensor] | None = None  # the latest prompt and its logits
        self._reuse_prefix = not any(layer.attn.cache.ring for layer in self.model.layers)
        self.prompts = PromptBuilder(self.header.metadata, self._token_text, self.path.name, self.adds_bos())
        self.speculator = self._draft_vocab = None
        if opts.speculative is not None and opts.speculative.enabled:
            self._init_speculative(opts.speculative, n_ctx)
            self.load_s = time.perf_counter() - t0

    def _cpu_threads(self) -> None:
        """Where the compiled kernels hold (nearly) all the weights, they alone get ``n_threads``
        (their own pool) and torch's intra-op pool gets one: its small ops gain nothing from threads,
        and its OpenMP workers spinning beside the kernels' on the same cores cost 1.2-1.4x (measured:
        Gemma-4-MoE decode 19.7 -> 14.0 ms/token, default-model prefill 220 -> 287 tok/s at 2 threads).
        Float weights (F16/F32 files) keep torch's threads for their matmuls."""
        by_path: dict[str, int] = {}
        for m in self.model.modules():
            if isinstance(m, (QuantLinear, FusedLinear)) and m.path != "fused":  # experts are QuantLinears
                n = m.nbytes() if isinstance(m, QuantLinear) else m.packed.nbytes()
                by_path[m.path] = by_path.get(m.path, 0) + n
        total = sum(by_path.values())
        native = total > 0 and by_path.get("ggml-cpu", 0) >= 0.9 * total
        ggml_cpu.set_threads(self.n_threads)
        torch.set_num_threads(1 if native else self.n_threads)

    def _init_speculative(self, spec, n_ctx: int) -> None:
        """Speculative decoding (:mod:`edgeinfer.engine.speculative`): load the draft model, if any."""
        from edgeinfer.engine.speculative import Speculator

        draft = draft_step = None
        if spec.draft:
            draft, self._draft_vocab = Speculator.load_draft(spec.draft, self.header, self._vocab, self.device,
                                                             n_ctx, self.numerics)
            if self._step is not None:  # the target's steps are fused: so are the draft's, where it allows
                draft_step = cpu_step.build(draft)
        self.speculator = Speculator(self.model, spec, self.device, draft, draft_step, target_step=self._step)

    # -- info ----------------------------------------------------------------------------------
    def device_label(self) -> str:
        """e.g. ``cpu (2 threads)``, ``cuda:0 (NVIDIA GeForce RTX 4090)``, ``mps``."""
        if self.device.type == "cpu":
            return f"cpu ({self.n_threads} threads)"
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return self.device.type

    def info(self) -> ModelInfo:
        extra = {"threads": self.n_threads, "kernels": dict(self.report.paths), "numerics": self.numerics,
                 "decode_step": f"fused ({ggml_cpu.ISA})" if self._step is not None else "model forward",
                 "weight_bytes": self.report.weight_bytes, "offloaded_expert_bytes": self.report.offloaded_bytes}
        if self.speculator is not None:
            extra["speculative"] = f"{self.speculator.kind}, {self.speculator.n_draft} drafts"
        return self._model_info(self.device_label(), self.n_ctx, extra)

    def memory_bytes(self) -> dict:
        dev, peak = 0, _peak_rss()
        if self.device.type == "cuda":
            dev, peak = torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            dev = torch.mps.current_allocated_memory()
        return {"rss": process_memory(), "device": dev, "peak": peak}

    # -- generation ----------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Teacher-forced next-token logits for every position: [len(tokens), vocab] float32 (CPU)."""
        if len(tokens) > self.n_ctx:
            raise BackendError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        self._cached = []
        out = self.model(torch.tensor([list(tokens)], device=self.device), 0)
        return out[0].float().cpu()

    def _token_stream(self, tokens: list[int], sampler: Sampler) -> Iterator[int]:
        start = 0
        if self._reuse_prefix:
            while start < min(len(self._cached), len(tokens) - 1) and self._cached[start] == tokens[start]:
                start += 1
        history: list[int] = []  # like llama-cpp-python: the penalty window sees generated tokens only
        last = self._prompt_logits
        if self._reuse_prefix and last is not None and last[0] == tokens and self._cached[:len(tokens)] == tokens:
            # the same prompt again, its K/V still cached: its logits as computed then (recomputing
            # the last token alone rounds differently -- 8-bit activations -- and seeded sampling
            # would not repeat)
            logits = last[1]
        else:
            self._cached = tokens[:start]
            logits = self.model(torch.tensor([tokens[start:]], device=self.device), start, last_only=True)[0, -1]
            self._prompt_logits = (list(tokens), logits)
        self._cached = list(tokens)
        if self.speculator is not None:  # the prompt prefilled as above; the speculator goes on from its logits
            yield from self.speculator.tokens(tokens, self._cached, sampler, first_logits=logits)
            return
        pos = len(tokens)
        while True:
            tok = sampler(logits, history)
            yield tok
            history.append(tok)
            if pos >= self.n_ctx:
                return
            logits = self.decode(tok, pos)
            self._cached.append(tok)
            pos += 1

    def decode(self, tok: int, pos: int) -> torch.Tensor:
        """Next-token logits [vocab] after token ``tok`` at position ``pos`` (positions before it cached)."""
        if self._step is not None:
            return self._step(tok, pos)
        return self.model(torch.tensor([[tok]], device=self.device), pos, last_only=True)[0, -1]

    def generate(self, prompt: str | Sequence[Message], params: SamplingParams) -> Iterator[Event]:
        t0 = time.perf_counter()
        self._cancel.clear()
        tokens = self._prompt_tokens(prompt, self.n_ctx, params.think)
        sampler = Sampler(params, self.seed if params.seed is None else params.seed)
        gen = self._token_stream(tokens, sampler)
        for ev in self._stream(gen, tokens, params, self.n_ctx, t0):
            if isinstance(ev, DoneEvent) and self.speculator is not None:
                st = self.speculator.stats
                ev.timings.draft_tokens, ev.timings.draft_accepted, ev.timings.verify_steps = (
                    st.drafted, st.accepted, st.steps)
            yield ev

    def close(self) -> None:
        if getattr(self, "_draft_vocab", None) is not None:
            self._draft_vocab.close()
            self._draft_vocab = None
        self.speculator = None
        if getattr(self, "_vocab_llm", None) is not None:
            self._vocab_llm.close()
            self._vocab_llm = None
        self.model = None
