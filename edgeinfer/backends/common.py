"""Pieces every backend shares: prompt building, thread count, memory, the llama.cpp vocab."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Sequence

from edgeinfer.backend import Message, ModelInfo
from edgeinfer.errors import BackendError
from edgeinfer.generation import stream_events
from edgeinfer.chat_template import ChatTemplate, template_from_gguf_metadata
from edgeinfer.gguf_check import GGUFFile
from edgeinfer.inspect_gguf import quant_label


def default_threads() -> int:
    """Physical cores (llama.cpp is fastest with one thread per physical core)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return max(1, n or os.cpu_count() or 1)


def process_memory() -> int:
    """Resident set size of this process in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def context_size(h: GGUFFile, requested: int) -> int:
    """The context to allocate: ``requested`` (0 = the training context, capped at 8192), never past training."""
    n_ctx_train = int(h.arch_key("{arch}.context_length", 0) or 0)
    n_ctx = requested or min(n_ctx_train or 4096, 8192)
    return min(n_ctx, n_ctx_train) if n_ctx_train else n_ctx


@contextlib.contextmanager
def vocab_only_log_filter():
    """Silence llama.cpp's spurious ERROR line while a ``vocab_only`` model is loaded.

    A vocab-only load has no hyperparameters, so llama.cpp logs
    ``n_ctx_seq (...) > n_ctx_train (0) -- possible training context overflow`` at ERROR level,
    which llama-cpp-python prints even with ``verbose=False``. Other messages pass through to
    llama-cpp-python's own callback, which is restored afterwards.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    def _filter(level, text, user_data):
        if b"n_ctx_train (0)" not in (text or b""):
            _logger.llama_log_callback(level, text, user_data)

    cb = llama_cpp.llama_log_callback(_filter)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _stock_metadata_copy(h: GGUFFile, out_dir: str) -> str:
    """A tensor-less GGUF with ``h``'s metadata as a stock file of its architecture has it (the
    ``edgeinfer-`` prefix of a ``--torch-only`` file removed), for llama.cpp's ``vocab_only`` loader,
    which refuses architectures it does not know."""
    import gguf

    arch = h.architecture
    base, _ = h.stock_view()
    reader = gguf.GGUFReader(h.path)
    w = gguf.GGUFWriter(os.path.join(out_dir, "vocab.gguf"), base)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = base + name[len(arch):] if name.startswith(arch + ".") else name
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[1]) if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return os.path.join(out_dir, "vocab.gguf")


def load_vocab_model(h: GGUFFile):
    """llama.cpp's tokenizer for ``h`` (a ``vocab_only`` ``llama_cpp.Llama``: no weights are read).

    Raises:
        BackendError: llama.cpp cannot read the vocabulary.
    """
    import tempfile

    import llama_cpp

    try:
        with vocab_only_log_filter():
            if not h.torch_only:
                return llama_cpp.Llama(model_path=str(h.path), vocab_only=True, verbose=False)
            with tempfile.TemporaryDirectory(prefix="edgeinfer-vocab-") as d:
                return llama_cpp.Llama(model_path=_stock_metadata_copy(h, d), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise BackendError(f"{h.path}: llama.cpp could not load the vocabulary ({e})") from None


class LlamaCppVocab:
    """What both backends share: llama.cpp's tokenizer (a full or ``vocab_only`` ``llama_cpp.Llama``),
    prompt rendering + checks, the event stream and :class:`ModelInfo`.

    Subclasses call :meth:`_init_vocab` once the Llama is loaded and set ``self.prompts`` (a
    :class:`PromptBuilder`), ``self.header``, ``self.path``, ``self.load_s`` and ``self._cancel``.
    """

    def _init_vocab(self, llm) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self._tok_llm = llm
        self._vocab = llm._model.vocab
        self._pieces: dict[int, bytes] = {}

    def _token_text(self, tok: int) -> str:
        return self.piece(tok).decode("utf-8", errors="replace")

    def adds_bos(self) -> bool:
        """Whether tokenizing with ``add_special`` prepends BOS: llama.cpp's vocab decides
        (``tokenizer.ggml.add_bos_token`` if the GGUF has it, else llama.cpp's default for the
        tokenizer model and pre-tokenizer: True for SentencePiece ``llama``, False for most
        ``gpt2`` BPE vocabularies; see ``llama_vocab::impl::load`` in src/llama-vocab.cpp)."""
        return bool(self._lc.llama_vocab_get_add_bos(self._vocab))

    def bos_token_id(self) -> int:
        """The vocabulary's BOS token id (-1 when it has none)."""
        return int(self._lc.llama_vocab_bos(self._vocab))

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self._tok_llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(int(t)) for t in tokens).decode("utf-8", errors="replace")

    def piece(self, tok: int) -> bytes:
        """The raw bytes of one token (special tokens rendered), cached.

        (llama-cpp-python's own ``token_to_piece`` returns a fixed 32-byte, zero-padded buffer.)
        """
        b = self._pieces.get(tok)
        if b is None:
            import ctypes

            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self._lc.llama_token_to_piece(self._vocab, tok, buf, size, 0, True)
                if n >= 0:
                    b = buf.raw[:n]
                    break
                size = -n
            self._pieces[tok] = b
        return b

    def is_eog(self, tok: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, tok))

    def format_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self.prompts.template.render(messages, add_generation_prompt)

    # -- shared by both backends' generate() / info(); they set self.header, self.path, self.load_s
    def _prompt_tokens(self, prompt, n_ctx: int, think: bool | None = None) -> list[int]:
        """Render (chat) and tokenize ``prompt``; refuse an empty prompt or one that fills the context."""
        text, add_special = self.prompts.prompt_text(prompt, think)
        tokens = self.tokenize(text, add_special=add_special)
        if not tokens:
            raise BackendError("the prompt is empty after tokenization; give some text")
        if len(tokens) >= n_ctx:
            raise BackendError(f"prompt is {len(tokens)} tokens but the context holds {n_ctx}; "
                               "raise --ctx or shorten the prompt")
        return tokens

    def _stream(self, gen, tokens: list[int], params, n_ctx: int, t0: float):
        """:func:`edgeinfer.generation.stream_events` over the token generator ``gen``, closing it at the end."""
        try:
            yield from stream_events(gen, piece=self.piece, is_eog=self.is_eog, params=params,
                                     prompt_tokens=len(tokens), n_ctx_left=n_ctx - len(tokens),
                                     cancelled=self._cancel.is_set, t_start=t0)
        finally:
            gen.close()

    def _model_info(self, device: str, n_ctx: int, extra: dict) -> ModelInfo:
        h = self.header
        return ModelInfo(
            path=str(self.path),
            name=str(h.metadata.get("general.name") or self.path.stem),
            architecture=h.architecture,
            backend=self.name,
            device=device,
            n_ctx=n_ctx,
            n_ctx_train=int(h.arch_key("{arch}.context_length", 0) or 0),
            quant=quant_label(h),
            load_s=self.load_s,
            has_chat_template=not self.prompts.template.is_fallback,
            extra=extra,
        )


class PromptBuilder:
    """Turn a chat or a raw prompt into the text to tokenize, the way llama.cpp does.

    A chat is rendered with the GGUF's template (sandboxed). When the tokenizer adds BOS itself
    (``add_bos``: pass :meth:`LlamaCppVocab.adds_bos`, llama.cpp's rule, which has defaults per
    tokenizer model when the GGUF lacks ``tokenizer.ggml.add_bos_token``) and the rendered text
    starts with the BOS string, that leading BOS is removed so it is not doubled (llama.cpp's
    ``common_chat_templates_apply``).
    """

    def __init__(self, metadata: dict, token_text: Callable[[int], str], name: str, add_bos: bool):
        self.template: ChatTemplate = template_from_gguf_metadata(metadata, token_text, name)
        self.add_bos = add_bos

    def prompt_text(self, prompt: str | Sequence[Message], think: bool | None = None) -> tuple[str, bool]:
        """Return ``(text, add_special)`` for the tokenizer; ``think`` sets the template's ``enable_thinking``."""
        if isinstance(prompt, str):
            return prompt, True
        text = self.template.render(prompt, add_generation_prompt=True,
                                    extra=None if think is None else {"enable_thinking": think})
        bos = self.template.bos_token
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text, True
