"""End to end: the real app, the real default model (llama.cpp), a question, a streamed answer."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from _tui_fake import run_async
from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.storage import ChatStore
from edgeinfer.tui import app as app_module
from edgeinfer.tui.app import ChatApp


class RecordingApp(ChatApp):
    """Records every streamed chunk the UI thread receives (Textual also calls ChatApp's handler)."""

    CSS_PATH = str(Path(app_module.__file__).with_name(ChatApp.CSS_PATH))  # resolved next to app.py, not here
    chunks: list

    def on_token_chunk(self, msg) -> None:
        self.chunks.append(msg.text)


@run_async
async def test_real_model_streams_an_answer_with_speed(tmp_path, default_gguf):
    app = RecordingApp(store=ChatStore(tmp_path / "chat.sqlite3"), model=str(default_gguf), backend="llama.cpp",
                  params=SamplingParams(temperature=0.0, max_tokens=64),
                  load_options=LoadOptions(n_ctx=1024, n_threads=2, seed=0), memory_poll_s=0.5)
    app.chunks = []
    async with app.run_test(size=(80, 24)) as pilot:
        t0 = time.perf_counter()
        while app.host.backend is None:
            assert time.perf_counter() - t0 < 60, "model did not load"
            await pilot.pause(0.05)
        app.prompt.load_text("What is the capital of France? Tell me about it.")
        await pilot.press("enter")
        while app.generating:
            assert time.perf_counter() - t0 < 120, "no answer"
            await asyncio.sleep(0.01)  # not pilot.pause(): that forces a full screen refresh every call
        await pilot.pause(0.1)
        status = app.status.render()
        reply = app.chat.messages()[-1]
        print("reply:", repr(reply.text))
        print("status:", status)
        print(f"{len(app.chunks)} text chunks streamed to the UI thread")
        m = re.search(r"([\d.]+) tok/s", status)
        assert m and float(m.group(1)) > 0
        assert "SmolLM2" in status or "Smollm2" in status
        assert "llama.cpp/cpu" in status and "RSS" in status
        assert reply.role == "assistant" and "Paris" in reply.text
        assert len(app.chunks) >= 2 and "".join(app.chunks) == reply.text  # it streamed, in pieces
        assert app.last_done.finish_reason in ("stop", "length")
    app.host.close()
    stored = app.store.messages(app.conv.id)
    assert stored[-1].role == "assistant" and stored[-1].content == reply.text
