"""Proof that a native crash never takes edgeinfer down: SIGSEGV sent to the llama.cpp runner mid-reply.

* the CLI prints one line (what crashed, the signal, the model, what to try) and exits 2;
* the chat app shows the error in the conversation, keeps every completed message in SQLite,
  writes nothing to the terminal, and answers the next message with a new runner.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from _tui_fake import run_async
from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.storage import ChatStore
from edgeinfer.tui import app as app_module
from edgeinfer.tui.app import ChatApp


def _runner_of(pid: int, timeout: float = 60) -> psutil.Process:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        for c in psutil.Process(pid).children():
            try:
                if "edgeinfer.backends.llama_runner" in " ".join(c.cmdline()):
                    return c
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError("no runner process appeared")


def test_cli_exits_2_with_one_line_when_the_runner_segfaults(cli_env):
    p = subprocess.Popen([sys.executable, "-m", "edgeinfer", "run", "-p", "Count from 1 to 1000, one number per line.",
                          "--temp", "0", "-n", "1500", "--threads", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env)
    try:
        runner = _runner_of(p.pid)
        first = p.stdout.read(1)  # the answer has started streaming
        os.kill(runner.pid, signal.SIGSEGV)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = err.decode()
    print("stdout:", (first + out)[:80], "...\nstderr:", err)
    assert first and p.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "Fatal Python error" not in err
    line = lines[0]
    assert line.startswith("edgeinfer: error: llama.cpp crashed with SIGSEGV (segmentation fault) while generating")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in line and "--backend torch" in line and "EDGEINFER_LLAMA_REPACK=0" in line


class CrashApp(ChatApp):
    CSS_PATH = str(Path(app_module.__file__).with_name(ChatApp.CSS_PATH))


async def _wait(pilot, cond, what, timeout=120.0):
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    await pilot.pause(0.05)


async def _send(pilot, app, text):
    app.prompt.load_text(text)
    await pilot.press("enter")
    await _wait(pilot, lambda: app.generating, "the reply to start")


@run_async
async def test_chat_app_survives_a_runner_segfault(tmp_path, default_gguf, capfd):
    db = tmp_path / "chat.sqlite3"
    app = CrashApp(store=ChatStore(db), model=str(default_gguf), backend="llama.cpp",
                   params=SamplingParams(temperature=0.0, max_tokens=300),
                   load_options=LoadOptions(n_ctx=2048, n_threads=2, seed=0), memory_poll_s=0.2)
    async with app.run_test(size=(100, 30)) as pilot:
        await _wait(pilot, lambda: app.host.backend is not None, "the model to load")
        await _send(pilot, app, "Name three primary colors.")
        await _wait(pilot, lambda: not app.generating, "the first reply")
        first_reply = app.chat.messages()[-1].text
        pid = app.host.backend.runner_pid
        await _send(pilot, app, "Write a very long story about a dragon who bakes bread.")
        await _wait(pilot, lambda: app._n_tokens >= 3, "the second reply to stream")
        os.kill(pid, signal.SIGSEGV)
        await _wait(pilot, lambda: not app.generating, "the crash to be reported")
        notices = " ".join(str(n.render()) for n in app.chat.query(".notice"))
        status = app.status.render()
        print("notice:", notices, "\nstatus after the crash:", status)
        assert "SIGSEGV" in notices and "next message starts a new runner" in notices
        assert "model crashed" in status and app.is_running
        await _send(pilot, app, "Name three primary colors.")
        await _wait(pilot, lambda: not app.generating, "the reply from a new runner")
        third = app.chat.messages()[-1]
        new_pid = app.host.backend.runner_pid
        await pilot.pause(0.5)  # a memory poll of the new runner
        status = app.status.render()
        print("reply from the new runner:", repr(third.text), "\nstatus:", status)
        assert new_pid != pid and third.role == "assistant" and third.text.strip()
        assert "RSS" in status and app.status.status.rss > 50 * 2**20  # the new runner's memory
    app.host.close()
    conv = app.conv.id
    app.store.close()
    stored = ChatStore(db).messages(conv)
    assert [m.role for m in stored] == ["user", "assistant", "user", "user", "assistant"]
    assert stored[1].content == first_reply and stored[4].content == third.text
    captured = capfd.readouterr()
    assert "Fatal Python error" not in captured.err + captured.out  # the runner's crash dump stayed in its pipe
