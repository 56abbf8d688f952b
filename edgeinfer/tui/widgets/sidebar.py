"""The conversations sidebar: a search box over a list of conversations."""

from __future__ import annotations

from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

from edgeinfer.storage import Conversation


class Sidebar(Vertical):
    """Search box plus conversation list. Posts :class:`Sidebar.Selected` and :class:`Sidebar.SearchChanged`."""

    class Selected(Message):
        """A conversation was chosen (Enter or click)."""

        def __init__(self, conversation_id: int) -> None:
            self.conversation_id = conversation_id
            super().__init__()

    class SearchChanged(Message):
        """The search text changed; the app reloads the list."""

        def __init__(self, query: str) -> None:
            self.query = query
            super().__init__()

    def compose(self):
        yield Input(placeholder="search chats", id="chat-search")
        yield OptionList(id="chat-list")

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#chat-list", OptionList)

    def show(self, conversations: list[Conversation], current_id: int | None) -> None:
        """Replace the list; highlight the current conversation."""
        ol = self.option_list
        ol.clear_options()
        width = max(self.content_size.width - 2, 8) if self.content_size.width else 19
        ol.add_options([Option(self._short(c.title or "(untitled)", width), id=str(c.id)) for c in conversations])
        ids = [c.id for c in conversations]
        if current_id in ids:
            ol.highlighted = ids.index(current_id)
        elif ids:
            ol.highlighted = 0  # e.g. search results without the current chat: Enter opens the first

    @staticmethod
    def _short(title: str, width: int) -> str:
        title = " ".join(title.split())
        return title if len(title) <= width else title[: width - 1] + "…"

    def highlighted_id(self) -> int | None:
        ol = self.option_list
        if ol.highlighted is None:
            return None
        return int(ol.get_option_at_index(ol.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Selected(int(event.option.id)))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.SearchChanged(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in the search box opens the highlighted (first) match."""
        event.stop()
        cid = self.highlighted_id()
        if cid is not None:
            self.post_message(self.Selected(cid))

    def on_key(self, event) -> None:
        """↓ in the search box moves into the list."""
        if event.key == "down" and self.query_one("#chat-search", Input).has_focus:
            event.stop()
            self.option_list.focus()
