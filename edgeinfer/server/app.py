"""The Starlette app of ``edgeinfer serve``: both APIs' routes, the API key, body limits, error shapes.

Every route goes through :func:`endpoint`, which checks the key, reads a bounded JSON body and turns
every failure into that API's error shape -- OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` under ``/v1``, Ollama's ``{"error": "..."}`` under ``/api`` -- never a traceback.
Streams (SSE for OpenAI, NDJSON for Ollama) start only once the first token is there, so a failure
before it still gets its HTTP status; a client that goes away cancels its generation at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgeinfer import __version__
from edgeinfer.errors import BackendCrashedError, EdgeinferError, TemplateError
from edgeinfer.server import ollama_api, openai_api
from edgeinfer.server.bridge import Generation
from edgeinfer.server.pool import ModelPool, parse_duration
from edgeinfer.server.request import ApiError, expect

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 8 * 2**20


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def as_api_error(e: BaseException) -> ApiError:
    """Any failure -> the ApiError to answer with (tracebacks only go to the log)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BackendCrashedError):
        return ApiError(500, f"the model process crashed: {e}; the next request starts a new one", None,
                        "model_crashed")
    if isinstance(e, TemplateError):
        return ApiError(400, str(e), "messages", "template_error")
    if isinstance(e, EdgeinferError):
        return ApiError(500, str(e), None, "backend_error")
    log.error("internal error", exc_info=e)
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log", None, "internal_error")


def error_response(api: str, e: ApiError) -> JSONResponse:
    body = e.openai_body() if api == "openai" else {"error": e.message}
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past ``limit`` bytes, 400 if it is not a JSON object."""
    n = request.headers.get("content-length")
    if n is not None:
        if not n.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(n) > limit:
            raise ApiError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes (serve --max-body)",
                           None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes (serve --max-body)", None,
                           "request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    return body


async def until_disconnect(request: Request, aw: Awaitable):
    """Await ``aw``, cancelling it (and raising :class:`ClientGone`) if the client disconnects first."""
    task = asyncio.ensure_future(aw)

    async def gone() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 -- its cancellation or failure does not matter any more
        pass
    raise ClientGone()


class WatchedStream(Response):
    """Streams ``chunks`` (bytes) and stops them the moment the client disconnects."""

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str):
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.raw_headers = [(b"content-type", media_type.encode("latin-1")), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]  # no content-length: the body is streamed
        self.chunks = chunks

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def pump() -> None:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone() -> None:
            while True:
                if (await receive())["type"] == "http.disconnect":
                    return

        task, watcher = asyncio.ensure_future(pump()), asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                if not t.done():
                    t.cancel()
            for t in (task, watcher):
                try:
                    await t
                except (asyncio.CancelledError, OSError):
                    pass
            await self.chunks.aclose()
        if task in done and task.exception() is not None and not isinstance(task.exception(), OSError):
            raise task.exception()


class Server:
    """Routes bound to one :class:`ModelPool`."""

    def __init__(self, pool: ModelPool, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY):
        self.pool, self.api_key, self.max_body = pool, api_key, max_body

    # -- plumbing --------------------------------------------------------------------------------
    def endpoint(self, api: str, handler: Callable, needs_body: bool = True, auth: bool = True):
        async def route(request: Request) -> Response:
            try:
                if auth and self.api_key:
                    self._check_key(request)
                body = await read_json(request, self.max_body) if needs_body else None
                return await (handler(request, body) if needs_body else handler(request))
            except ClientGone:
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001 -- every failure becomes an error answer, never a traceback
                return error_response(api, as_api_error(e))

        return route

    def _check_key(self, request: Request) -> None:
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", None,
                           "invalid_api_key")

    async def _start(self, request: Request, req, keep_alive=None):
        """Wait for a slot (the client may leave meanwhile), prepare the prompt, start the generation."""
        slot = await until_disconnect(request, self.pool.acquire(req.model, keep_alive))
        try:
            prep = slot.engine.prepare(req)
        except BaseException:
            slot.release()
            raise
        return slot, prep, Generation(slot, prep, req)

    @staticmethod
    async def _first(request: Request, gen: Generation):
        """The first event (after the prefill): failures before it still get their HTTP status."""
        it = gen.events().__aiter__()
        try:
            first = await until_disconnect(request, it.__anext__())
        except BaseException:
            gen.cancel()
            raise
        return it, first

    # -- OpenAI ----------------------------------------------------------------------------------
    async def v1_models(self, request: Request) -> Response:
        return JSONResponse(openai_api.model_list(self.pool))

    async def v1_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        self.pool.lookup(name)
        return JSONResponse(next(m for m in openai_api.model_list(self.pool)["data"]
                                 if m["id"] == self.pool.lookup(name).name))

    async def v1_chat(self, request: Request, body: dict) -> Response:
        return await self._openai(request, body, openai_api.chat_request(body), chat=True)

    async def v1_completions(self, request: Request, body: dict) -> Response:
        return await self._openai(request, body, openai_api.completion_request(body), chat=False)

    async def _openai(self, request: Request, body: dict, req, chat: bool) -> Response:
        stream = expect(body, "stream", (bool,), False)
        include_usage = openai_api.stream_options(body) if stream else False
        echo = expect(body, "echo", (bool,), False) if not chat else False
        slot, prep, gen = await self._start(request, req)
        reply = openai_api.Reply(slot.engine, req, gen.job, len(prep.tokens), chat,
                                 echo=req.prompt if echo else "")
        it, first = await self._first(request, gen)
        if not stream:
            async def collect():
                reply.push(first)
                async for ev in it:
                    reply.push(ev)
                return reply.full()

            try:
                return JSONResponse(await until_disconnect(request, collect()))
            finally:
                gen.cancel()

        def sse(obj) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"

        async def chunks():
            try:
                if chat:
                    yield sse(reply.chunk("", role=True, include_usage=include_usage))
                elif echo:
                    yield sse(reply.chunk(req.prompt, include_usage=include_usage))
                text = reply.push(first)
                if text:
                    yield sse(reply.chunk(text, include_usage=include_usage))
                async for ev in it:
                    text = reply.push(ev)
                    if text:
                        yield sse(reply.chunk(text, include_usage=include_usage))
                yield sse(reply.chunk(None if chat else "", finish=True, include_usage=include_usage))
                if include_usage:
                    yield sse(reply.usage_chunk())
            except Exception as e:  # noqa: BLE001 -- the status is sent; report the error in the stream
                yield sse(as_api_error(e).openai_body())
            finally:
                gen.cancel()
            yield b"data: [DONE]\n\n"

        return WatchedStream(chunks(), "text/event-stream")

    # -- Ollama ----------------------------------------------------------------------------------
    async def root(self, request: Request) -> Response:
        return PlainTextResponse("edgeinfer is running (OpenAI API under /v1, Ollama API under /api)")

    async def api_version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def api_tags(self, request: Request) -> Response:
        return JSONResponse(ollama_api.tags(self.pool))

    async def api_ps(self, request: Request) -> Response:
        return JSONResponse(ollama_api.ps(self.pool))

    async def api_show(self, request: Request, body: dict) -> Response:
        return JSONResponse(ollama_api.show(self.pool, body))

    async def api_chat(self, request: Request, body: dict) -> Response:
        return await self._ollama(request, body, ollama_api.chat_request(body), chat=True)

    async def api_generate(self, request: Request, body: dict) -> Response:
        return await self._ollama(request, body, ollama_api.generate_request(body), chat=False)

    async def _ollama(self, request: Request, body: dict, req, chat: bool) -> Response:
        stream = expect(body, "stream", (bool,), True)
        keep_alive = parse_duration(body["keep_alive"]) if body.get("keep_alive") is not None else None
        if req is None:  # no prompt: load (or, with keep_alive 0, unload) the model
            name = body.get("model")
            m = self.pool.lookup(name)
            if keep_alive == 0:
                self.pool.unload(name)
                return JSONResponse(ollama_api.load_reply(name, chat, "unload"))
            if keep_alive is not None:
                m.keep_alive = keep_alive
            await until_disconnect(request, self.pool.ensure_loaded(m))
            return JSONResponse(ollama_api.load_reply(name, chat))
        slot, prep, gen = await self._start(request, req, keep_alive)
        reply = ollama_api.Reply(slot.engine, req, gen.job, prep.tokens, chat, slot.load_s)
        it, first = await self._first(request, gen)
        if not stream:
            async def collect():
                reply.push(first)
                async for ev in it:
                    reply.push(ev)
                return reply.final(reply.text)

            try:
                return JSONResponse(await until_disconnect(request, collect()))
            finally:
                gen.cancel()

        def line(obj) -> bytes:
            return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"

        async def chunks():
            try:
                text = reply.push(first)
                if text:
                    yield line(reply.fragment(text))
                async for ev in it:
                    text = reply.push(ev)
                    if text:
                        yield line(reply.fragment(text))
                yield line(reply.final())
            except Exception as e:  # noqa: BLE001 -- the status is sent; report the error in the stream
                yield line({"error": as_api_error(e).message})
            finally:
                gen.cancel()

        return WatchedStream(chunks(), "application/x-ndjson")

    # -- the app ---------------------------------------------------------------------------------
    def app(self) -> Starlette:
        e = self.endpoint
        routes = [
            Route("/", e("ollama", self.root, needs_body=False, auth=False), methods=["GET", "HEAD"]),
            Route("/v1/models", e("openai", self.v1_models, needs_body=False), methods=["GET"]),
            Route("/v1/models/{model:path}", e("openai", self.v1_model, needs_body=False), methods=["GET"]),
            Route("/v1/chat/completions", e("openai", self.v1_chat), methods=["POST"]),
            Route("/v1/completions", e("openai", self.v1_completions), methods=["POST"]),
            Route("/api/version", e("ollama", self.api_version, needs_body=False), methods=["GET"]),
            Route("/api/tags", e("ollama", self.api_tags, needs_body=False), methods=["GET"]),
            Route("/api/ps", e("ollama", self.api_ps, needs_body=False), methods=["GET"]),
            Route("/api/show", e("ollama", self.api_show), methods=["POST"]),
            Route("/api/chat", e("ollama", self.api_chat), methods=["POST"]),
            Route("/api/generate", e("ollama", self.api_generate), methods=["POST"]),
        ]

        async def not_found(request: Request, exc) -> Response:
            api = "openai" if request.url.path.startswith("/v1") else "ollama"
            status = getattr(exc, "status_code", 404)
            msg = "method not allowed" if status == 405 else f"no such endpoint: {request.method} {request.url.path}"
            return error_response(api, ApiError(status, msg))

        async def lifespan(app):
            reaper = asyncio.ensure_future(self.pool.reap_forever())
            try:
                yield
            finally:
                reaper.cancel()
                await asyncio.to_thread(self.pool.close)

        from contextlib import asynccontextmanager

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                         lifespan=asynccontextmanager(lifespan))
