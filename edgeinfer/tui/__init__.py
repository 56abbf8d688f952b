"""``edgeinfer chat``: the Textual terminal chat UI.

Layout: :mod:`~edgeinfer.tui.app` (the App, bindings, flow), :mod:`~edgeinfer.tui.session`
(model loading and generation in a worker thread, messages to the UI), ``widgets/``, ``screens/``
(modal screens return through ``dismiss``), pure helpers :mod:`~edgeinfer.tui.reasoning`
and :mod:`~edgeinfer.tui.context`; CSS in ``app.tcss``. Storage is :mod:`edgeinfer.storage`.
Nothing here imports torch or a backend module: models come through a loader callable.
"""
