"""``edgeinfer serve`` started by a test on a free loopback port, and ``edgeinfer run`` as the oracle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque

import psutil

_LISTEN = re.compile(r"on http://127\.0\.0\.1:(\d+)")


def env(tmp_path) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), EDGEINFER_MODELS_DIR=str(tmp_path / "models"),
             PYTHONUNBUFFERED="1")
    return e


class Served:
    """A running ``edgeinfer serve --port 0 ...``; ``url`` once it listens; its stderr is kept."""

    def __init__(self, args: list[str], tmp_path, timeout: float = 120):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer", "serve", "--port", "0", "--threads", "2",
                                      *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(tmp_path))
        self.log: deque[str] = deque(maxlen=400)
        port = None
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            line = self.proc.stderr.readline().decode("utf-8", "replace")
            if not line:
                break
            self.log.append(line)
            m = _LISTEN.search(line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            self.proc.kill()
            raise AssertionError("edgeinfer serve did not start:\n" + "".join(self.log))
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            self.log.append(raw.decode("utf-8", "replace"))

    def rss(self) -> int:
        """RSS of the server and its runner processes together."""
        p = psutil.Process(self.proc.pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total

    def runner(self, timeout: float = 60) -> psutil.Process:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            for c in psutil.Process(self.proc.pid).children():
                try:
                    if "edgeinfer.backends.llama_runner" in " ".join(c.cmdline()):
                        return c
                except psutil.Error:
                    pass
            time.sleep(0.05)
        raise AssertionError("no runner process appeared")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_cli(tmp_path, backend: str, prompt: str, n: int, raw: bool = False) -> dict:
    """``edgeinfer run --json`` greedy: the oracle the server's greedy output must equal."""
    cmd = [sys.executable, "-m", "edgeinfer", "run", "-p", prompt, "--temp", "0", "-n", str(n), "--backend", backend,
           "--threads", "2", "--ctx", "1024", "--json"] + (["--raw"] if raw else [])
    out = subprocess.run(cmd, capture_output=True, env=env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)
