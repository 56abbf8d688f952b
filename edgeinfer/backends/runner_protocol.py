"""The pipe protocol between edgeinfer and its llama.cpp runner process.

Each message is one frame: a 4-byte little-endian length, then that many bytes of UTF-8 JSON
(an object). JSON only: nothing on the pipe is ever unpickled or executed. Requests carry an
integer ``id`` that every event about them repeats, so one runner serves several sequences at
once and events of a cancelled request can be told apart and dropped.

Parent -> runner (``op``):

* ``load``: ``path``, ``n_ctx`` (per sequence), ``n_seq``, ``n_batch``, ``n_threads``,
  ``n_gpu_layers``, ``policy`` (``allow_amx``, ``allow_extra``), ``overrides``
  (``[[regex, buffer type], ...]``), optional ``cpu_report`` (``extra``: buffer type names;
  tests use it to fake a CPU).
* ``generate``: ``id``, ``tokens`` (the whole prompt), ``n_max`` (tokens to generate at most),
  ``sampling`` (:func:`sampling_dict`; optional ``grammar``: GBNF text with a ``root`` rule, and
  ``n_probs``: report log-probabilities, with that many top alternatives), optional ``spec``
  (prompt-lookup drafting: ``n_draft``, ``ngram_max``, ``ngram_min``; :func:`spec_dict`).
* ``cancel``: ``id``. Unknown or finished ids are ignored.
* ``exit``.

Runner -> parent (``ev``):

* ``ready``: ``pid``, ``n_ctx``, ``n_seq``, ``load_s``, ``buffers`` (buffer type -> bytes, from
  llama.cpp's load log), ``placement`` (one line), ``system_info``.
* ``tok``: ``id``, ``tok`` (one sampled token id); with ``n_probs`` also ``lp``:
  ``[logprob, [[token id, logprob], ...]]``; with ``spec``, also ``spec``: ``[drafted,
  accepted, verify steps]`` of the request so far.
* ``end``: ``id``, ``reason`` (``eog``, ``length``, ``context``, ``cancelled``), ``n_cached``
  (prompt tokens whose K/V were reused), ``n_gen``, ``prefill_s`` and ``decode_s`` (the runner's
  own clock: slot start to first token, first to last token), ``spec`` (as in ``tok``).
* ``error``: ``id`` (null for load errors), ``message`` (also a grammar that does not parse).
"""

from __future__ import annotations

import json
import os
import struct
import threading

MAX_FRAME = 64 * 2**20  # a prompt of a million tokens is ~8 MB of JSON; anything past this is garbage
_LEN = struct.Struct("<I")


class ProtocolError(Exception):
    """The other end sent something that is not a frame of this protocol."""


def sampling_dict(params) -> dict:
    """The fields of :class:`~edgeinfer.backend.SamplingParams` the runner's sampler chain uses."""
    return {"temperature": float(params.temperature), "top_k": int(params.top_k), "top_p": float(params.top_p),
            "min_p": float(params.min_p), "repeat_penalty": float(params.repeat_penalty),
            "repeat_last_n": int(params.repeat_last_n),
            "presence_penalty": float(getattr(params, "presence_penalty", 0.0) or 0.0),
            "frequency_penalty": float(getattr(params, "frequency_penalty", 0.0) or 0.0)}


def spec_dict(opts) -> dict | None:
    """The prompt-lookup fields of :class:`~edgeinfer.backend.SpeculativeOptions` (None when off)."""
    if opts is None or not opts.prompt_lookup:
        return None
    return {"n_draft": int(opts.n_draft), "ngram_max": int(opts.ngram_max), "ngram_min": int(opts.ngram_min)}


class FrameWriter:
    """Writes frames to a file descriptor; safe to share between threads."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, msg: dict) -> None:
        """Write one frame (raises ``OSError``, e.g. ``BrokenPipeError`` when the other end is gone)."""
        data = json.dumps(msg, separators=(",", ":")).encode("utf-8")
        buf = _LEN.pack(len(data)) + data
        with self._lock:
            view = memoryview(buf)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]


class FrameReader:
    """Reads frames from a file descriptor (one reader thread); buffered, so a burst of frames
    costs few system calls."""

    def __init__(self, fd: int):
        self._f = os.fdopen(fd, "rb", buffering=1 << 16, closefd=False)

    def _exact(self, n: int) -> bytes | None:
        b = self._f.read(n)  # a BufferedReader reads until n bytes or end of file
        if not b:
            return None
        if len(b) < n:
            raise ProtocolError(f"the pipe closed inside a frame ({len(b)} of {n} bytes)")
        return b

    def recv(self) -> dict | None:
        """The next message, or None at end of file.

        Raises:
            ProtocolError: a frame that is too long, not JSON, or not an object.
        """
        head = self._exact(_LEN.size)
        if head is None:
            return None
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes (limit {MAX_FRAME})")
        body = self._exact(n) if n else b""
        if body is None:
            raise ProtocolError("the pipe closed after a frame header")
        try:
            msg = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"frame is not UTF-8 JSON ({e})") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"frame is a JSON {type(msg).__name__}, not an object")
        return msg
