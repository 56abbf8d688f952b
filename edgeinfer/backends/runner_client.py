"""The parent's side of the llama.cpp runner: start it, send requests, read events, notice its death.

:class:`RunnerProcess` starts ``python -m edgeinfer.backends.llama_runner`` with three pipes:
frames (:mod:`edgeinfer.backends.runner_protocol`) on stdin/stdout, and stderr, whose last lines
are kept (llama.cpp's warnings, a ``GGML_ASSERT``, the Python stack faulthandler prints on a
crash) and logged at debug level -- never written to the terminal, which may belong to the TUI.

One reader thread routes events to a queue per request id. When the pipe closes the runner is
gone: every waiting request gets :class:`RunnerDied` with the exit status in words
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


class RunnerProcess:
    """One runner process. Thread-safe: requests may be submitted and read from several threads."""

    def __init__(self, load: dict, env: dict | None = None):
        """Start the runner and send it ``load`` (see runner_protocol); :meth:`wait_ready` waits for the answer."""
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.backends.llama_runner"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0, close_fds=True, env=env)
        self.pid = self.proc.pid
        self._writer = FrameWriter(self.proc.stdin.fileno())
        self._reader = FrameReader(self.proc.stdout.fileno())
        self._queues: dict[int, queue.SimpleQueue] = {}
        self._qlock = threading.Lock()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self.stderr_tail: deque[str] = deque(maxlen=60)
        self.dead = False
        self.death: RunnerDied | None = None
        self.info: dict = {}
        self._stderr_thread = threading.Thread(target=self._stderr_loop, name=f"runner-{self.pid}-stderr",
                                               daemon=True)
        self._stderr_thread.start()
        threading.Thread(target=self._read_loop, name=f"runner-{self.pid}-events", daemon=True).start()
        self._send({"op": "load", **load})

    # -- threads ---------------------------------------------------------------------------------
    def _stderr_loop(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.debug("runner %d: %s", self.pid, line)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._reader.recv()
                if msg is None:
                    break
                rid = msg.get("id")
                if msg.get("ev") == "ready" or (msg.get("ev") == "error" and rid is None):
                    self._ready.put(msg)
                    continue
                with self._qlock:
                    q = self._queues.get(rid)
                if q is not None:
                    q.put(msg)  # events of forgotten (cancelled) requests are dropped
        except (ProtocolError, OSError) as e:
            log.warning("runner %d: %s; stopping it", self.pid, e)
            self.proc.kill()
        self._on_death()

    def _on_death(self) -> None:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._stderr_thread.join(timeout=2)
        detail = next((ln.strip() for ln in reversed(self.stderr_tail) if _interesting(ln)), "")
        self.death = RunnerDied(exit_reason(rc), detail)
        self.dead = True
        self._ready.put(_DEAD)
        with self._qlock:
            for q in self._queues.values():
                q.put(_DEAD)

    # -- requests --------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        try:
            self._writer.send(msg)
        except OSError:
            pass  # the runner is gone; the reader thread reports how

    def wait_ready(self, timeout: float | None = None) -> dict:
        """The runner's ``ready`` event.

        Raises:
            RunnerLoadError: the runner could not load the model (its message).
            RunnerDied: it died while loading.
        """
        try:
            msg = self._ready.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RunnerDied(f"no answer within {timeout:.0f} s") from None
        if msg is _DEAD:
            raise self.death
        if msg.get("ev") == "error":
            raise RunnerLoadError(msg.get("message", "unknown error"))
        self.info = msg
        return msg

    def submit(self, tokens: list[int], n_max: int, sampling: dict, seed: int) -> int:
        """Start a generation; returns its request id (read it with :meth:`events`)."""
        rid = next(self._ids)
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._qlock:
            self._queues[rid] = q
            if self.dead:
                q.put(_DEAD)
        self._send({"op": "generate", "id": rid, "tokens": tokens, "n_max": n_max, "sampling": sampling,
                    "seed": seed})
        return rid

    def events(self, rid: int) -> Iterator[dict]:
        """The ``tok`` events of request ``rid``, then its ``end`` or ``error`` event; raises :class:`RunnerDied`."""
        q = self._queues[rid]
        while True:
            msg = q.get()
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
        with self._qlock:
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
