"""Pilot tests of ``edgeinfer chat`` with a scripted fake backend (no model, no network).

Each test drives the real app through key presses: sending, streaming, stopping, regenerating,
switching conversations, editing the system prompt, exporting, context trimming, reasoning blocks.
"""

from __future__ import annotations

import time

from _tui_fake import FakeLoader, run_async
from edgeinfer.backend import SamplingParams
from edgeinfer.storage import ChatStore
from edgeinfer.tui.app import ChatApp
from edgeinfer.tui.models import ModelRow
from edgeinfer.tui.screens.settings import SettingsScreen
from edgeinfer.tui.widgets.chat_view import ThinkingBlock

SIZE = (80, 24)


def make_app(tmp_path, *, params=None, rows=None, system_prompt="", **fake):
    loader = FakeLoader(**fake)
    store = ChatStore(tmp_path / "chat.sqlite3")
    app = ChatApp(store=store, params=params or SamplingParams(max_tokens=64), loader=loader,
                  model_lister=lambda: rows or [], export_dir=tmp_path / "exports", memory_poll_s=0,
                  system_prompt=system_prompt)
    return app, loader


async def wait_for(pilot, cond, timeout=10.0, what="condition"):
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.02)


async def ready(pilot, app):
    await wait_for(pilot, lambda: app.host.backend is not None, what="model load")


async def submit(pilot, app, text):
    """Type ``text`` into the prompt and press Enter."""
    app.prompt.load_text(text)
    await pilot.press("enter")


async def start_streaming(pilot, app, text, n_tokens):
    """Submit ``text`` and wait until the reply has streamed ``n_tokens`` tokens."""
    await submit(pilot, app, text)
    await wait_for(pilot, lambda: app._n_tokens >= n_tokens, what=f"{n_tokens} tokens")


async def send(pilot, app, text):
    app.prompt.focus()
    await submit(pilot, app, text)
    await wait_for(pilot, lambda: not app.generating, what="reply to finish")
    await pilot.pause(0.05)


@run_async
async def test_send_streams_and_persists(tmp_path):
    pieces = [f"w{i} " for i in range(30)]
    app, loader = make_app(tmp_path, replies=[pieces], delay=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await submit(pilot, app, "hello model")
        await wait_for(pilot, lambda: app._reply is not None and 0 < len(app._reply.text) < len("".join(pieces)),
                       what="a partial reply on screen")
        partial = app._reply.text
        print("partial text while streaming:", repr(partial))
        assert "".join(pieces).startswith(partial)
        assert app.prompt.has_focus  # the UI stays interactive while tokens stream
        await wait_for(pilot, lambda: not app.generating, what="reply to finish")
        await pilot.pause(0.05)
        view = app.chat.messages()[-1]
        assert view.role == "assistant" and view.text == "".join(pieces)
        assert "tok/s" in app.status.render()
        print("status:", app.status.render())
    msgs = app.store.messages(app.conv.id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].content == "".join(pieces) and msgs[1].meta["finish_reason"] == "stop"
    assert loader.current.requests[-1] == [{"role": "user", "content": "hello model"}]
    assert app.conv.title == "hello model"


@run_async
async def test_stop_mid_stream_keeps_partial(tmp_path):
    pieces = [f"t{i} " for i in range(200)]
    app, loader = make_app(tmp_path, replies=[pieces], delay=0.02, params=SamplingParams(max_tokens=500))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await start_streaming(pilot, app, "count", 5)
        t0 = time.perf_counter()
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.generating, what="stop")
        stop_s = time.perf_counter() - t0
        print(f"stopped {stop_s * 1000:.0f} ms after Esc")
        assert stop_s < 1.0
        await pilot.pause(0.05)
        view = app.chat.messages()[-1]
        assert 0 < len(view.text) < len("".join(pieces))
        assert "stopped" in app.status.render()
    stored = app.store.messages(app.conv.id)[-1]
    assert stored.role == "assistant" and stored.meta["finish_reason"] == "cancelled"
    assert stored.content == view.text and "".join(pieces).startswith(stored.content)


@run_async
async def test_ctrl_c_stops_too(tmp_path):
    app, _ = make_app(tmp_path, replies=[[f"x{i} " for i in range(200)]], delay=0.02,
                      params=SamplingParams(max_tokens=500))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await start_streaming(pilot, app, "go", 3)
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: not app.generating, timeout=2, what="ctrl+c to stop")
        assert app.is_running  # ctrl+c stopped the reply, not the app
    assert app.store.messages(app.conv.id)[-1].meta["finish_reason"] == "cancelled"


@run_async
async def test_regenerate_replaces_last_reply(tmp_path):
    app, loader = make_app(tmp_path, replies=[["first reply"], ["second reply"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "question")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not app.generating and app.chat.messages()[-1].text == "second reply",
                       what="regenerated reply")
        views = app.chat.messages()
        assert [v.role for v in views] == ["user", "assistant"]
    msgs = app.store.messages(app.conv.id)
    assert [(m.role, m.content) for m in msgs] == [("user", "question"), ("assistant", "second reply")]
    assert loader.current.requests[0] == loader.current.requests[1]  # same prompt both times


@run_async
async def test_switch_conversations(tmp_path):
    app, loader = make_app(tmp_path, replies=[["answer A"], ["answer B"], ["answer A2"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "chat A question")
        first = app.conv.id
        await pilot.press("ctrl+n")
        assert app.conv.id != first and not app.chat.messages()
        await send(pilot, app, "chat B question")
        second = app.conv.id
        # pick chat A in the sidebar with the keyboard
        app.sidebar.option_list.focus()
        ids = [int(app.sidebar.option_list.get_option_at_index(i).id)
               for i in range(app.sidebar.option_list.option_count)]
        assert ids == [second, first]  # most recent first
        await pilot.press("down", "enter")
        await pilot.pause(0.1)
        assert app.conv.id == first
        assert [v.text for v in app.chat.messages()] == ["chat A question", "answer A"]
        await send(pilot, app, "follow-up")
        assert loader.current.requests[-1] == [
            {"role": "user", "content": "chat A question"}, {"role": "assistant", "content": "answer A"},
            {"role": "user", "content": "follow-up"}]


@run_async
async def test_edit_system_prompt_in_settings(tmp_path):
    app, loader = make_app(tmp_path, replies=[["ok"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings screen")
        area = app.screen.query_one("#system-prompt")
        area.load_text("You are a pirate.")
        app.screen.query_one("#p-temperature").value = "0.3"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen), what="settings to close")
        assert app.conv.system_prompt == "You are a pirate."
        assert app.conv.params["temperature"] == 0.3
        await send(pilot, app, "hi")
        assert loader.current.requests[-1][0] == {"role": "system", "content": "You are a pirate."}
        # a bad value keeps the screen open with an error instead of saving
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings screen")
        app.screen.query_one("#p-top_p").value = "2"
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press("escape")
        await pilot.pause(0.05)
        assert app.store.get_conversation(app.conv.id).params["top_p"] == 0.95


@run_async
async def test_settings_refuse_max_tokens_below_minus_one(tmp_path):
    app, _ = make_app(tmp_path, replies=[["ok"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings screen")
        app.screen.query_one("#p-max_tokens").value = "-2"
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        shown = [n.message for n in app._notifications]
        print("notifications:", shown)
        assert isinstance(app.screen, SettingsScreen)  # not saved, the screen stays open
        assert any("max tokens" in m and "-1" in m for m in shown)
        await pilot.press("escape")
        await pilot.pause(0.05)
        assert "max_tokens" not in app.store.get_conversation(app.conv.id).params


@run_async
async def test_export_markdown(tmp_path):
    app, _ = make_app(tmp_path, replies=[["Use `ls`:\n```sh\nls -la\n```"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "how do I list files?")
        await pilot.press("f3")
        await pilot.pause(0.05)
    files = list((tmp_path / "exports").glob("*.md"))
    assert len(files) == 1
    text = files[0].read_text()
    print(text)
    assert "# how do I list files?" in text and "## User" in text and "```sh\nls -la\n```" in text


@run_async
async def test_context_overflow_drops_oldest_turns(tmp_path):
    # fake tokens = words; n_ctx 120, max_tokens 20 -> prompt budget 100 words
    app, loader = make_app(tmp_path, replies=[["short answer"]], n_ctx=120, params=SamplingParams(max_tokens=20),
                           system_prompt="be brief")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        cid = app.conv.id
        for i in range(4):
            app.store.add_message(cid, "user", f"old question {i} " + "blah " * 20)
            app.store.add_message(cid, "assistant", f"old answer {i} " + "blah " * 5)
        await send(pilot, app, "new question")
        req = loader.current.requests[-1]
        print("sent roles:", [m["role"] for m in req], "words:", len(loader.current.format_chat(req).split()))
        assert req[0] == {"role": "system", "content": "be brief"}
        assert req[-1] == {"role": "user", "content": "new question"}
        assert not any("old question 0" in m["content"] for m in req)
        assert len(loader.current.format_chat(req).split()) + 1 <= 100
        notices = [str(n.render()) for n in app.chat.query(".notice")]
        assert any("oldest message" in n for n in notices), notices
    # nothing was deleted from storage: trimming only affects the prompt
    assert len(app.store.messages(cid)) == 10


@run_async
async def test_thinking_collapsed_and_not_sent_back(tmp_path):
    reply = ["<think>", "secret reasoning", " steps", "</think>", "The answer is 4."]
    app, loader = make_app(tmp_path, replies=[reply, ["ok"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "2+2?")
        view = app.chat.messages()[-1]
        blocks = list(view.query(ThinkingBlock))
        assert len(blocks) == 1 and blocks[0].collapsed
        assert blocks[0].text == "secret reasoning steps"
        assert view.answer_text() == "The answer is 4."
        view.focus()
        await pilot.press("t")
        assert not blocks[0].collapsed
        await pilot.press("t")
        assert blocks[0].collapsed
        await send(pilot, app, "thanks")
        sent = loader.current.requests[-1]
        assert sent[1] == {"role": "assistant", "content": "The answer is 4."}
        assert "secret" not in loader.current.format_chat(sent)


@run_async
async def test_model_switch_continues_history(tmp_path):
    rows = [ModelRow("default", "/m/a.gguf", "default", 100 * 2**20, "llama", 135_000_000, "Q4_1"),
            ModelRow("other/model:Q8_0", "/m/b.gguf", "hf-cache", 500 * 2**20, "qwen2", 494_000_000, "Q8_0")]
    app, loader = make_app(tmp_path, replies=[["first"]], rows=rows)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "remember 42")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ModelPicker", what="model picker")
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: loader.loads[-1] == ("other/model:Q8_0", "llama.cpp"), what="new model load")
        assert loader.backends[0].closed  # the old model was freed
        await send(pilot, app, "what number?")
        assert loader.current.model == "other/model:Q8_0"
        assert loader.current.requests[-1][:2] == [{"role": "user", "content": "remember 42"},
                                                   {"role": "assistant", "content": "first"}]
        assert app.store.get_conversation(app.conv.id).model == "other/model:Q8_0"
        assert "other/model" in app.status.render()


@run_async
async def test_input_history_rename_search_delete(tmp_path):
    app, _ = make_app(tmp_path, replies=[["r"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "apples and pears")
        await pilot.press("ctrl+n")
        await send(pilot, app, "bananas")
        app.prompt.focus()
        await pilot.press("up")
        assert app.prompt.text == "bananas"
        await pilot.press("up")
        assert app.prompt.text == "apples and pears"
        await pilot.press("down", "down")
        assert app.prompt.text == ""
        await pilot.press("f2")
        await pilot.pause(0.05)
        await pilot.press("ctrl+u")  # clear the input (readline-style) in the rename box
        app.screen.query_one("#prompt-input").value = "Fruit talk"
        await pilot.press("enter")
        await pilot.pause(0.05)
        assert app.store.get_conversation(app.conv.id).title == "Fruit talk"
        await pilot.press("ctrl+f")
        await pilot.press(*"pears")
        await pilot.pause(0.05)
        ol = app.sidebar.option_list
        assert ol.option_count == 1 and str(ol.get_option_at_index(0).prompt) == "apples and pears"
        gone = app.conv.id
        await pilot.press("f8", "y")
        await pilot.pause(0.05)
        assert all(c.id != gone for c in app.store.list_conversations())
        assert app.conv.id != gone


@run_async
async def test_history_up_gives_newest_prompt_first_across_conversations(tmp_path):
    store = ChatStore(tmp_path / "chat.sqlite3")
    older, newer = store.create_conversation("older"), store.create_conversation("newer")
    for cid, text in ((older.id, "first ever"), (older.id, "second"), (newer.id, "third"), (newer.id, "latest")):
        store.add_message(cid, "user", text)
        store.add_message(cid, "assistant", "ok")
    store.close()
    app, _ = make_app(tmp_path, replies=[["r"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        app.prompt.focus()
        seen = []
        for _ in range(4):
            await pilot.press("up")
            seen.append(app.prompt.text)
        print("up x4:", seen)
        assert seen == ["latest", "third", "second", "first ever"]


@run_async
async def test_help_screen_lists_binding_ids(tmp_path):
    app, _ = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("f1")
        await pilot.pause(0.05)
        table = app.screen.query_one("#help-table")
        ids = {table.get_row_at(i)[2] for i in range(table.row_count)}
        for needed in ("chat.stop", "chat.regenerate", "chat.settings", "chat.export", "message.copy_code"):
            assert needed in ids
        await pilot.press("escape")
        await pilot.pause(0.05)
        assert not app.screen.is_modal


@run_async
async def test_load_failure_is_reported_not_fatal(tmp_path):
    def bad_loader(model, backend, opts):
        from edgeinfer.errors import ModelNotFoundError

        raise ModelNotFoundError(f"{model}: no such file")

    app = ChatApp(store=ChatStore(tmp_path / "c.db"), loader=bad_loader, model="nope.gguf", memory_poll_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.status.status.state == "load failed", what="load failure")
        await submit(pilot, app, "hi")
        await wait_for(pilot, lambda: not app.generating, what="failed generation")
        notices = " ".join(str(n.render()) for n in app.chat.query(".notice"))
        assert "nope.gguf: no such file" in notices
        assert app.is_running



@run_async
async def test_delete_chat_while_streaming_does_not_crash(tmp_path):
    app, _ = make_app(tmp_path, replies=[[f"z{i} " for i in range(300)]], delay=0.01,
                      params=SamplingParams(max_tokens=400))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await start_streaming(pilot, app, "long one", 3)
        gone = app.conv.id
        await pilot.press("f8", "y")
        await wait_for(pilot, lambda: not app.generating, what="the reply to stop")
        await pilot.pause(0.05)
        assert app.is_running and app.conv.id != gone
        assert all(m.conversation_id != gone for m in app.store.iter_all_messages())


@run_async
async def test_settings_thinking_and_expert_offload(tmp_path):
    """The chat's thinking switch reaches the backend with each request; "MoE experts on CPU" reloads
    the model with those load options (and is kept with the conversation)."""
    from edgeinfer.backend import ALL_LAYERS

    app, loader = make_app(tmp_path, replies=[["ok"]])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert loader.options[-1].n_cpu_moe == 0
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings screen")
        app.screen.query_one("#think").value = 2  # "off"
        app.screen.query_one("#n-cpu-moe").value = "all"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen), what="settings to close")
        await wait_for(pilot, lambda: len(loader.loads) == 2, what="reload with the experts in host memory")
        assert loader.options[-1].n_cpu_moe == ALL_LAYERS
        await send(pilot, app, "hi")
        assert loader.current.params[-1].think is False
        stored = app.store.get_conversation(app.conv.id).params
        print(f"stored chat settings: {stored}; loads {loader.loads}")
        assert stored["think"] is False and stored["n_cpu_moe"] == ALL_LAYERS
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="settings screen")
        assert app.screen.query_one("#n-cpu-moe").value == "all"
        app.screen.query_one("#n-cpu-moe").value = "lots"
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert isinstance(app.screen, SettingsScreen)  # refused with a message, nothing saved
        await pilot.press("escape")
