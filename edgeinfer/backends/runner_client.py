"""The parent's side of the llama.cpp runner: start it, send requests, read events, notice its death.

:class:`RunnerProcess` starts ``python -m edgeinfer.backends.llama_runner`` with three pipes:
frames (:mod:`edgeinfer.backends.runner_protocol`) on stdin/stdout, and stderr, whose last lines
are kept (llama.cpp's warnings, a ``GGML_ASSERT``, the Python stack faulthandler prints on a
crash) and logged at debug level -- never written to the terminal, which may belong to the TUI.

Events go to a queue per request id. When the pipe closes the runner is gone: every waiting
request gets :class:`RunnerDied` with the exit status in words
(``SIGSEGV (segmentation fault)``, ``SIGKILL (killed; out of memory?)``, ``exit code 1``).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from typing import Iterator

from edgeinfer.backends.runner_protocol import FrameReader, FrameWriter, ProtocolError

log = logging.getLogger(__name__)

_DEAD = {"ev": "_dead"}  # put into every queue when the runner is gone


class RunnerDied(Exception):
    """The runner process exited while a request waited; ``reason`` says how, in words."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(reason + (f": {detail}" if detail else ""))


class RunnerLoadError(Exception):
    """The runner answered the load request with an error (the file, the context size...)."""


def exit_reason(rc: int | None) -> str:
    """Words for a return code: ``SIGSEGV (segmentation fault)``, ``exit code 3``..."""
    if rc is None:
        return "stopped responding"
    if rc < 0:
        try:
            sig = signal.Signals(-rc)
        except ValueError:
            return f"signal {-rc}"
        what = signal.strsignal(sig) or ""
        if sig == signal.SIGKILL:
            what = "killed; out of memory?"
        return f"{sig.name} ({what.lower()})" if what else sig.name
    if sys.platform == "win32" and rc == 0xC0000005:
        return "access violation"
    return f"exit code {rc}"


_NOT_DETAIL = ("Fatal Python error", "File ", "Thread 0x", "Current thread", "Extension modules", "<no Python frame>")


def _interesting(line: str) -> bool:
    """A stderr line worth quoting in the crash message (llama.cpp's, not faulthandler's stack dump)."""
    s = line.strip()
    return not s.startswith(_NOT_DETAIL) and any(k in s for k in ("GGML_ASSERT", "GGML_ABORT", "error", "failed"))


_READY = 0  # the queue of the load answer (request ids start at 1)


class RunnerProcess:
    """One runner process. Thread-safe: requests may be submitted and read from several threads.

    There is no reader thread: a thread waiting for an event reads the pipe itself when no other
    thread is reading, and hands events of other requests to their queues (leader/follower). A
    single generation thus costs one wake-up per token in this process.
    """

    def __init__(self, load: dict, env: dict | None = None, load_timeout: float | None = None):
        """Start the runner and send it ``load`` (see runner_protocol); :meth:`wait_ready` waits for the answer.

        ``load_timeout``: kill the runner if it has not answered the load request by then.
        """
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.backends.llama_runner"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, close_fds=True, env=env)
        self.pid = self.proc.pid
        self._writer = FrameWriter(self.proc.stdin.fileno())
        self._reader = FrameReader(self.proc.stdout.fileno())
        self._queues: dict[int, queue.SimpleQueue] = {_READY: queue.SimpleQueue()}
        self._cv = threading.Condition()
        self._reading = False
        self._ids = itertools.count(1)
        self.stderr_tail: deque[str] = deque(maxlen=60)
        self.dead = False
        self.death: RunnerDied | None = None
        self.info: dict = {}
        self._timed_out = None
        self._watchdog = None
        if load_timeout:
            self._watchdog = threading.Timer(load_timeout, self._load_timed_out, (load_timeout,))
            self._watchdog.daemon = True
            self._watchdog.start()
        self._stderr_thread = threading.Thread(target=self._stderr_loop, name=f"runner-{self.pid}-stderr",
                                               daemon=True)
        self._stderr_thread.start()
        self._send({"op": "load", **load})

    # -- reading ---------------------------------------------------------------------------------
    def _stderr_loop(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.debug("runner %d: %s", self.pid, line)

    def _load_timed_out(self, seconds: float) -> None:
        if not self.info and self.proc.poll() is None:
            self._timed_out = f"no answer to the load request within {seconds:.0f} s"
            self.proc.kill()

    def _next(self, key: int) -> dict:
        """The next message for queue ``key``, reading the pipe ourselves if no other thread is."""
        q = self._queues[key]
        while True:
            try:
                return q.get_nowait()
            except queue.Empty:
                pass
            with self._cv:
                if self._reading or not q.empty():
                    if self._reading:
                        self._cv.wait()  # the reader delivers to our queue, or stops reading
                    continue
                self._reading = True
            try:
                self._read_one()
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()

    def _read_one(self) -> None:
        """Read one frame and put it into its request's queue (events of forgotten requests are dropped)."""
        if self.dead:
            return
        try:
            msg = self._reader.recv()
        except (ProtocolError, OSError) as e:
            log.warning("runner %d: %s; stopping it", self.pid, e)
            self.proc.kill()
            msg = None
        if msg is None:
            self._on_death()
            return
        rid = msg.get("id")
        if msg.get("ev") == "ready" or (msg.get("ev") == "error" and rid is None):
            rid = _READY
        q = self._queues.get(rid)
        if q is not None:
            q.put(msg)

    def _on_death(self) -> None:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._stderr_thread.join(timeout=2)
        detail = next((ln.strip() for ln in reversed(self.stderr_tail) if _interesting(ln)), "")
        self.death = RunnerDied(self._timed_out or exit_reason(rc), detail)
        self.dead = True
        for q in list(self._queues.values()):
            q.put(_DEAD)

    @property
    def exited(self) -> bool:
        """True once the runner process is gone (noticed or not)."""
        return self.dead or self.proc.poll() is not None

    # -- requests --------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        try:
            self._writer.send(msg)
        except OSError:
            pass  # the runner is gone; reading says how

    def wait_ready(self) -> dict:
        """The runner's ``ready`` event.

        Raises:
            RunnerLoadError: the runner could not load the model (its message).
            RunnerDied: it died (or timed out) while loading.
        """
        msg = self._next(_READY)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if msg is _DEAD:
            raise self.death
        if msg.get("ev") == "error":
            raise RunnerLoadError(msg.get("message", "unknown error"))
        self.info = msg
        return msg

    def submit(self, tokens: list[int], n_max: int, sampling: dict, seed: int, spec: dict | None = None) -> int:
        """Start a generation; returns its request id (read it with :meth:`events`). ``spec``:
        prompt-lookup drafting (:func:`~edgeinfer.backends.runner_protocol.spec_dict`)."""
        rid = next(self._ids)
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._queues[rid] = q
        if self.dead:
            q.put(_DEAD)
        msg = {"op": "generate", "id": rid, "tokens": tokens, "n_max": n_max, "sampling": sampling, "seed": seed}
        if spec:
            msg["spec"] = spec
        self._send(msg)
        return rid

    def events(self, rid: int) -> Iterator[dict]:
        """The ``tok`` events of request ``rid``, then its ``end`` or ``error`` event; raises :class:`RunnerDied`."""
        while True:
            msg = self._next(rid)
            if msg is _DEAD:
                raise self.death
            yield msg
            if msg.get("ev") in ("end", "error"):
                return

    def cancel(self, rid: int) -> None:
        """Ask the runner to stop request ``rid`` (its ``end`` event follows)."""
        if not self.dead:
            self._send({"op": "cancel", "id": rid})

    def forget(self, rid: int) -> None:
        """Drop request ``rid``'s queue; later events for it are discarded."""
        self._queues.pop(rid, None)

    # -- the process -----------------------------------------------------------------------------
    def memory(self) -> dict:
        """``{"rss": ..., "peak": ...}`` of the runner in bytes (zeros once it is gone)."""
        if self.dead:
            return {"rss": 0, "peak": 0}
        import psutil

        try:
            rss = psutil.Process(self.pid).memory_info().rss
        except psutil.Error:  # it is exiting
            return {"rss": 0, "peak": 0}
        peak = 0
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        except OSError:
            pass
        return {"rss": rss, "peak": peak}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the runner to exit; kill it if it has not after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self._send({"op": "exit"})
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("runner %d did not exit; killing it", self.pid)
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def child_env() -> dict:
    """The runner's environment: ours, with Python's output unbuffered (its stderr is our log)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
