"""The FastAPI application: routes, API key, body limit, error shapes, disconnects, metrics.

Routes read the raw body themselves (bounded by max_body_bytes) and validate it by hand, so a bad
request always gets a 4xx in the error shape of the route's dialect, never FastAPI's generic 422
or a 500. A streaming response that loses its client is cancelled by Starlette; the generator's
cleanup cancels the engine request, freeing its sequence slot. A non-streaming request watches
for the disconnect itself for the same reason. A client that leaves while still sending its body
is no error either: each of these is counted as a 499 (nginx's "client closed request").
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hybrid.serve import anthropic_requests, anthropic_responses, openai_requests, openai_responses
from hybrid.serve.backend import Backend, RunEnded
from hybrid.serve.config import ServeConfig
from hybrid.serve.errors import ApiError, dialect_of, error_body
from hybrid.serve.fields import parse_json_body

log = logging.getLogger("hybrid.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_api_key(request: Request, key: str | None) -> None:
    """OpenAI clients send `Authorization: Bearer KEY`, Anthropic clients `x-api-key: KEY`;
    either is accepted on every route."""
    if key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                       code="invalid_api_key")


async def until_disconnect(request: Request, work) -> tuple[bool, object]:
    """Run coroutine `work`; if the client disconnects first, cancel it. -> (disconnected, result)."""
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return False, task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return True, None


def create_app(backend: Backend, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = backend.metrics
    model_created = int(time.time())

    def error_response(err: ApiError, dialect: str, route: str) -> JSONResponse:
        metrics.count_request(route, err.status)
        return JSONResponse(error_body(err, dialect), status_code=err.status)

    def client_gone(route: str) -> Response:
        metrics.cancelled += 1
        metrics.count_request(route, 499)  # nginx's "client closed request"; nobody reads it
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes and wrong methods, in the caller's dialect.
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return error_response(err, dialect_of(request.url.path), "other")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        err = ApiError(500, f"internal server error: {type(exc).__name__}: {exc}")
        return error_response(err, dialect_of(request.url.path), "other")

    async def generate(request: Request, route: str, dialect: str, parse, respond, stream_respond, id_prefix):
        try:
            check_api_key(request, config.api_key)
            body = parse_json_body(await read_body(request, config.max_body_bytes))
            job, opts = parse(body, config.model_name, config.max_tokens)
            # Templating and tokenizing a long prompt takes a while: off the event loop, so the
            # other streams keep flowing meanwhile.
            run = await asyncio.to_thread(backend.start, job)
        except ApiError as err:
            return error_response(err, dialect, route)
        except ClientDisconnect:  # left while sending the body
            return client_gone(route)
        metrics.prompt_tokens += run.prompt_tokens  # here, on the event loop, like every counter
        run.request_id = openai_responses.new_id(id_prefix)
        if config.log_requests:
            log.info("%s %s prompt=%d stream=%s", route, run.request_id, run.prompt_tokens, opts.stream)
        if opts.stream:
            metrics.count_request(route, 200)
            return StreamingResponse(_guard(stream_respond(run, job, opts), run, dialect, metrics),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            gone, result = await until_disconnect(request, respond(run, job, opts))
        except RunEnded as e:  # the server is shutting down and its grace period is over
            return error_response(ApiError(503, str(e)), dialect, route)
        finally:
            if not run.done:
                run.cancel()
        if gone:
            return client_gone(route)
        metrics.count_request(route, 200)
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat_completions", "openai", openai_requests.parse_chat_request,
                              openai_responses.chat_response, openai_responses.chat_stream, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions", "openai", openai_requests.parse_completion_request,
                              openai_responses.completion_response, openai_responses.completion_stream, "cmpl")

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await generate(request, "messages", "anthropic", anthropic_requests.parse_request,
                              anthropic_responses.message_response, anthropic_responses.message_stream, "msg")

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            check_api_key(request, config.api_key)
            body = parse_json_body(await read_body(request, config.max_body_bytes))
            job, _ = anthropic_requests.parse_request(body, config.model_name, config.max_tokens, count_only=True)
            ids, _ = await asyncio.to_thread(backend.render_prompt, job)
        except ApiError as err:
            return error_response(err, "anthropic", "count_tokens")
        except ClientDisconnect:
            return client_gone("count_tokens")
        metrics.count_request("count_tokens", 200)
        return {"input_tokens": len(ids)}

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": model_created, "owned_by": "hybrid",
                "max_model_len": backend.context_length,
                # Anthropic's /v1/models fields, so its SDK can list the model too
                "type": "model", "display_name": config.model_name,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model_created))}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(request: Request, model_id: str):
        try:
            check_api_key(request, config.api_key)
            if model_id != config.model_name:
                raise ApiError(404, f"The model '{model_id}' does not exist; this server serves '{config.model_name}'",
                               code="model_not_found")
        except ApiError as err:
            return error_response(err, "openai", "models")
        metrics.count_request("models", 200)
        return model_card()

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_api_key(request, config.api_key)
        except ApiError as err:
            return error_response(err, "openai", "models")
        metrics.count_request("models", 200)
        return {"object": "list", "data": [model_card()],
                "first_id": config.model_name, "last_id": config.model_name, "has_more": False}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name}

    @app.get("/metrics")
    async def prometheus(request: Request):
        try:
            check_api_key(request, config.api_key)
        except ApiError as err:
            return error_response(err, "openai", "metrics")
        return PlainTextResponse(metrics.render(backend.gauges()), media_type="text/plain; version=0.0.4")

    return app


async def _guard(chunks, run, dialect: str, metrics):
    """Wrap a streaming body: a failure mid-stream, or the end of a shutdown's grace period,
    becomes a final error event (headers are already sent, so no status code can say it), and
    leaving early cancels the engine request."""
    from hybrid.engine.request import GenerationError

    failed = False
    try:
        async for chunk in chunks:
            yield chunk
    except (GenerationError, RunEnded) as e:
        failed = True
        if isinstance(e, RunEnded):  # shutting down, after the grace period
            err = ApiError(503, str(e))
        else:
            log.error("generation failed for %s: %s", run.request_id, e)
            err = ApiError(500, f"generation failed: {e}")
        body = error_body(err, dialect)
        if dialect == "anthropic":
            yield anthropic_responses.error_event(body)
        else:  # an error chunk, then the end every OpenAI stream has
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
    finally:
        if not run.done and not failed:  # the client left before the end
            metrics.cancelled += 1
            run.cancel()
