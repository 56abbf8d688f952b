"""The llama.cpp runner: a child process that owns the model, so a native crash never takes edgeinfer down.

Started by :class:`edgeinfer.backends.runner_client.RunnerProcess` as
``python -m edgeinfer.backends.llama_runner``; it speaks :mod:`edgeinfer.backends.runner_protocol`
on its stdin/stdout (the original stdout is kept for frames and fd 1 is pointed at stderr, so
nothing native can corrupt the pipe). The parent keeps the tokenizer and chat template (a
``vocab_only`` model) and never runs a matrix multiply; everything that does runs here:

* load: the buffer-type plan (:mod:`edgeinfer.backends.llama_placement`), then
  ``llama_model_load_from_file`` and ``llama_init_from_model`` with ``n_seq`` sequences;
  llama.cpp's load log is captured to report which buffer types hold the weights;
* generate / cancel: requests go to :class:`~edgeinfer.backends.llama_slots.SlotEngine`, which
  batches all running sequences into one decode per step; every sampled token is sent at once.

SIGINT is ignored (ctrl+c belongs to the parent, which stops the runner itself), and the runner
exits when its stdin closes, so it never outlives edgeinfer.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import queue
import re
import signal
import sys
import threading
import time

from edgeinfer.backends.runner_protocol import FrameReader, FrameWriter, ProtocolError

_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")
_LEVEL_WARN = 3  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


class LlamaLog:
    """llama.cpp's log callback: keeps every line while loading, then passes warnings and errors to stderr."""

    def __init__(self, lc):
        self.lc = lc
        self.capture: list[str] | None = []
        self._cont_level = 0
        self._cb = lc.llama_log_callback(self._on_log)  # keep a reference: llama.cpp calls it later
        lc.llama_log_set(self._cb, ctypes.c_void_p(0))

    def _on_log(self, level, text, user_data):
        s = (text or b"").decode("utf-8", errors="replace")
        if level != 5:
            self._cont_level = level
        if self.capture is not None:
            self.capture.append(s)
        if self._cont_level >= _LEVEL_WARN:
            sys.stderr.write(s)
            sys.stderr.flush()

    def stop_capture(self) -> str:
        text, self.capture = "".join(self.capture or []), None
        return text


def buffer_sizes(load_log: str) -> dict[str, int]:
    """Bytes per buffer type from llama.cpp's ``load_tensors: CPU_REPACK model buffer size = 56.95 MiB`` lines."""
    out: dict[str, int] = {}
    for name, mib in _BUFFER_LINE.findall(load_log):
        out[name] = out.get(name, 0) + int(float(mib) * 2**20)
    return out


class Runner:
    """The loaded model and its :class:`SlotEngine`."""

    def __init__(self, msg: dict, writer: FrameWriter):
        import llama_cpp as lc

        from edgeinfer.backends.llama_placement import (BufferPolicy, CpuReport, TensorOverride, apply_placement,
                                                        placement_for)
        from edgeinfer.backends.llama_slots import SlotEngine

        t0 = time.perf_counter()
        self.lc, self.writer = lc, writer
        self.log = LlamaLog(lc)
        path = msg["path"]
        n_gpu = int(msg.get("n_gpu_layers", 0))
        fake = msg.get("cpu_report")
        report = CpuReport(tuple(fake["extra"]), dict(fake.get("features", {})), bool(fake.get("gpu"))) if fake \
            else CpuReport.query()
        self.placement = placement_for(path, n_gpu, [TensorOverride(p, b) for p, b in msg.get("overrides", [])],
                                       BufferPolicy(**msg.get("policy", {})), report)
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = n_gpu
        keep = apply_placement(mp, self.placement)
        self.model = lc.llama_model_load_from_file(path.encode("utf-8"), mp)
        del keep
        if not self.model:
            raise LoadError(self._log_error())
        n_seq = max(1, int(msg.get("n_seq", 1)))
        n_ctx = int(msg["n_ctx"])
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = cp.n_ubatch = min(int(msg.get("n_batch", 512)), cp.n_ctx)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = int(msg["n_threads"])
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama does by default
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise LoadError(f"no context of {n_ctx} x {n_seq} tokens: {self._log_error()}")
        self.n_ctx_seq = int(lc.llama_n_ctx_seq(self.ctx))
        self.engine = SlotEngine(lc, self.model, self.ctx, n_seq, cp.n_batch, self.n_ctx_seq, writer.send)
        load_log = self.log.stop_capture()
        writer.send({"ev": "ready", "pid": os.getpid(), "n_ctx": self.n_ctx_seq, "n_seq": n_seq,
                     "load_s": time.perf_counter() - t0, "buffers": buffer_sizes(load_log),
                     "placement": self.placement.describe(), "excluded": list(self.placement.excluded),
                     "system_info": lc.llama_print_system_info().decode("utf-8", errors="replace").strip()})

    def _log_error(self) -> str:
        """The first line of llama.cpp's log that says what went wrong (e.g. ``missing tensor 'blk.30...'``)."""
        lines = [ln.strip() for ln in (self.log.capture or [])]
        for key in ("error loading model", "error", "failed"):
            hit = next((ln for ln in lines if key in ln.lower()), None)
            if hit:
                return hit.split("error loading model: ", 1)[-1]
        return "llama.cpp gave no reason (run with --debug to see its log)"

    def handle(self, msg: dict) -> bool:
        """Act on one request; False means exit."""
        from edgeinfer.backends.llama_slots import Request

        op = msg.get("op")
        if op == "generate":
            self.engine.submit(Request(int(msg["id"]), [int(t) for t in msg["tokens"]], int(msg["n_max"]),
                                       msg["sampling"], int(msg.get("seed", 0)), msg.get("spec")))
        elif op == "cancel":
            self.engine.cancel(int(msg["id"]))
        elif op == "exit":
            return False
        else:
            self.writer.send({"ev": "error", "id": msg.get("id"), "message": f"unknown op {op!r}"})
        return True

    def serve(self, inbox: "queue.Queue[dict]") -> None:
        while True:
            if self.engine.busy:
                try:
                    while True:  # everything that arrived during the last step, then the next step
                        if not self.handle(inbox.get_nowait()):
                            return
                except queue.Empty:
                    pass
                self.engine.step()
            elif not self.handle(inbox.get()):
                return

    def close(self) -> None:
        self.engine.close()
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


class LoadError(Exception):
    """The model or its context could not be created (reported to the parent, then exit 1)."""


def _read_loop(reader: FrameReader, inbox: "queue.Queue[dict]") -> None:
    try:
        while True:
            msg = reader.recv()
            if msg is None:
                break
            inbox.put(msg)
    except (ProtocolError, OSError) as e:
        print(f"llama runner: {e}", file=sys.stderr)
    inbox.put({"op": "exit"})  # the parent closed the pipe (or died): stop


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable(file=sys.stderr)  # a native crash leaves the Python stack in the parent's log
    out_fd = os.dup(1)
    os.dup2(2, 1)
    writer, reader = FrameWriter(out_fd), FrameReader(0)
    inbox: queue.Queue[dict] = queue.Queue()
    threading.Thread(target=_read_loop, args=(reader, inbox), name="runner-reader", daemon=True).start()
    first = inbox.get()
    if first.get("op") != "load":
        return 0
    from edgeinfer.errors import EdgeinferError

    try:
        runner = Runner(first, writer)
    except (LoadError, EdgeinferError, KeyError, ValueError, OSError) as e:
        try:
            writer.send({"ev": "error", "id": None, "message": str(e)})
        except OSError:
            pass
        return 1
    try:
        runner.serve(inbox)
    except (BrokenPipeError, OSError):
        return 0
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
