"""The backend Protocol every inference engine implements, and the values it exchanges.

A backend loads one GGUF file and turns a chat (a list of messages) or a raw prompt into a
stream of :class:`Event` objects. The CLI, the TUI and the benchmarks only ever talk to this
Protocol, so llama.cpp and the torch engine are interchangeable (``--backend``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Protocol, Sequence, Union, runtime_checkable

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class SpeculativeOptions:
    """Speculative decoding: cheap guesses of the next tokens, verified by the model in one batch.

    Attributes:
        draft: path of a draft GGUF (torch engine; same vocabulary as the model), or None.
        n_draft: tokens proposed per step (the model verifies them all in one forward pass).
        prompt_lookup: draft by n-gram lookup in the prompt and the text generated so far (no
            draft model; both backends). With ``draft`` set too, the draft model is used.
        ngram_max / ngram_min: longest / shortest suffix looked up (prompt lookup; shorter matches
            guess wrong too often to pay for the wider verification pass).
        p_min: the draft model stops proposing once its own top probability falls below this
            (llama.cpp's ``--draft-p-min``; 0 = always propose ``n_draft``).
    """

    draft: str | None = None
    n_draft: int = 8
    prompt_lookup: bool = False
    ngram_max: int = 5
    ngram_min: int = 3
    p_min: float = 0.5

    @property
    def enabled(self) -> bool:
        return bool(self.draft) or self.prompt_lookup


@dataclass
class LoadOptions:
    """How to load a model.

    Attributes:
        n_ctx: context size in tokens (0 = the model's training context, capped at 8192).
        n_threads: CPU threads (None = physical cores).
        n_gpu_layers: layers offloaded to the GPU (llama.cpp; -1 = all, 0 = none).
        device: ``auto``, ``cuda``, ``mps`` or ``cpu`` (torch engine).
        seed: default RNG seed for sampling.
        n_cpu_moe: keep the MoE expert weights of the first ``n_cpu_moe`` layers in host memory
            (llama.cpp's ``--n-cpu-moe``; :data:`ALL_LAYERS` = every layer, ``--cpu-moe``); the rest
            of the model stays on the GPU. Changes nothing on a CPU-only machine.
        speculative: speculative decoding (a draft model or prompt lookup), None = off.
    """

    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = -1
    device: str = "auto"
    seed: int = 0
    n_cpu_moe: int = 0
    speculative: SpeculativeOptions | None = None


#: ``LoadOptions.n_cpu_moe`` for "the experts of every layer" (``--cpu-moe``).
ALL_LAYERS = 1 << 30


@dataclass
class SamplingParams:
    """Sampling parameters shared by all backends (llama.cpp's defaults where it has them).

    ``temperature <= 0`` means greedy decoding. ``seed = None`` uses the load-time seed.
    ``think``: for chat templates with a reasoning switch (``enable_thinking``: Qwen3, Gemma 4),
    turn reasoning on or off; None leaves the template's default.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    max_tokens: int = 512
    stop: Sequence[str] = ()
    seed: int | None = None
    think: bool | None = None


@dataclass(frozen=True)
class Bound:
    """The valid values of one number: its type, ``lo`` (exclusive when ``lo_open``) and ``hi``;
    ``note`` says what special values mean (shown with range errors)."""

    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    note: str = ""

    def problem(self, v) -> str | None:
        """None if ``v`` is in range, else what is wrong, e.g. ``'must be >= -1'``."""
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return f"must be {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None and v > self.hi:
            return f"must be <= {self.hi}"
        return None

    def describe(self) -> str:
        """The range in words: ``'>= 0'``, ``'in (0, 1]'``, ``'any int'``."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"<= {self.hi:g}"
        return f"any {self.kind.__name__}"


# The valid range of each user-settable SamplingParams field: the one table that the CLI's argument
# types (edgeinfer.cli.args) and the TUI's settings screen both check against.
SAMPLING_BOUNDS: dict[str, Bound] = {
    "temperature": Bound(float, 0.0, note="0 = greedy"),
    "top_k": Bound(int, 0, note="0 = off"),
    "top_p": Bound(float, 0.0, 1.0, lo_open=True, note="1 = off"),
    "min_p": Bound(float, 0.0, 1.0, note="0 = off"),
    "repeat_penalty": Bound(float, 0.0, lo_open=True, note="1 = off"),
    "max_tokens": Bound(int, -1, note="-1 = until the context is full"),
    "seed": Bound(int),
}


@dataclass
class Timings:
    """Speed figures of one generation. Rates are tokens per second of wall time."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first generated token
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0  # generated tokens after the first / time after the first
    total_s: float = 0.0
    draft_tokens: int = 0  # speculative decoding: tokens proposed and verified
    draft_accepted: int = 0  # ... of which the model accepted this many
    verify_steps: int = 0  # ... in this many batched verification passes

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens (0 without speculative decoding)."""
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenEvent:
    """A piece of generated text (may be empty while a multi-byte character is incomplete)."""

    text: str
    token_id: int
    kind: Literal["token"] = "token"


@dataclass
class DoneEvent:
    """The end of a generation: why it stopped, the whole text and the timings."""

    finish_reason: Literal["stop", "length", "cancelled", "context"]
    text: str
    timings: Timings = field(default_factory=Timings)
    kind: Literal["done"] = "done"


Event = Union[TokenEvent, DoneEvent]


@dataclass
class ModelInfo:
    """What a loaded backend reports about itself (shown by ``--stats`` and the TUI)."""

    path: str
    name: str
    architecture: str
    backend: str
    device: str
    n_ctx: int
    n_ctx_train: int
    quant: str
    load_s: float = 0.0
    has_chat_template: bool = True
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A loaded model that can generate."""

    name: str

    def info(self) -> ModelInfo:
        """Describe the loaded model."""
        ...

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenize ``text`` exactly like llama.cpp (special tokens are parsed)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Turn token ids back into text."""
        ...

    def format_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's chat template (sandboxed)."""
        ...

    def generate(self, prompt: str | Sequence[Message], params: SamplingParams) -> Iterator[Event]:
        """Stream events for a raw prompt (``str``) or a chat (list of messages).

        The last event is always a :class:`DoneEvent`.
        """
        ...

    def cancel(self) -> None:
        """Ask a running :meth:`generate` (possibly in another thread) to stop soon."""
        ...

    def memory_bytes(self) -> dict:
        """Current memory use: ``{"rss": ..., "device": ...}`` in bytes (device may be 0)."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...
