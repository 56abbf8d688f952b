"""Pick a model: a table of every model found, with architecture, parameters, quant and size."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from edgeinfer.tui.models import ModelRow, fmt_params
from edgeinfer.units import fmt_bytes_short


NAME_WIDTH = 36  # keeps the table inside an 80-column terminal


class ModelPicker(ModalScreen[str | None]):
    """Returns the chosen model's name (what ``-m`` takes), or ``None`` on Esc."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="picker.cancel")]

    def __init__(self, rows: list[ModelRow], current: str | None = None) -> None:
        super().__init__()
        self.rows, self.current = rows, current

    def compose(self):
        with Vertical(id="picker-box", classes="modal-box"):
            yield Label("Choose a model  (Enter: use it in this chat, Esc: cancel)", classes="modal-title")
            table = DataTable(id="model-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("model", "arch", "params", "quant", "size")
            for r in self.rows:
                name = r.name if len(r.name) <= NAME_WIDTH else r.name[: NAME_WIDTH - 1] + "…"
                table.add_row(name, r.architecture, fmt_params(r.parameters), r.quant, fmt_bytes_short(r.size), key=r.name)
            yield table
            yield Label("", id="picker-detail", classes="hint")
            if not self.rows:
                yield Label("No models found. `edgeinfer pull REPO` or put .gguf files in the models folder.",
                            classes="hint")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        names = [r.name for r in self.rows]
        if self.current in names:
            table.move_cursor(row=names.index(self.current))
        table.focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        row = next((r for r in self.rows if r.name == event.row_key.value), None)
        if row is not None:
            self.query_one("#picker-detail", Label).update(f"{row.source}: {row.path}")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.dismiss(event.row_key.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
