"""The HTTP API and web page of `t5qa serve`: FastAPI with server-side micro-batching.

Concurrent requests are answered together: each request puts a job on an asyncio queue, and one worker task
collects jobs for up to `max_wait_ms` (or until `max_batch_size` pairs are waiting), runs the model once for
all of them in a single background thread, and hands each request its own answers. While the model runs, new
requests queue up and form the next batch, so under load every model call is a full batch. Requests asking
for different generation options are never mixed in one model call.

Safety: every limit in `ServeLimits` is checked before the model sees a request (4xx with a JSON
`{"error": "..."}` that says what to change); the request body is counted while it streams in, so a client
cannot make the server buffer more than `max_request_bytes`; an optional API key is compared in constant time
and never logged; an exception in the model fails only the request(s) that caused it.
"""

import asyncio
import hmac
import json
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

from t5qa.config import GenerateConfig, ServeLimits
from t5qa.errors import ConfigError, T5QAError, require

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from t5qa.predict import Predictor

logger = logging.getLogger(__name__)

__all__ = ["ServeLimits", "create_app", "create_app_from_dir", "MicroBatcher", "STATIC_DIR", "GENERATE_OPTIONS"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Generation options a request may set; each overrides the server's GenerateConfig for that request only.
GENERATE_OPTIONS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size")
# Paths served without the API key: the web page and its files (it asks the user for the key and sends it
# with every API call), and the API description. None of them hold data or reach the model.
OPEN_PATHS = ("/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/openapi.json")
OPEN_PREFIXES = ("/static/",)


# ----------------------------------------------------------------------------------------------------------
# Micro-batching


@dataclass
class BatchResult:
    """What one request gets back from the batcher."""

    answers: list[Any]
    model_seconds: float
    """Wall time of the model call that answered this request (shared with the rest of its batch)."""
    batch_pairs: int
    """Pairs in that model call, this request's included."""


@dataclass
class _Job:
    pairs: list[tuple[str, str]]
    options: tuple[tuple[str, Any], ...]
    future: asyncio.Future
    enqueued: float  # loop.time() in seconds


class MicroBatcher:
    """Collects concurrent requests into model calls of up to `max_batch_size` pairs.

    `answer_fn(pairs, options)` is the blocking model call; it runs in one dedicated thread so the event loop
    keeps accepting requests while the model works.
    """

    def __init__(self, answer_fn: Callable[[list[tuple[str, str]], dict[str, Any]], list[Any]], *,
                 max_batch_size: int = 32, max_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"--max-batch-size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
        self.answer_fn = answer_fn
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.batches_run = 0
        self.requests_served = 0
        self._queue: asyncio.Queue | None = None
        self._pending: deque[_Job] = deque()
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._waiting_pairs = 0  # submitted, not yet taken into a model call

    @property
    def queue_size(self) -> int:
        """Pairs waiting for the model (not counting the batch the model is working on)."""
        return self._waiting_pairs

    def start(self) -> None:
        """Start the worker task on the running event loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._worker is not None and not self._worker.done() and self._loop is loop:
            return
        # A new loop (e.g. a test client without its context manager) gets its own queue and worker.
        self._loop = loop
        self._queue = asyncio.Queue()
        self._pending = deque()
        self._waiting_pairs = 0
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t5qa-model")
        self._worker = loop.create_task(self._run(), name="t5qa-batcher")

    async def stop(self) -> None:
        """Cancel the worker and fail whatever is still waiting."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, pairs: Sequence[tuple[str, str]], options: dict[str, Any]) -> BatchResult:
        """Queue one request's pairs and wait for its answers (in the order of `pairs`)."""
        self.start()
        assert self._queue is not None and self._loop is not None
        future: asyncio.Future = self._loop.create_future()
        job = _Job(list(pairs), tuple(sorted(options.items())), future, self._loop.time())
        self._waiting_pairs += len(job.pairs)
        await self._queue.put(job)
        return await future

    async def _run(self) -> None:
        assert self._queue is not None and self._loop is not None
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            first = self._pending[0]
            # The wait is measured from when the oldest job arrived: a job that queued while the model was
            # busy with the previous batch goes into the next one without waiting again.
            deadline = first.enqueued + self.max_wait_ms / 1000.0
            while True:
                while not self._queue.empty():
                    self._pending.append(self._queue.get_nowait())
                if self._pairs_like(first.options) >= self.max_batch_size:
                    break
                timeout = deadline - self._loop.time()
                if timeout <= 0:
                    break
                try:
                    self._pending.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = self._take(first.options)
            if batch:
                try:
                    await self._answer(batch)
                except asyncio.CancelledError:
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(RuntimeError("the server is shutting down"))
                    raise
                except Exception as exc:  # pragma: no cover - _answer already routes model errors to futures
                    logger.exception("micro-batch worker error")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _pairs_like(self, options: tuple) -> int:
        return sum(len(j.pairs) for j in self._pending if j.options == options and not j.future.done())

    def _take(self, options: tuple) -> list[_Job]:
        """The oldest jobs with these options, up to max_batch_size pairs (always at least one job)."""
        batch: list[_Job] = []
        total = 0
        kept: deque = deque()
        for job in self._pending:
            if job.future.done():  # the client went away
                self._waiting_pairs -= len(job.pairs)
                continue
            if job.options == options and (not batch or total + len(job.pairs) <= self.max_batch_size):
                batch.append(job)
                total += len(job.pairs)
                self._waiting_pairs -= len(job.pairs)
            else:
                kept.append(job)
        self._pending = kept
        return batch

    async def _answer(self, batch: list[_Job]) -> None:
        assert self._loop is not None
        pairs = [pair for job in batch for pair in job.pairs]
        options = dict(batch[0].options)
        started = time.perf_counter()
        try:
            answers = await self._loop.run_in_executor(self._executor, self.answer_fn, pairs, options)
            if len(answers) != len(pairs):
                raise RuntimeError(f"the predictor returned {len(answers)} answers for {len(pairs)} pairs")
        except Exception as exc:
            if len(batch) > 1:
                # Find the request that broke the batch: answer each alone, so the others still succeed.
                for job in batch:
                    await self._answer([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self.batches_run += 1
        logger.debug("answered %d pairs from %d requests in %.3f s", len(pairs), len(batch), seconds)
        offset = 0
        for job in batch:
            mine = answers[offset:offset + len(job.pairs)]
            offset += len(job.pairs)
            if not job.future.done():
                self.requests_served += 1
                job.future.set_result(BatchResult(mine, seconds, len(pairs)))


# ----------------------------------------------------------------------------------------------------------
# ASGI middleware: API key and body size, applied before FastAPI parses anything


def _json_response_messages(status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> list[dict]:
    body = json.dumps({"error": message}).encode("utf-8")
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                     *headers]},
        {"type": "http.response.body", "body": body},
    ]


async def _send_error(send: Callable[[dict], Awaitable[None]], status: int, message: str,
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    for message_part in _json_response_messages(status, message, headers):
        await send(message_part)


def _is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _key_from_headers(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-api-key":
            return value.strip()
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return None


class _ApiKeyMiddleware:
    """401 unless the request carries the key (`Authorization: Bearer KEY` or `X-API-Key: KEY`)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or _is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = _key_from_headers(scope.get("headers", []))
        # compare_digest takes the same time wherever the first difference is, so timing leaks nothing.
        if given is None or not hmac.compare_digest(given, self._key):
            what = "missing" if given is None else "wrong"
            await _send_error(send, 401, f"API key {what}: send the header 'Authorization: Bearer <key>' "
                                         f"or 'X-API-Key: <key>'", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, and by counting the bytes as they stream
    in (a chunked upload has no Content-Length), before anything is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes; send fewer or shorter pairs " \
               f"(the server's --max-request-bytes)"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, self._message())
                    return
        received = 0
        response_started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing unchanged (anything else
                    # would become a generic 400) and reaches the app's handler as a JSON 413.
                    from fastapi import HTTPException

                    raise HTTPException(413, self._message())
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception as exc:
            # Only when the body was read outside a route (no handler turned it into a response).
            if getattr(exc, "status_code", None) != 413 or response_started:
                raise
            await _send_error(send, 413, self._message())


# ----------------------------------------------------------------------------------------------------------
# The app


@dataclass
class _ServerState:
    predictor: Any
    batcher: MicroBatcher
    limits: ServeLimits
    model_dir: str | None
    backend: str | None
    started: float = field(default_factory=time.monotonic)
    startup_error: BaseException | None = None


def create_app(
    predictor: "Predictor",
    *,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    model_dir: str | Path | None = None,
) -> "FastAPI":
    """The FastAPI app answering questions with `predictor`.

    Args:
        predictor: anything with `answer_many(pairs, **generate_overrides) -> list[Answer]` (a t5qa Predictor).
        api_key: when set, every request except the web page and the API description must carry it.
        limits: request limits (defaults: `ServeLimits()`).
        max_batch_size: most pairs answered in one model call.
        max_wait_ms: how long the first waiting request waits for others to join its batch.
        model_dir: shown by /health.
    Returns:
        The app; run it with uvicorn, or test it with fastapi.testclient.TestClient.
    """
    return _build_app(lambda: predictor, api_key=api_key, limits=limits, max_batch_size=max_batch_size,
                      max_wait_ms=max_wait_ms, model_dir=model_dir, preloaded=predictor)


def create_app_from_dir(
    model_dir: str | Path,
    *,
    backend: str = "torch",
    generate: GenerateConfig | None = None,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    **safety: Any,
) -> "FastAPI":
    """Like `create_app`, but the Predictor is loaded from `model_dir` at start-up (in the app's lifespan).

    `safety` goes to `Predictor.from_pretrained` (e.g. trust_remote_code, allow_pickle). A loading error is
    kept in `app.state.t5qa.startup_error` so the CLI can report it in one line.
    """

    def load() -> Any:
        from t5qa.predict import Predictor

        return Predictor.from_pretrained(str(model_dir), backend=backend, generate=generate, **safety)

    return _build_app(load, api_key=api_key, limits=limits, max_batch_size=max_batch_size,
                      max_wait_ms=max_wait_ms, model_dir=model_dir, preloaded=None, backend=backend)


def _build_app(load: Callable[[], Any], *, api_key: str | None, limits: ServeLimits | None, max_batch_size: int,
               max_wait_ms: float, model_dir: str | Path | None, preloaded: Any,
               backend: str | None = None) -> "FastAPI":
    require("fastapi", "serve", "t5qa serve")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    limits = limits or ServeLimits()
    models = _api_models(limits)

    def run_model(pairs: list[tuple[str, str]], options: dict[str, Any]) -> list[Any]:
        return state.predictor.answer_many(pairs, **options)

    state = _ServerState(
        predictor=preloaded,
        batcher=MicroBatcher(run_model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms),
        limits=limits,
        model_dir=str(model_dir) if model_dir is not None else None,
        backend=backend or getattr(preloaded, "backend", None),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.predictor is None:
            try:
                # In a thread, so Ctrl-C still works while a large model loads.
                state.predictor = await asyncio.to_thread(load)
            except BaseException as exc:
                state.startup_error = exc
                raise
            state.backend = getattr(state.predictor, "backend", state.backend)
            logger.info("model loaded from %s (backend %s)", state.model_dir, state.backend)
        state.started = time.monotonic()
        state.batcher.start()
        redact = _RedactKey(api_key) if api_key else None
        if redact is not None:  # a client that puts the key in the URL must not get it into the access log
            logging.getLogger("uvicorn.access").addFilter(redact)
        try:
            yield
        finally:
            if redact is not None:
                logging.getLogger("uvicorn.access").removeFilter(redact)
            await state.batcher.stop()

    app = FastAPI(
        title="t5qa",
        summary="Answers questions about a given context with a fine-tuned seq2seq model.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.t5qa = state

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _describe_validation_errors(exc.errors())
        return error(status, message)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error(500, "internal server error; see the server log")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # The page's own script and styles only; no inline code, so a strict policy costs nothing.
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        })

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": models.ErrorResponse, "description": text} for code, text in (
            (400, "malformed JSON"), (401, "API key missing or wrong"), (413, "request too large"),
            (422, "invalid field, type or option"), (500, "the model failed on this request"))
    }

    @app.post("/v1/answer", response_model=models.AnswerResponse, responses=error_responses,
              summary="Answer one question, or a list of (context, question) pairs")
    async def answer(body: models.AnswerRequest) -> Any:  # type: ignore[name-defined]
        """Send `{"context", "question"}` for one answer, or `{"pairs": [...]}` for several. Generation
        options apply to every pair of the request."""
        arrived = time.perf_counter()
        pairs = body.pairs_list()
        _check_limits(pairs, body, limits)
        options = {name: getattr(body, name) for name in GENERATE_OPTIONS if getattr(body, name) is not None}
        try:
            result = await state.batcher.submit(pairs, options)
        except T5QAError as exc:
            # Options the model cannot honour (e.g. min_new_tokens above the model's answer limit).
            raise HTTPException(422, str(exc)) from None
        except Exception as exc:
            logger.error("the model failed on a request of %d pair(s): %s: %s", len(pairs), type(exc).__name__,
                         exc)
            raise HTTPException(500, f"the model failed on this request ({type(exc).__name__}); "
                                     f"the server is still running, see its log") from None
        out = [models.AnswerOut.from_answer(a) for a in result.answers]
        return models.AnswerResponse(
            answer=out[0] if body.pairs is None else None,
            answers=out,
            model_seconds=result.model_seconds,
            server_seconds=time.perf_counter() - arrived,
            batch_pairs=result.batch_pairs,
        )

    @app.get("/health", response_model=models.HealthResponse, responses={401: error_responses[401]},
             summary="Is the server up, and what is it serving")
    async def health() -> Any:
        return models.HealthResponse(
            status="ok" if state.predictor is not None else "loading",
            model_dir=state.model_dir,
            backend=state.backend,
            uptime_seconds=time.monotonic() - state.started,
            queue_size=state.batcher.queue_size,
            requests_served=state.batcher.requests_served,
            batches_run=state.batcher.batches_run,
            max_batch_size=state.batcher.max_batch_size,
            max_wait_ms=state.batcher.max_wait_ms,
            api_key_required=api_key is not None,
            limits=vars(limits).copy(),
        )

    # Added last = outermost: the key is checked before the body is read at all.
    app.add_middleware(_BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key is not None:
        if not api_key.strip():
            raise ConfigError("--api-key (or T5QA_API_KEY) is empty; give a non-empty key or leave it unset")
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
        _document_security(app)
    return app


class _RedactKey(logging.Filter):
    """Replaces the API key with [redacted] in log records."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.key in message:
            record.msg, record.args = message.replace(self.key, "[redacted]"), ()
        return True


def _version() -> str:
    try:
        from t5qa import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "0"


def _document_security(app: Any) -> None:
    """Declare the two key headers in the OpenAPI schema, so /docs has an Authorize button."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _check_limits(pairs: list[tuple[str, str]], body: Any, limits: ServeLimits) -> None:
    from starlette.exceptions import HTTPException

    if len(pairs) > limits.max_pairs_per_request:
        raise HTTPException(413, f"pairs: {len(pairs)} pairs in one request, the limit is "
                                 f"{limits.max_pairs_per_request}; split the request (server's "
                                 f"--max-pairs-per-request)")
    single = body.pairs is None
    for i, (context, question) in enumerate(pairs):
        where = "" if single else f"pairs[{i}]."
        if len(context) > limits.max_context_chars:
            raise HTTPException(413, f"{where}context: {len(context)} characters, the limit is "
                                     f"{limits.max_context_chars} (server's --max-context-chars)")
        if len(question) > limits.max_question_chars:
            raise HTTPException(413, f"{where}question: {len(question)} characters, the limit is "
                                     f"{limits.max_question_chars} (server's --max-question-chars)")
        if not question.strip():
            raise HTTPException(422, f"{where}question: empty; ask a question")
        if not context.strip():
            raise HTTPException(422, f"{where}context: empty; give the text that holds the answer")
    problems = []
    if body.num_beams is not None and not 1 <= body.num_beams <= limits.max_num_beams:
        problems.append(f"num_beams must be in [1, {limits.max_num_beams}], got {body.num_beams}")
    for name, low in (("max_new_tokens", 1), ("min_new_tokens", 0)):
        value = getattr(body, name)
        if value is not None and not low <= value <= limits.max_new_tokens_cap:
            problems.append(f"{name} must be in [{low}, {limits.max_new_tokens_cap}], got {value}")
    if (body.min_new_tokens is not None and body.max_new_tokens is not None
            and body.min_new_tokens > body.max_new_tokens):
        problems.append(f"min_new_tokens ({body.min_new_tokens}) must not exceed max_new_tokens "
                        f"({body.max_new_tokens})")
    if body.length_penalty is not None and not math.isfinite(body.length_penalty):
        problems.append("length_penalty must be a finite number")
    if problems:
        raise HTTPException(422, "; ".join(problems))


def _describe_validation_errors(errors: Sequence[dict]) -> tuple[int, str]:
    """(status, one readable line) for pydantic's errors: 400 for malformed JSON, else 422."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            position = err["loc"][-1] if len(err.get("loc", ())) > 1 else "?"
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            return 400, f"malformed JSON at character {position}: {reason}; send a JSON object"
        where = ""
        for part in err.get("loc", ()):
            if part == "body":
                continue
            if not isinstance(part, int):
                # A field name is the user's text: quote it unless it is a plain name, so a newline or a
                # control character in it cannot break the one-line message.
                part = str(part) if str(part).isidentifier() else repr(str(part))
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") in ("model_attributes_type", "dict_type") and not where:
            message = "the body must be a JSON object like {\"context\": \"...\", \"question\": \"...\"}"
        elif err.get("type") == "missing" and not where:
            message = "missing request body; send a JSON object like {\"context\": \"...\", \"question\": \"...\"}"
        elif err.get("type") == "extra_forbidden":
            message = "unknown field; allowed: context, question, pairs, " + ", ".join(GENERATE_OPTIONS)
        parts.append(f"{where}: {message}" if where else message)
    return 422, _one_line("; ".join(parts) or "invalid request")


def _one_line(text: str) -> str:
    """`text` with every non-printable character (newline, tab, control) written as its escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


@dataclass
class _Models:
    AnswerRequest: Any
    AnswerOut: Any
    AnswerResponse: Any
    HealthResponse: Any
    ErrorResponse: Any


def _api_models(limits: ServeLimits) -> _Models:
    """The pydantic request/response models (built here so pydantic is imported only when serving)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    strict = ConfigDict(extra="forbid", strict=True)

    class Pair(BaseModel):
        model_config = strict
        context: str = Field(description="The text that holds the answer.")
        question: str = Field(description="The question about the context.")

    class AnswerRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid", strict=True,
            json_schema_extra={"examples": [
                {"context": "The Eiffel Tower is in Paris.", "question": "Where is the Eiffel Tower?"},
                {"pairs": [{"context": "Ada wrote the first program.", "question": "Who wrote it?"}],
                 "num_beams": 4, "max_new_tokens": 16},
            ]},
        )
        context: str | None = Field(None, description="One context (with `question`).")
        question: str | None = Field(None, description="One question (with `context`).")
        pairs: list[Pair] | None = Field(
            None, description=f"Several pairs instead of one (at most {limits.max_pairs_per_request}).")
        num_beams: int | None = Field(None, description=f"Beam width, 1 to {limits.max_num_beams}.")
        max_new_tokens: int | None = Field(None, description=f"Longest answer, 1 to {limits.max_new_tokens_cap}.")
        min_new_tokens: int | None = Field(None, description="Shortest answer in tokens.")
        length_penalty: float | None = Field(None, ge=-10.0, le=10.0, description="Beam-search length penalty.")
        no_repeat_ngram_size: int | None = Field(None, ge=0, le=20, description="Forbid repeated n-grams.")

        @model_validator(mode="after")
        def one_form(self) -> "AnswerRequest":
            single = self.context is not None or self.question is not None
            if single and self.pairs is not None:
                raise ValueError("send either context + question, or pairs, not both")
            if self.pairs is None and (self.context is None or self.question is None):
                missing = [n for n in ("context", "question") if getattr(self, n) is None]
                raise ValueError(f"missing {' and '.join(missing)}; send {{\"context\": \"...\", "
                                 f"\"question\": \"...\"}} or {{\"pairs\": [...]}}")
            if self.pairs is not None and not self.pairs:
                raise ValueError("pairs is empty; send at least one {\"context\", \"question\"} pair")
            return self

        def pairs_list(self) -> list[tuple[str, str]]:
            if self.pairs is None:
                return [(self.context or "", self.question or "")]
            return [(p.context, p.question) for p in self.pairs]

    class AnswerOut(BaseModel):
        text: str = Field(description="The answer.")
        score: float | None = Field(description="Mean log-probability per answer token (higher is surer).")
        window_index: int = Field(description="Which window of a long context the answer came from (0-based).")
        num_windows: int = Field(description="How many windows the context was cut into.")
        window_char_start: int = Field(0, description="Where the answering window starts in the context "
                                                      "(character offset).")
        window_char_end: int = Field(0, description="Where the answering window ends (exclusive).")
        seconds: float | None = Field(None, description="This pair's share of the model time.")

        @classmethod
        def from_answer(cls, answer: Any) -> "AnswerOut":
            score = float(answer.score) if answer.score is not None else None
            return cls(text=answer.text, score=score if score is not None and math.isfinite(score) else None,
                       window_index=answer.window_index, num_windows=answer.num_windows,
                       window_char_start=getattr(answer, "window_char_start", 0),
                       window_char_end=getattr(answer, "window_char_end", 0),
                       seconds=getattr(answer, "seconds", None))

    class AnswerResponse(BaseModel):
        answer: AnswerOut | None = Field(None, description="The answer of a single-question request.")
        answers: list[AnswerOut] = Field(description="One answer per pair, in request order.")
        model_seconds: float = Field(description="Wall time of the model call that answered this request "
                                                 "(shared with the requests batched with it).")
        server_seconds: float = Field(description="Time from request arrival to response: queue wait + model.")
        batch_pairs: int = Field(description="Pairs in that model call (this request's and others').")

    class HealthResponse(BaseModel):
        status: str
        model_dir: str | None
        backend: str | None
        uptime_seconds: float
        queue_size: int = Field(description="Pairs waiting for the model.")
        requests_served: int
        batches_run: int
        max_batch_size: int
        max_wait_ms: float
        api_key_required: bool
        limits: dict[str, int]

    class ErrorResponse(BaseModel):
        error: str = Field(description="What was wrong and how to fix it.")

    return _Models(AnswerRequest, AnswerOut, AnswerResponse, HealthResponse, ErrorResponse)
