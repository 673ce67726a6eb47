"""The HTTP JSON API over a serving engine (FastAPI; run it with uvicorn).

Endpoints:

- `POST /v1/completions`: `{"prompt", "adapter", "max_tokens",
  "temperature", "top_k", "top_p", "seed"}` -> an OpenAI-style completion
  (`id`, `object`, `model`, `adapter`, `choices`, `usage`).
- `GET /v1/adapters`: the registered adapters.
- `POST /v1/adapters`: `{"name", "path"}` loads a `kl.save_adapter`
  directory under `name`.
- `DELETE /v1/adapters/{name}`: unregisters an adapter.
- `GET /health`: liveness and scheduler counters.

Errors answer `{"error": {"message", "type", "param", "code"}}`, with
`param` the field the error is about (`"top_k"`, `"prompt"`, `"path"`,
`"body"`, ...; null when none is), and a 4xx status for anything a client
sends: 400 malformed JSON or a request the engine refuses, 404 unknown
adapter, 409 duplicate adapter name, 413 body too large, 422 wrong,
missing or out-of-range fields and unloadable adapter directories, 429
queue full. 500 is kept for the server's own failures; none of them stops
the server.

Request bodies are read no further than `max_body_bytes`, with or without
a Content-Length: past the limit the answer is 413 at once, and nothing
past it is kept or parsed. A chunked body (no Content-Length) that passes
the limit is not read any further at all: the connection closes.

Example:

```python
app = create_app(Engine.from_preset("gpt2_preset_dir"), max_queue=64)
uvicorn.run(app, host="127.0.0.1", port=8000)
```
"""

import asyncio
import contextlib
import logging
import os
import time
import uuid

import fastapi
import pydantic
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from keras_lora.serving import errors
from keras_lora.serving.checks import MAX_SEED
from keras_lora.serving.engine import MAX_TEMPERATURE, CompletionRequest
from keras_lora.serving.scheduler import QueueFullError, Scheduler

logger = logging.getLogger(__name__)

# Adapter names travel in URL paths (`DELETE /v1/adapters/{name}`).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class CompletionBody(pydantic.BaseModel):
    """The JSON body of `POST /v1/completions` (strict types, bounded).

    The engine checks what depends on the model (prompt length, room for
    `max_tokens`, `top_k` up to the vocabulary size).
    """

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")

    prompt: str
    adapter: str | None = pydantic.Field(None, max_length=128)
    max_tokens: int = pydantic.Field(16, ge=1)
    temperature: float = pydantic.Field(
        0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False
    )
    top_k: int | None = pydantic.Field(None, ge=1)
    top_p: float | None = pydantic.Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False
    )
    seed: int | None = pydantic.Field(None, ge=0, le=MAX_SEED)


class AdapterBody(pydantic.BaseModel):
    """The JSON body of `POST /v1/adapters`."""

    model_config = pydantic.ConfigDict(strict=True, extra="forbid")

    name: str = pydantic.Field(pattern=ADAPTER_NAME_PATTERN)
    path: str = pydantic.Field(min_length=1, max_length=4096)


class ApiError(Exception):
    """An error answered as JSON with `status`."""

    def __init__(self, status, message, kind, param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = (
            status,
            message,
            kind,
            param,
        )


def error_response(status, message, kind, param=None, headers=None):
    body = {
        "error": {
            "message": _printable(message, 4000),
            "type": kind,
            "param": None if param is None else _printable(param, 200),
            "code": status,
        }
    }
    return responses.JSONResponse(body, status_code=status, headers=headers)


def _printable(text, limit):
    """`text` cut to `limit` characters, with anything UTF-8 cannot encode
    (a client's lone surrogates) escaped, so the answer always encodes."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _message(error):
    # KeyError's str() quotes its argument; show the message itself.
    if isinstance(error, KeyError) and len(error.args) == 1:
        return str(error.args[0])
    return str(error) or type(error).__name__


class BodyLimit:
    """ASGI middleware: reads a request body no further than `max_bytes`.

    A Content-Length over the limit gets 413 before any of the body is
    read (uvicorn then discards the declared rest without keeping it, so
    the client reads the answer and may reuse the connection). A body
    without one (chunked) is read chunk by chunk and gets 413 as soon as
    it passes the limit; it has no declared end, so the rest is never read
    and the connection closes. A body within the limit goes to the app as
    read. Plain ASGI (not `@app.middleware`, which would add a task and a
    stream per request).
    """

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None:
            response = self._check(length.decode("latin-1"))
            if response is not None:
                return await response(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                # No declared end: the rest is never read, the connection
                # closes after the answer.
                response = self._too_large(
                    f"more than {self.max_bytes}", {"Connection": "close"}
                )
                return await response(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _check(self, length):
        if not length.isdigit():
            return error_response(
                400,
                "Invalid Content-Length header.",
                "invalid_request",
                "Content-Length",
            )
        if int(length) > self.max_bytes:
            return self._too_large(length)
        return None

    def _too_large(self, size, headers=None):
        return error_response(
            413,
            f"Request body of {size} bytes exceeds the limit of "
            f"{self.max_bytes} bytes.",
            "body_too_large",
            "body",
            headers=headers,
        )


# The request field an engine error is about, when it does not say.
_DEFAULT_PARAM = {
    errors.UnknownAdapterError: "adapter",
    errors.AdapterLoadError: "path",
}


def _engine_error(error, action, param=None):
    """Maps an exception from an engine call to an `ApiError`."""
    if isinstance(error, errors.ServingError):
        param = error.param or param or _DEFAULT_PARAM.get(type(error))
    if isinstance(error, errors.UnknownAdapterError):
        return ApiError(404, _message(error), "unknown_adapter", param)
    if isinstance(error, errors.AdapterLoadError):
        return ApiError(422, _message(error), "adapter_load_error", param)
    if isinstance(error, errors.RequestError):
        return ApiError(400, _message(error), "invalid_request", param)
    logger.error("%s failed", action, exc_info=error)
    return ApiError(
        500,
        f"{action} failed: {type(error).__name__}: {_message(error)}",
        "internal_error",
    )


def _field(location):
    """`("body", "top_k")` -> `"top_k"`; the body itself -> `"body"`."""
    parts = [_printable(p, 64) for p in location if p != "body"]
    return ".".join(parts) or "body"


def create_app(
    engine,
    *,
    model_name="keras-lora",
    max_batch=None,
    max_queue=64,
    batch_window=0.005,
    max_body_bytes=1 << 20,
    adapters=None,
):
    """A FastAPI app serving `engine`; its scheduler runs while it is up.

    Args:
        engine: a `keras_lora.serving.Engine` (or an object with its
            methods). The app's scheduler thread makes every call to it.
        model_name: the `model` reported in completions.
        max_batch: most requests per engine pass (default
            `engine.max_batch`; 1 disables batching).
        max_queue: most completion requests queued or running; more get
            429.
        batch_window: seconds to wait for more requests to batch.
        max_body_bytes: larger request bodies get 413.
        adapters: `{name: directory}` loaded (on the scheduler's thread)
            when the app starts; a failure stops the start-up.

    The scheduler is `app.state.scheduler`; it starts and stops with the
    app (ASGI lifespan), e.g. under `uvicorn.run(app)`.
    """
    scheduler = Scheduler(
        engine,
        max_batch=max_batch,
        max_queue=max_queue,
        batch_window=batch_window,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            for name, directory in (adapters or {}).items():
                await asyncio.wrap_future(
                    scheduler.call(engine.load_adapter, name, directory)
                )
                logger.info("Loaded adapter %r from %s", name, directory)
            yield
        finally:
            # Queued work finishes first; waiting clients get answers.
            await asyncio.to_thread(scheduler.stop)

    app = fastapi.FastAPI(
        title="keras-lora serve",
        description="Many LoRA adapters on one base model.",
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.engine = engine

    async def on_worker(action, fn, *args, param=None):
        try:
            return await asyncio.wrap_future(scheduler.call(fn, *args))
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status
            raise _engine_error(error, action, param) from error

    # -- error handlers ----------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_request, error):
        return error_response(
            error.status, error.message, error.kind, error.param
        )

    @app.exception_handler(fastapi_exceptions.RequestValidationError)
    async def _validation_error(_request, error):
        problems = error.errors()
        for problem in problems:
            if problem.get("type") == "json_invalid":
                detail = problem.get("ctx", {}).get("error", "")
                return error_response(
                    400,
                    f"Malformed JSON body: {detail}".rstrip(": "),
                    "invalid_json",
                    "body",
                )
        if problems and tuple(problems[0].get("loc", ())) == ("body",):
            if problems[0].get("type") == "string_unicode":
                return error_response(
                    422,
                    "Invalid request: a key of the body is not valid "
                    "Unicode text (it holds a lone surrogate).",
                    "invalid_request",
                    "body",
                )
            if problems[0].get("type") != "missing":
                return error_response(
                    422,
                    "The request body must be a JSON object (send it with "
                    "Content-Type: application/json).",
                    "invalid_request",
                    "body",
                )
        messages = []
        for problem in problems[:10]:
            field = _field(problem.get("loc", ()))
            messages.append(f"{field}: {problem.get('msg')}")
        first = _field(problems[0].get("loc", ())) if problems else None
        return error_response(
            422,
            "Invalid request: " + "; ".join(messages),
            "invalid_request",
            first,
        )

    @app.exception_handler(starlette_exceptions.HTTPException)
    async def _http_error(_request, error):
        # FastAPI answers 400 for a body it cannot parse (e.g. JSON nested
        # too deep); other statuses here are about the URL or method.
        param = "body" if error.status_code == 400 else None
        return error_response(
            error.status_code,
            str(error.detail),
            "http_error",
            param,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(_request, error):
        # Anything unexpected still answers JSON in the usual shape.
        logger.error("Unhandled error", exc_info=error)
        return error_response(
            500,
            f"Internal error: {type(error).__name__}: {_message(error)}",
            "internal_error",
        )

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    # -- endpoints -----------------------------------------------------------

    @app.get("/health")
    async def health():
        alive = scheduler.alive
        body = {
            "status": "ok" if alive else "unavailable",
            "model": model_name,
            "admitted": scheduler.admitted,
            "max_queue": scheduler.max_queue,
            "max_batch": scheduler.max_batch,
            **scheduler.stats,
        }
        return responses.JSONResponse(body, status_code=200 if alive else 503)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        request = CompletionRequest(**body.model_dump())
        try:
            future = scheduler.submit(request)
        except QueueFullError as error:
            return error_response(
                429, str(error), "queue_full", headers={"Retry-After": "1"}
            )
        try:
            completion = await asyncio.wrap_future(future)
        except Exception as error:  # noqa: BLE001 - mapped to a status
            raise _engine_error(error, "Completion") from error
        prompt_tokens = int(completion.prompt_tokens)
        completion_tokens = int(completion.completion_tokens)
        body = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "adapter": completion.adapter,
            "choices": [
                {
                    "index": 0,
                    "text": completion.text,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        # A response object skips FastAPI's generic encoder: the body is
        # plain JSON types already.
        return responses.JSONResponse(body)

    @app.get("/v1/adapters")
    async def list_adapters():
        adapters = await on_worker("Listing adapters", engine.list_adapters)
        return {"object": "list", "data": adapters}

    def load_new(name, path):
        # Runs on the worker, so nothing can register `name` in between.
        if any(a["name"] == name for a in engine.list_adapters()):
            raise ApiError(
                409,
                f"An adapter named {name!r} is already loaded; delete it "
                "first or choose another name.",
                "adapter_exists",
                "name",
            )
        return engine.load_adapter(name, path)

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: AdapterBody):
        if not os.path.isdir(body.path):
            raise ApiError(
                422,
                f"Adapter path {body.path!r} is not a directory (expected "
                "a directory written by keras_lora.save_adapter).",
                "adapter_load_error",
                "path",
            )
        return await on_worker(
            "Loading adapter", load_new, body.name, body.path, param="path"
        )

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        await on_worker(
            "Unloading adapter", engine.unload_adapter, name, param="name"
        )
        return {"name": name, "deleted": True}

    return app
