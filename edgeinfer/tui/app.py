"""``edgeinfer chat``: the Textual app that ties storage, widgets, screens and the model worker.

The app depends on the Backend Protocol only: models are loaded through a ``loader`` callable
(default: resolve the name, then :func:`edgeinfer.backends.load_backend`), inside a thread
worker, and tokens come back as messages (:mod:`edgeinfer.tui.session`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import Footer

from edgeinfer.backend import LoadOptions, SamplingParams
from edgeinfer.storage import ChatStore, Conversation, StorageError, export_markdown
from edgeinfer.tui import session as S
from edgeinfer.tui.context import history_messages
from edgeinfer.tui.models import ModelRow, describe_models
from edgeinfer.tui.screens.help import HelpScreen, binding_rows
from edgeinfer.tui.screens.model_picker import ModelPicker
from edgeinfer.tui.screens.settings import PARAM_FIELDS, ChatSettings, SettingsScreen
from edgeinfer.tui.screens.text_prompt import Confirm, TextPrompt
from edgeinfer.tui.widgets.chat_view import ChatView, MessageView
from edgeinfer.tui.widgets.prompt_input import PromptInput
from edgeinfer.tui.widgets.sidebar import Sidebar
from edgeinfer.tui.widgets.status_bar import StatusBar

# Streamed text is redrawn at an adaptive rate: every redraw re-lays out the screen (~10 ms of
# Python on a slow CPU), time the decode threads need. The UI thread aims at UI_CPU_SHARE of one
# core: interval = CPU used since the last redraw / UI_CPU_SHARE, within [RENDER_MIN_S, RENDER_MAX_S].
RENDER_TICK_S = 0.05
RENDER_MIN_S = 0.1
RENDER_MAX_S = 1.0
UI_CPU_SHARE = 0.03
GEN_SWITCH_INTERVAL_S = 0.0005  # GIL hand-over while generating: the decode thread waits less on the UI
NEW_TITLE = "New chat"


def default_loader(model: str, backend: str, opts: LoadOptions):
    """Resolve ``model`` (offline unless it is a hub name already allowed) and load it."""
    from edgeinfer.backends import load_backend
    from edgeinfer.resolve import resolve_model

    return load_backend(backend, resolve_model(model, allow_download=False), opts)


class ChatApp(App):
    """The chat UI. All arguments are injectable so tests can use a fake backend and a temp DB."""

    CSS_PATH = "app.tcss"
    TITLE = "edgeinfer chat"
    BINDINGS = [
        Binding("ctrl+n", "new_chat", "New", id="chat.new", tooltip="New conversation"),
        Binding("escape", "stop", "Stop", id="chat.stop", priority=True, tooltip="Stop the reply (keeps it)"),
        Binding("ctrl+c", "stop", "Stop", id="chat.stop_ctrl_c", priority=True, show=False,
                tooltip="Stop the reply (keeps it)"),
        Binding("ctrl+r", "regenerate", "Regen", id="chat.regenerate", tooltip="Regenerate the last reply"),
        Binding("ctrl+s", "settings", "Settings", id="chat.settings", tooltip="System prompt, model, sampling"),
        Binding("ctrl+o", "pick_model", "Model", id="chat.pick_model", tooltip="Pick a model for this chat"),
        Binding("f1", "help", "Help", id="chat.help", tooltip="This list of keys"),
        Binding("ctrl+b", "toggle_sidebar", "Chats", id="chat.toggle_sidebar", show=False, tooltip="Show / hide the chats"),
        Binding("ctrl+f", "search", "Search chats", id="chat.search", show=False),
        Binding("f2", "rename", "Rename chat", id="chat.rename", show=False),
        Binding("f3", "export", "Export Markdown", id="chat.export", show=False),
        Binding("f4", "copy_last", "Copy last reply", id="chat.copy_last", show=False),
        Binding("f8", "delete_chat", "Delete chat", id="chat.delete", show=False),
        Binding("ctrl+l", "focus_input", "Focus input", id="chat.focus_input", show=False),
        Binding("ctrl+q", "quit", "Quit", id="chat.quit", priority=True),
    ]

    def __init__(self, *, store: ChatStore | None = None, model: str = "default", backend: str = "llama.cpp",
                 params: SamplingParams | None = None, load_options: LoadOptions | None = None,
                 system_prompt: str = "", loader: S.Loader | None = None, model_lister=None,
                 export_dir: str | Path | None = None, memory_poll_s: float = 2.0) -> None:
        super().__init__()
        self.store = store or ChatStore()
        self.default_model, self.default_backend = model, backend
        self.default_params = dataclasses.asdict(params or SamplingParams())
        self.default_system = system_prompt
        self.host = S.ModelHost(loader or default_loader, load_options or LoadOptions())
        self.model_lister = model_lister or describe_models
        self.export_dir = Path(export_dir) if export_dir is not None else Path.cwd()
        self.memory_poll_s = memory_poll_s
        self.conv: Conversation | None = None
        self.job: S.GenJob | None = None
        self._job_seq = 0
        self._reply: MessageView | None = None
        self._reply_text = ""
        self._dirty = False
        self._t_first: float | None = None  # UI-side arrival of the first / last token
        self._t_last: float | None = None
        self._n_tokens = 0
        self._n_first = 0
        self._prompt_tokens = 0
        self.last_ui_tok_s: float | None = None  # what the status bar showed at the end of the last reply
        self.last_done = None

    # -- layout --------------------------------------------------------------------------------
    def compose(self):
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            with Vertical(id="chat-column"):
                yield ChatView(id="chat")
                yield PromptInput(id="prompt", placeholder="Message (Enter sends, ctrl+j newline, ↑ history)")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def chat(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def generating(self) -> bool:
        return self.job is not None

    def on_mount(self) -> None:
        self.prompt.sent_history = self.store.recent_prompts(200)  # oldest first: ↑ starts at the newest
        convs = self.store.list_conversations()
        latest = convs[0] if convs else None
        if latest is not None and latest.title == NEW_TITLE and not self.store.messages(latest.id):
            self.conv = self.store.update_conversation(latest.id, model=self.default_model,
                                                       backend=self.default_backend, system_prompt=self.default_system)
        else:
            self.conv = self._create_conversation()
        self._show_conversation()
        self.status.set(model=self.conv.model, backend=self.conv.backend, state="loading…")
        self._load_worker(self.conv.model, self.conv.backend)
        self._memory_timer = None
        if self.memory_poll_s > 0:
            self._memory_timer = self.set_interval(self.memory_poll_s, self._poll_memory)
        self.prompt.focus()
        self._render_timer = self.set_interval(RENDER_TICK_S, self._render_tick, pause=True)
        self._next_render = 0.0
        self._cpu_mark = time.thread_time()

    def _create_conversation(self) -> Conversation:
        return self.store.create_conversation(NEW_TITLE, system_prompt=self.default_system, model=self.default_model,
                                              backend=self.default_backend, params={})

    def _refresh_sidebar(self, query: str | None = None) -> None:
        if query is None:
            query = self.sidebar.query_one("#chat-search").value
        self.sidebar.show(self.store.list_conversations(query), self.conv.id if self.conv else None)

    def _show_conversation(self) -> None:
        """Render the current conversation's messages."""
        self.chat.clear()
        self.sub_title = self.conv.title
        msgs = self.store.messages(self.conv.id)
        if not msgs:
            self.chat.add_notice("Type a message, Enter to send. F1: keys, ctrl+s: settings, ctrl+o: model.")
        for m in msgs:
            self.chat.add_message(m.role, m.content, message_id=m.id, footer=self._footer_of(m.meta))
        self._refresh_sidebar()
        self._count_context()

    @staticmethod
    def _footer_of(meta: dict) -> str:
        if not meta:
            return ""
        parts = []
        if meta.get("finish_reason") == "cancelled":
            parts.append("stopped")
        elif meta.get("finish_reason") == "length":
            parts.append("max tokens reached")
        if meta.get("model"):
            parts.append(str(meta["model"]))
        if meta.get("generated_tokens"):
            parts.append(f"{meta['generated_tokens']} tok")
        if meta.get("tok_s"):
            parts.append(f"{meta['tok_s']:.1f} tok/s")
        return " · ".join(parts)

    def effective_params(self, conv: Conversation | None = None) -> SamplingParams:
        conv = conv or self.conv
        d = {**self.default_params, **(conv.params or {})}
        return SamplingParams(**{k: v for k, v in d.items() if k in SamplingParams.__dataclass_fields__})

    def _key(self, conv) -> tuple[str, str, int]:
        """What the chat needs loaded: (model, backend, MoE layers whose experts stay in host memory)."""
        off = self._offload(conv)
        return conv.model, conv.backend, self.host.opts.n_cpu_moe if off is None else off

    def _offload(self, conv) -> int | None:
        """The chat's MoE expert offload setting (None: the app's command-line value)."""
        v = (conv.params or {}).get("n_cpu_moe") if conv is not None else None
        return None if v is None else int(v)

    # -- workers -------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, model: str, backend: str) -> None:
        try:
            self.host.ensure(model, backend, self.post_message, self._offload(self.conv))
        except Exception as e:  # noqa: BLE001 - reported in the UI, the app keeps running
            self.post_message(S.ModelFailed(str(e)))
            return
        self.call_from_thread(self._count_context)

    def _count_context(self) -> None:
        """Show how much of the context the current conversation fills (counted off the UI thread)."""
        if self.conv is not None:
            turns = [m.as_chat() for m in self.store.messages(self.conv.id)]
            self._count_worker(history_messages(self.conv.system_prompt, turns))

    @work(thread=True, exclusive=True, group="count")
    def _count_worker(self, msgs: list) -> None:
        try:
            res = self.host.count(msgs)
        except Exception:  # noqa: BLE001 - only the status bar's context figure is missing
            return
        if res is not None:
            self.call_from_thread(self.status.set, ctx_used=res[0], ctx_total=res[1])

    @work(thread=True, group="generate")
    def _generate_worker(self, job: S.GenJob) -> None:
        self.host.run(job, self.post_message)

    def _poll_memory(self) -> None:
        b = self.host.backend
        if b is None:
            return
        mem = b.memory_bytes()  # a round trip to the runner: the app may be closing meanwhile
        try:
            status = self.status
        except NoMatches:  # the screen is already torn down (the app is exiting)
            return
        status.set(rss=mem.get("rss", 0), vram=mem.get("device", 0))

    # -- worker messages -------------------------------------------------------------------------
    def on_model_loading(self, msg: S.ModelLoading) -> None:
        self.status.set(model=msg.model, backend=msg.backend, quant="", device="", state="loading…")

    def on_model_loaded(self, msg: S.ModelLoaded) -> None:
        i = msg.info
        self.status.set(model=i.name, quant=i.quant, backend=i.backend, device=i.device, ctx_total=i.n_ctx,
                        rss=msg.memory.get("rss", 0), vram=msg.memory.get("device", 0),
                        state="generating…" if self.generating else "")
        if not i.has_chat_template:
            self.chat.add_notice(f"{i.name} has no chat template; using ChatML")

    def on_model_failed(self, msg: S.ModelFailed) -> None:
        self.status.set(state="load failed")
        self.chat.add_notice(f"Could not load the model: {msg.error}")
        self.notify(msg.error, title="Model", severity="error", timeout=8)

    def on_context_info(self, msg: S.ContextInfo) -> None:
        if self.job is None or msg.job_id != self.job.id:
            return
        self._prompt_tokens = msg.prompt_tokens
        self.status.set(ctx_used=msg.prompt_tokens, ctx_total=msg.n_ctx)
        if msg.dropped:
            note = (f"⚠ context full: the {msg.dropped} oldest message(s) were left out of the prompt "
                    f"({msg.prompt_tokens}/{msg.n_ctx} tokens; the system prompt is kept)")
            self.chat.add_notice(note, before=self._reply)
            self.notify(note, severity="warning", timeout=5)

    def on_token_chunk(self, msg: S.TokenChunk) -> None:
        if self.job is None or msg.job_id != self.job.id:
            return
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first, self._n_first = now, msg.n_tokens
            self.status.set(ttft_s=now - self._t_sent)
        self._t_last = now
        self._n_tokens = msg.n_tokens
        self._reply_text += msg.text
        self._dirty = True

    def _live_tok_s(self) -> float | None:
        if self._t_first is None or self._t_last is None or self._t_last <= self._t_first:
            return None
        return (self._n_tokens - self._n_first) / (self._t_last - self._t_first)

    def _render_tick(self) -> None:
        now = time.perf_counter()
        if not self._dirty or now < self._next_render:
            return
        cpu = time.thread_time()
        used = cpu - self._cpu_mark  # this thread's CPU since the last redraw (redraw + layout + messages)
        self._render_reply()
        self._cpu_mark = time.thread_time()
        self._next_render = now + min(RENDER_MAX_S, max(RENDER_MIN_S, used / UI_CPU_SHARE))

    def _render_reply(self) -> None:
        if not self._dirty or self._reply is None:
            return
        self._dirty = False
        self._reply.set_text(self._reply_text, streaming=True)
        self.status.set(tok_s=self._live_tok_s(), ctx_used=self._prompt_tokens + self._n_tokens)

    def on_generation_done(self, msg: S.GenerationDone) -> None:
        job = self.job
        if job is None or msg.job_id != job.id:
            return
        self._render_timer.pause()
        sys.setswitchinterval(self._saved_switch)
        self.job = None
        self.refresh_bindings()
        view, self._reply = self._reply, None
        self.last_done = msg.done
        if msg.error is not None:
            view.remove()
            self.chat.add_notice(f"Generation failed: {msg.error}")
            self.status.set(state="model crashed" if msg.crashed else "error")
            if msg.crashed:
                self.notify(msg.error, title="Model crashed", severity="error", timeout=10)
                self._poll_memory()
            return
        done = msg.done
        text = self._reply_text if done.finish_reason == "cancelled" else done.text
        tok_s = self._live_tok_s()
        self.last_ui_tok_s = tok_s
        meta = {"finish_reason": done.finish_reason, "model": job.model, "backend": job.backend,
                "generated_tokens": done.timings.generated_tokens, "tok_s": tok_s or done.timings.decode_tok_s,
                "ttft_s": done.timings.ttft_s, "prompt_tokens": done.timings.prompt_tokens}
        if text.strip():
            try:
                stored = self.store.add_message(job.conversation_id, "assistant", text, meta)
                view.message_id = stored.id
            except StorageError:  # the conversation was deleted while the reply streamed
                pass
        if view.is_attached:
            view.set_text(text)
            view.set_footer(self._footer_of(meta))
        self.status.set(state="stopped" if done.finish_reason == "cancelled" else "",
                        tok_s=tok_s if tok_s is not None else done.timings.decode_tok_s,
                        ttft_s=done.timings.ttft_s,
                        ctx_used=done.timings.prompt_tokens + done.timings.generated_tokens)
        self._poll_memory()
        self._refresh_sidebar()

    # -- sending -------------------------------------------------------------------------------
    def on_prompt_input_submitted(self, msg: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("Still generating: Esc stops it", severity="warning", timeout=3)
            self.prompt.load_text(msg.text)
            return
        self.send(msg.text)

    def send(self, text: str) -> None:
        """Store a user message and start the reply."""
        if not self.store.messages(self.conv.id):
            self.chat.query(".notice").remove()  # the "type a message" hint
        stored = self.store.add_message(self.conv.id, "user", text)
        if self.conv.title == NEW_TITLE:
            title = " ".join(text.split())[:40] or NEW_TITLE
            self.conv = self.store.update_conversation(self.conv.id, title=title)
            self.sub_title = title
        self.chat.add_message("user", text, message_id=stored.id)
        self._refresh_sidebar()
        self._start_reply()

    def _start_reply(self) -> None:
        conv = self.conv
        turns = [m.as_chat() for m in self.store.messages(conv.id)]
        self._job_seq += 1
        self.job = S.GenJob(self._job_seq, conv.id, conv.model, conv.backend,
                            history_messages(conv.system_prompt, turns), self.effective_params(conv),
                            n_cpu_moe=self._offload(conv))
        self._reply = self.chat.add_message("assistant")
        self._reply_text, self._dirty = "", False
        self._t_first = self._t_last = None
        self._n_tokens = self._n_first = 0
        self._prompt_tokens = 0
        self._t_sent = time.perf_counter()
        self.status.set(state="generating…", tok_s=None, ttft_s=None)
        self._next_render = 0.0
        self._cpu_mark = time.thread_time()
        self._render_timer.resume()
        self._saved_switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._saved_switch, GEN_SWITCH_INTERVAL_S))
        self.refresh_bindings()  # the footer now offers "esc Stop"
        self._generate_worker(self.job)

    # -- actions -------------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.generating and not self.screen.is_modal
        return True

    def action_stop(self) -> None:
        """Stop the reply now; what was generated so far is kept."""
        if self.job is not None:
            self.job.cancel.set()
            if self.host.backend is not None:
                self.host.backend.cancel()

    def action_regenerate(self) -> None:
        if self.generating:
            return
        msgs = self.store.messages(self.conv.id)
        if not msgs:
            self.notify("Nothing to regenerate", timeout=2)
            return
        if msgs[-1].role == "assistant":
            self.store.delete_message(msgs[-1].id)
            views = self.chat.messages()
            if views and views[-1].role == "assistant":
                views[-1].remove()
        self._start_reply()

    def _switch_to(self, conv: Conversation) -> None:
        if self.generating:
            self.action_stop()
        old = self.conv
        if old is not None and old.id != conv.id and old.title == NEW_TITLE and not self.store.messages(old.id):
            self.store.delete_conversation(old.id)  # leave no empty "New chat" behind
        self.conv = conv
        self._show_conversation()
        if self.host.key != self._key(conv):
            self._load_worker(conv.model, conv.backend)

    def action_new_chat(self) -> None:
        msgs = self.store.messages(self.conv.id) if self.conv else [None]
        if self.conv is not None and not msgs and self.conv.title == NEW_TITLE:
            self.prompt.focus()
            return
        self._switch_to(self._create_conversation())
        self.prompt.focus()

    def on_sidebar_selected(self, msg: Sidebar.Selected) -> None:
        if self.conv is None or msg.conversation_id != self.conv.id:
            self._switch_to(self.store.get_conversation(msg.conversation_id))
        self.prompt.focus()

    def on_sidebar_search_changed(self, msg: Sidebar.SearchChanged) -> None:
        self._refresh_sidebar(msg.query)

    def action_toggle_sidebar(self) -> None:
        self.sidebar.display = not self.sidebar.display

    def action_search(self) -> None:
        self.sidebar.display = True
        self.sidebar.query_one("#chat-search").focus()

    def action_focus_input(self) -> None:
        self.prompt.focus()

    def action_rename(self) -> None:
        def done(title: str | None) -> None:
            if title:
                self.conv = self.store.update_conversation(self.conv.id, title=title)
                self.sub_title = title
                self._refresh_sidebar()

        self.push_screen(TextPrompt("Rename chat", self.conv.title), done)

    def action_delete_chat(self) -> None:
        def done(yes: bool | None) -> None:
            if not yes:
                return
            if self.generating:
                self.action_stop()
            self.store.delete_conversation(self.conv.id)
            rest = self.store.list_conversations()
            self.conv = None
            self._switch_to(rest[0] if rest else self._create_conversation())

        self.push_screen(Confirm(f"Delete “{self.conv.title}” and its messages?"), done)

    def action_export(self) -> None:
        path = export_markdown(self.conv, self.store.messages(self.conv.id), self.export_dir)
        self.notify(f"Exported to {path}", title="Export", timeout=6)

    def action_copy_last(self) -> None:
        views = [v for v in self.chat.messages() if v.role == "assistant" and v.text]
        if views:
            views[-1].action_copy_message()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(binding_rows(ChatApp, MessageView, PromptInputKeys, SettingsScreen)))

    def _open_picker(self, current: str | None, callback) -> None:
        self._picker_worker(current, callback)

    @work(thread=True, exclusive=True, group="picker")
    def _picker_worker(self, current, callback) -> None:
        try:
            rows: list[ModelRow] = self.model_lister()
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable Hugging Face cache; the chat goes on
            self.call_from_thread(self.notify, f"Cannot list models: {e}", severity="error", timeout=8)
            return
        self.call_from_thread(self.push_screen, ModelPicker(rows, current), callback)

    def action_pick_model(self) -> None:
        def chosen(name: str | None) -> None:
            if name and name != self.conv.model:
                self._apply_settings(ChatSettings(self.conv.system_prompt, name, self.conv.backend,
                                                  self.conv.params))

        self._open_picker(self.conv.model, chosen)

    def action_settings(self) -> None:
        p = dataclasses.asdict(self.effective_params())
        current = ChatSettings(self.conv.system_prompt, self.conv.model, self.conv.backend,
                               {k: p[k] for k, _, _ in PARAM_FIELDS} | {"think": p["think"],
                                                                        "n_cpu_moe": self._key(self.conv)[2]})

        def done(res: ChatSettings | None) -> None:
            if res is not None:
                self._apply_settings(res)

        self.push_screen(SettingsScreen(current, pick_model=self._open_picker), done)

    def _apply_settings(self, s: ChatSettings) -> None:
        old = self.conv
        self.conv = self.store.update_conversation(old.id, system_prompt=s.system_prompt, model=s.model,
                                                   backend=s.backend, params=s.params)
        if self._key(self.conv) != self._key(old):
            self.chat.add_notice(f"Model: {s.model} ({s.backend}); the conversation continues with it")
            if not self.generating:
                self._load_worker(s.model, s.backend)
        elif s.system_prompt != old.system_prompt:
            self.chat.add_notice("System prompt updated")
            self._count_context()

    def on_unmount(self) -> None:
        if getattr(self, "_memory_timer", None) is not None:
            self._memory_timer.stop()
        if self.job is not None:
            self.action_stop()
        self.workers.cancel_all()


class PromptInputKeys:
    """Keys of the message box, listed in the help screen (handled in :class:`PromptInput`)."""

    BINDINGS = [
        Binding("enter", "send", "Send message", id="input.send"),
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", id="input.newline"),
        Binding("up,down", "history", "History (on first / last line)", id="input.history"),
    ]
