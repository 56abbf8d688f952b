"""Per-conversation settings: system prompt, model, backend and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, TextArea

from edgeinfer.backend import ALL_LAYERS, SAMPLING_BOUNDS

BACKEND_CHOICES = ("llama.cpp", "torch")
# the chat template's reasoning switch (SamplingParams.think)
THINK_CHOICES = (("template default", None), ("on", True), ("off", False))

# label of each editable SamplingParams field; types and valid ranges come from SAMPLING_BOUNDS
PARAM_LABELS = {
    "temperature": "temperature",
    "top_k": "top-k",
    "top_p": "top-p",
    "min_p": "min-p",
    "repeat_penalty": "repeat pen.",
    "max_tokens": "max tokens",
    "seed": "seed",
}
# (field, label, type) of the editable SamplingParams fields
PARAM_FIELDS = tuple((key, label, SAMPLING_BOUNDS[key].kind) for key, label in PARAM_LABELS.items())


@dataclass
class ChatSettings:
    """What the settings screen edits and returns."""

    system_prompt: str
    model: str
    backend: str
    params: dict


def parse_offload(text: str) -> int:
    """The "experts in host memory" box: blank/0 = none, ``all``, or a number of leading layers."""
    t = text.strip().lower()
    if t in ("", "0", "none", "off"):
        return 0
    if t == "all":
        return ALL_LAYERS
    try:
        n = int(t)
    except ValueError:
        raise ValueError(f"experts on CPU: {text!r} is not 'all', blank or a number of layers") from None
    if n < 0:
        raise ValueError("experts on CPU must be 'all', blank or a number of layers >= 0")
    return n


def offload_text(n: int) -> str:
    return "" if not n else "all" if n >= ALL_LAYERS else str(n)


def parse_params(values: dict[str, str]) -> dict:
    """Turn the text of the parameter boxes into numbers; raise ValueError naming a bad field.

    The valid ranges are :data:`edgeinfer.backend.SAMPLING_BOUNDS`, the same the CLI checks.
    """
    out = {}
    for key, label, kind in PARAM_FIELDS:
        raw = values.get(key, "").strip()
        if raw == "" and key == "seed":
            out[key] = None
            continue
        try:
            v = kind(raw)
        except ValueError:
            raise ValueError(f"{label}: {raw!r} is not a valid {kind.__name__}") from None
        bound = SAMPLING_BOUNDS[key]
        if bound.problem(v):
            raise ValueError(f"{label} must be {bound.describe()}" + (f" ({bound.note})" if bound.note else ""))
        out[key] = v
    return out


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Edit a conversation's settings. ctrl+s saves, Esc cancels, ctrl+o opens the model picker."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="settings.save"),
        Binding("escape", "cancel", "Cancel", id="settings.cancel"),
        Binding("ctrl+o", "pick_model", "Pick model", id="settings.pick_model"),
    ]

    def __init__(self, current: ChatSettings, pick_model=None) -> None:
        super().__init__()
        self.current = current
        self._pick_model = pick_model  # callable(current_name, callback) from the app

    def compose(self):
        c = self.current
        with Vertical(id="settings-box", classes="modal-box"):
            yield Label("Chat settings", classes="modal-title")
            yield Label("System prompt", classes="field-label")
            yield TextArea(c.system_prompt, id="system-prompt", soft_wrap=True, tab_behavior="focus")
            with Horizontal(classes="row"):
                yield Label("model", classes="field-label")
                yield Input(c.model, id="model", compact=True)
                yield Label("backend", classes="field-label")
                yield Select([(b, b) for b in BACKEND_CHOICES], value=c.backend if c.backend in BACKEND_CHOICES
                             else BACKEND_CHOICES[0], allow_blank=False, id="backend", compact=True)
            with Grid(id="params-grid"):
                for key, label, _ in PARAM_FIELDS:
                    v = c.params.get(key)
                    yield Label(label, classes="field-label")
                    yield Input("" if v is None else str(v), id=f"p-{key}", compact=True,
                                placeholder="load seed" if key == "seed" else "")
            with Horizontal(classes="row"):
                yield Label("thinking", classes="field-label")
                yield Select([(label, i) for i, (label, _) in enumerate(THINK_CHOICES)], allow_blank=False,
                             value=next(i for i, (_, v) in enumerate(THINK_CHOICES) if v == c.params.get("think")),
                             id="think", compact=True)
                yield Label("MoE experts on CPU", classes="field-label")
                yield Input(offload_text(int(c.params.get("n_cpu_moe") or 0)), id="n-cpu-moe", compact=True,
                            placeholder="none | all | first N")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary", compact=True)
                yield Button("Pick model (ctrl+o)", id="pick", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#system-prompt", TextArea).focus()

    def result(self) -> ChatSettings:
        """The edited settings; raises ValueError with a message for the user."""
        values = {key: self.query_one(f"#p-{key}", Input).value for key, _, _ in PARAM_FIELDS}
        params = parse_params(values)
        params["think"] = THINK_CHOICES[int(self.query_one("#think", Select).value)][1]
        params["n_cpu_moe"] = parse_offload(self.query_one("#n-cpu-moe", Input).value)
        model = self.query_one("#model", Input).value.strip() or "default"
        return ChatSettings(system_prompt=self.query_one("#system-prompt", TextArea).text, model=model,
                            backend=str(self.query_one("#backend", Select).value), params=params)

    def action_save(self) -> None:
        try:
            res = self.result()
        except ValueError as e:
            self.notify(str(e), severity="error", timeout=4)
            return
        self.dismiss(res)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_pick_model(self) -> None:
        if self._pick_model is None:
            return

        def chosen(name: str | None) -> None:
            if name:
                self.query_one("#model", Input).value = name

        self._pick_model(self.query_one("#model", Input).value, chosen)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"save": self.action_save, "cancel": self.action_cancel, "pick": self.action_pick_model}[event.button.id]()
