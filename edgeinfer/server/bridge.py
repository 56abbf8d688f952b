"""Run one generation in a worker thread and hand its events to the event loop as they come.

The engine's ``generate`` blocks (it waits for the runner's pipe or the torch scheduler), so each
request gets a thread, started at once; events cross to the loop with ``call_soon_threadsafe``. The
thread releases the engine slot when it is done, so a slot is never held by a finished request nor
given to a second one while the first still runs. :meth:`Generation.cancel` (the client
disconnected, the handler gave up) stops the sequence at the engine's next step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from edgeinfer.backend import Event
from edgeinfer.server.engines import Job, Prepared
from edgeinfer.server.pool import Slot
from edgeinfer.server.request import GenRequest

_DONE = object()


class Generation:
    """``req`` running on ``slot`` in a worker thread; iterate :meth:`events` on the event loop."""

    def __init__(self, slot: Slot, prep: Prepared, req: GenRequest):
        self.slot, self.prep, self.req = slot, prep, req
        self.job = Job()
        self.loop = asyncio.get_running_loop()
        self._q: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._work, name="serve-generate", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            slot.release()
            raise

    def _post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass

    def _work(self) -> None:
        try:
            for ev in self.slot.engine.generate(self.prep, self.req, self.job):
                self._post(ev)
        except BaseException as e:  # noqa: BLE001 -- re-raised on the loop side
            self._post(e)
        finally:
            try:
                self.loop.call_soon_threadsafe(self.slot.release)
            except RuntimeError:
                pass
            self._post(_DONE)

    def cancel(self) -> None:
        self.job.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The events as they come; leaving early cancels the generation."""
        try:
            while True:
                item = await self._q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.job.cancel()
