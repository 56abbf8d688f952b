"""The served models: loaded on first use, several at once within a memory budget, the least recently
used idle one unloaded first, each unloaded after ``keep_alive`` idle (Ollama's ``--keep-alive``).

In front of every engine sits a fair queue: at most ``parallel`` requests hold a slot, the next
``max_queue`` wait in arrival order, and a request past that is refused with 503 at once.
All of it runs on the event loop (asyncio), so no locks are needed here; loading runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer.backend import LoadOptions
from edgeinfer.server.engines import Engine, load_engine
from edgeinfer.server.request import ApiError

log = logging.getLogger(__name__)

FOREVER = -1.0


def parse_duration(v, param: str = "keep_alive") -> float:
    """Ollama's keep-alive: seconds as a number, or ``"5m"``, ``"1h30m"``, ``"90s"``, ``"-1"``; negative = forever."""
    if isinstance(v, bool):
        raise ApiError(400, f"'{param}' must be a duration like \"5m\" or a number of seconds", param)
    if isinstance(v, (int, float)):
        return FOREVER if v < 0 else float(v)
    if isinstance(v, str):
        s = v.strip()
        try:
            f = float(s)
            return FOREVER if f < 0 else f
        except ValueError:
            pass
        if s.startswith("-"):
            return FOREVER
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", s)
        if parts and "".join(a + b for a, b in parts) == s:
            unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
            return sum(float(a) * unit[b] for a, b in parts)
    raise ApiError(400, f"'{param}' must be a duration like \"5m\" or a number of seconds (got {v!r})", param)


@dataclass
class Served:
    """One model the server offers: its name, file, and (when loaded) its engine and slot queue."""

    name: str
    path: Path
    engine: Engine | None = None
    loading: asyncio.Future | None = None
    active: int = 0
    waiters: deque = field(default_factory=deque)
    last_used: float = 0.0
    keep_alive: float = 300.0
    loaded_at: float = 0.0

    @property
    def expires_at(self) -> float:
        """Wall-clock time when an idle model will be unloaded (inf = never)."""
        return float("inf") if self.keep_alive < 0 else self.last_used + self.keep_alive


class Slot:
    """A held engine slot; ``release()`` (idempotent) hands it to the next waiter."""

    def __init__(self, pool: "ModelPool", served: Served, load_s: float):
        self.pool, self.served, self.engine, self.load_s = pool, served, served.engine, load_s
        self._done = False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self.pool._release(self.served)


class ModelPool:
    """The models of one server (see the module docstring).

    Args:
        models: served name -> GGUF path.
        backend: ``llama.cpp`` or ``torch``.
        opts: load options (context, threads...).
        parallel: slots per engine (sequences decoded together).
        max_queue: requests that may wait per engine beyond the slots.
        keep_alive: default idle seconds before unloading (negative = never).
        memory_budget: bytes the loaded models may take together (estimated from file sizes / RSS).
        max_loaded: at most this many models loaded at once.
    """

    def __init__(self, models: dict[str, Path], backend: str, opts: LoadOptions, parallel: int = 1,
                 max_queue: int = 16, keep_alive: float = 300.0, memory_budget: int = 0, max_loaded: int = 0):
        self.models = {n: Served(n, Path(p), keep_alive=keep_alive) for n, p in models.items()}
        self.backend, self.opts, self.parallel = backend, opts, parallel
        self.max_queue, self.keep_alive = max_queue, keep_alive
        self.memory_budget, self.max_loaded = memory_budget, max_loaded
        self._closing: list = []  # engine.close() calls running in threads

    # -- names -----------------------------------------------------------------------------------
    def lookup(self, name) -> Served:
        """The served model called ``name`` (``NAME:latest`` too); 404 otherwise."""
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required", "model", "missing_model")
        m = self.models.get(name) or (self.models.get(name[: -len(":latest")]) if name.endswith(":latest") else None)
        if m is None:
            raise ApiError(404, f"model {name!r} is not served here; available: {', '.join(self.models)}", "model",
                           "model_not_found")
        return m

    # -- slots -----------------------------------------------------------------------------------
    async def acquire(self, name: str, keep_alive: float | None = None) -> Slot:
        """Load the model if needed, then wait (fairly, boundedly) for one of its slots."""
        m = self.lookup(name)
        if keep_alive is not None:
            m.keep_alive = keep_alive
        t0 = time.perf_counter()
        await self.ensure_loaded(m)
        load_s = time.perf_counter() - t0
        if m.active < m.engine.parallel and not m.waiters:
            m.active += 1
        else:
            if len(m.waiters) >= self.max_queue:
                raise ApiError(503, f"server busy: {m.active} requests running and {len(m.waiters)} waiting for "
                                    f"{m.name}; retry later", None, "overloaded")
            fut = asyncio.get_running_loop().create_future()
            m.waiters.append(fut)
            try:
                await fut  # _release hands us its slot (active stays counted)
            except asyncio.CancelledError:
                if fut in m.waiters:
                    m.waiters.remove(fut)
                elif fut.done() and not fut.cancelled():
                    self._release(m)  # the slot arrived as we were cancelled: pass it on
                raise
        m.last_used = time.time()
        return Slot(self, m, load_s)

    def _release(self, m: Served) -> None:
        m.last_used = time.time()
        while m.waiters:
            fut = m.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        m.active -= 1
        if m.active == 0 and m.keep_alive == 0:
            self._unload(m)

    # -- loading ---------------------------------------------------------------------------------
    def loaded(self) -> list[Served]:
        return [m for m in self.models.values() if m.engine is not None]

    async def ensure_loaded(self, m: Served) -> None:
        while m.engine is None:
            if m.loading is not None:
                await asyncio.shield(m.loading)
                continue
            m.loading = asyncio.get_running_loop().create_future()
            try:
                self._make_room(m)
                engine = await asyncio.to_thread(load_engine, self.backend, m.name, m.path, self.opts, self.parallel)
                m.engine, m.loaded_at, m.last_used = engine, time.time(), time.time()
                log.info("loaded %s (%s) with %s", m.name, m.path, engine.kind)
                m.loading.set_result(None)
            except BaseException as e:
                m.loading.set_result(None)  # waiters retry (and see the same error)
                raise e
            finally:
                m.loading = None

    def _estimate(self, m: Served) -> int:
        return m.engine.memory_bytes() if m.engine is not None else m.path.stat().st_size

    def _make_room(self, m: Served) -> None:
        """Unload idle models, least recently used first, until ``m`` fits the budget and the count."""
        need = m.path.stat().st_size

        def over() -> bool:
            loaded = self.loaded()
            if self.max_loaded and len(loaded) + 1 > self.max_loaded:
                return True
            return bool(self.memory_budget) and loaded and sum(map(self._estimate, loaded)) + need > self.memory_budget

        while over():
            idle = sorted((x for x in self.loaded() if x.active == 0 and not x.waiters), key=lambda x: x.last_used)
            if not idle:
                raise ApiError(503, f"cannot load {m.name}: the memory budget is taken by models serving requests; "
                                    "retry later", None, "overloaded")
            self._unload(idle[0])

    def _unload(self, m: Served, wait: bool = False) -> None:
        """Forget ``m``'s engine and close it -- in a thread unless ``wait`` (stopping a runner can take
        seconds, and the event loop must keep serving the other models meanwhile)."""
        engine, m.engine = m.engine, None
        if engine is None:
            return
        log.info("unloading %s", m.name)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if wait or loop is None:
            engine.close()
        else:
            self._closing.append(loop.run_in_executor(None, engine.close))

    async def wait_closed(self) -> None:
        """Wait until every engine unloaded so far is closed."""
        pending, self._closing = self._closing, []
        if pending:
            await asyncio.gather(*pending)

    def unload(self, name: str) -> None:
        """Unload ``name`` now if it is idle (Ollama's ``keep_alive: 0`` with an empty prompt)."""
        m = self.lookup(name)
        if m.active == 0:
            self._unload(m)
        else:
            m.keep_alive = 0

    # -- keep-alive ------------------------------------------------------------------------------
    async def reap_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.reap()

    def reap(self) -> None:
        now = time.time()
        for m in self.loaded():
            if m.active == 0 and not m.waiters and m.expires_at <= now:
                self._unload(m)

    def close(self) -> None:
        """Close every engine now (server shutdown)."""
        for m in self.loaded():
            self._unload(m, wait=True)
