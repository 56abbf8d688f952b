"""Snapshots (pytest-textual-snapshot) of the chat screen, the model picker and the settings modal.

Fixed 80x24 terminal, cursor blink off, a fake backend and a pre-filled database, so every run
renders the same screen. Update with ``pytest tests/test_tui_snapshots.py --snapshot-update``
and look at the SVGs in ``tests/__snapshots__/``.
"""

from __future__ import annotations

from _tui_fake import FakeLoader
from edgeinfer.backend import SamplingParams
from edgeinfer.storage import ChatStore
from edgeinfer.tui.app import ChatApp
from edgeinfer.tui.models import ModelRow

SIZE = (80, 24)

ROWS = [
    ModelRow("default", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "default", 98_000_000, "llama", 134_515_008, "Q4_1"),
    ModelRow("Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "/hf/q.gguf", "hf-cache", 491_000_000, "qwen2", 494_032_768,
             "Q4_K_M"),
    ModelRow("gemma-4-e2b-it-Q8_0.gguf", "/models/g.gguf", "models-folder", 5_100_000_000, "gemma4", 5_100_000_000,
             "Q8_0"),
]


def _app(tmp_path) -> ChatApp:
    store = ChatStore(tmp_path / "chat.sqlite3")
    old = store.create_conversation("Rust lifetimes")
    store.add_message(old.id, "user", "What is a lifetime?")
    c = store.create_conversation("Sum a list in Python", system_prompt="You are a concise coding assistant.")
    store.add_message(c.id, "user", "How do I sum a list in Python?")
    store.add_message(c.id, "assistant",
                      "<think>The user wants the builtin.</think>Use the built-in `sum`:\n\n"
                      "```python\ntotal = sum([1, 2, 3])\n```",
                      {"finish_reason": "stop", "model": "default", "generated_tokens": 31, "tok_s": 88.4})
    app = ChatApp(store=store, loader=FakeLoader(), model_lister=lambda: ROWS, memory_poll_s=0,
                  params=SamplingParams(temperature=0.7, max_tokens=256), export_dir=tmp_path)
    app.start_conversation = c.id
    return app


async def _settle(pilot) -> None:
    app = pilot.app
    for _ in range(200):
        if app.host.backend is not None and app.status.status.ctx_used:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.1)
    for w in app.screen.query("Input, TextArea"):
        w.cursor_blink = False
    await pilot.pause(0.05)


async def _open_chat(pilot) -> None:
    app = pilot.app
    app._switch_to(app.store.get_conversation(app.start_conversation))
    await _settle(pilot)


def test_main_screen(snap_compare, tmp_path):
    async def run_before(pilot):
        await _open_chat(pilot)

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_model_picker(snap_compare, tmp_path):
    async def run_before(pilot):
        await _open_chat(pilot)
        await pilot.press("ctrl+o")
        for _ in range(100):
            if pilot.app.screen.is_modal:
                break
            await pilot.pause(0.02)
        await _settle(pilot)

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_settings_modal(snap_compare, tmp_path):
    async def run_before(pilot):
        await _open_chat(pilot)
        await pilot.press("ctrl+s")
        await _settle(pilot)

    assert snap_compare(_app(tmp_path), terminal_size=SIZE, run_before=run_before)
