"""Chat with a model in the terminal UI (conversations are saved; F1 lists the keys)."""

from __future__ import annotations

from edgeinfer.errors import EdgeinferError
from edgeinfer.cli.args import (add_load_args, add_model_arg, add_sampling_args, add_speculative_args, load_options,
                                sampling_params)


def add_arguments(p) -> None:
    add_model_arg(p)
    p.add_argument("--system", default="", help="system prompt for new conversations")
    p.add_argument("--theme", default=None,
                   help="Textual theme, e.g. textual-dark, textual-light, nord, gruvbox, ansi-dark "
                        "(terminal's own colours); ctrl+p > 'theme' switches live")
    p.add_argument("--db", default=None,
                   help="chat database file (default: the platform's data folder, or $EDGEINFER_DATA_DIR)")
    add_sampling_args(p)
    add_load_args(p)
    add_speculative_args(p)


def main(args) -> int:
    from edgeinfer.resolve import resolve_model
    from edgeinfer.storage import ChatStore
    from edgeinfer.tui.app import ChatApp

    from pathlib import Path

    resolve_model(args.model, allow_download=True)  # fail fast (and fetch a hub model) before the UI starts
    model = args.model
    if Path(model).expanduser().exists():  # conversations store the model: keep paths absolute
        model = str(Path(model).expanduser().resolve())
    app = ChatApp(store=ChatStore(args.db), model=model, backend=args.backend, params=sampling_params(args),
                  load_options=load_options(args), system_prompt=args.system)
    if args.theme:
        if args.theme not in app.available_themes:
            raise EdgeinferError(f"unknown theme {args.theme!r}; choose one of: {', '.join(sorted(app.available_themes))}")
        app.theme = args.theme
    try:
        app.run()
    finally:
        app.host.close()
        app.store.close()
    return 0
