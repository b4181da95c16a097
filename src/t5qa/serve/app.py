"""The app of `t5qa serve`: `create_app` (a Predictor in hand) and `create_app_from_dir` (loaded at start-up),
the routes (POST /v1/answer, GET /health, the web page at /, the API docs at /docs) and the checks of every
request against the server's limits before the model sees it (4xx with a JSON `{"error": "..."}` that says what to
change). An exception in the model fails only the request(s) that caused it."""


import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

from t5qa.config import GenerateConfig, ServeConfig, ServeLimits
from t5qa.errors import ConfigError, T5QAError, require
from t5qa.serve.batcher import MicroBatcher
from t5qa.serve.metrics import ServerMetrics
from t5qa.serve.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RedactKey, RequestLogMiddleware

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from t5qa.predict import Predictor

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# Generation options a request may set; each overrides the server's GenerateConfig for that request only.
GENERATE_OPTIONS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
                    "no_answer_margin", "grounded")


ROUTES = ("/", "/v1/answer", "/health", "/metrics", "/docs", "/openapi.json", "/favicon.ico")


@dataclass
class _ServerState:
    predictor: Any
    batcher: MicroBatcher
    limits: ServeLimits
    model_dir: str | None           # the server's log only: /health and the page name the model instead
    model_name: str
    base_model: str | None
    backend: str | None
    metrics: ServerMetrics
    started: float = field(default_factory=time.monotonic)
    startup_error: BaseException | None = None


def create_app(
    predictor: "Predictor",
    *,
    config: ServeConfig | None = None,
    api_key: str | None = None,
    model_dir: str | Path | None = None,
) -> "FastAPI":
    """The FastAPI app answering questions with `predictor`.

    Args:
        predictor: anything with `answer_many(pairs, **generate_overrides) -> list[Answer]` (a t5qa Predictor).
        config: batching and request limits (defaults: `ServeConfig()`); host and port are the runner's.
        api_key: when set, every request except the web page and the API description must carry it.
        model_dir: where the model came from: /health and the page name it by `model_name` (config.model_name,
            else its model card's title or its directory's name), never by its path on the server's disk.
    Returns:
        The app; run it with uvicorn, or test it with fastapi.testclient.TestClient.
    """
    return _build_app(lambda: predictor, config=config, api_key=api_key, model_dir=model_dir, preloaded=predictor)


def create_app_from_dir(
    model_dir: str | Path,
    *,
    backend: str = "torch",
    generate: GenerateConfig | None = None,
    config: ServeConfig | None = None,
    api_key: str | None = None,
    **safety: Any,
) -> "FastAPI":
    """Like `create_app`, but the Predictor is loaded from `model_dir` at start-up (in the app's lifespan).

    `safety` goes to `t5qa.api.load_predictor` (e.g. trust_remote_code, allow_pickle, chosen). A loading error is
    kept in `app.state.t5qa.startup_error` so the CLI can report it in one line.
    """

    def load() -> Any:
        from t5qa.api import load_predictor

        return load_predictor(model_dir, backend=backend, generate=generate, **safety)

    return _build_app(load, config=config, api_key=api_key, model_dir=model_dir, preloaded=None, backend=backend)


def _build_app(load: Callable[[], Any], *, config: ServeConfig | None, api_key: str | None,
               model_dir: str | Path | None, preloaded: Any, backend: str | None = None) -> "FastAPI":
    require("fastapi", "serve", "t5qa serve")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from t5qa.serve import schemas

    config = config or ServeConfig()
    limits = config.limits
    metrics = ServerMetrics(ROUTES)

    def run_model(pairs: list[tuple[str, str]], options: dict[str, Any]) -> list[Any]:
        return state.predictor.answer_many(pairs, **options)

    state = _ServerState(
        predictor=preloaded,
        batcher=MicroBatcher(run_model, config=config, on_batch=metrics.record_batch, on_queue=metrics.set_queue),
        limits=limits,
        model_dir=str(model_dir) if model_dir is not None else None,
        model_name=model_name(model_dir, config.model_name),
        base_model=base_model(model_dir),
        metrics=metrics,
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
        redact = RedactKey(api_key) if api_key else None
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
        code: {"model": schemas.ErrorResponse, "description": text} for code, text in (
            (400, "malformed JSON"), (401, "API key missing or wrong"), (413, "request too large"),
            (422, "invalid field, type or option"), (500, "the model failed on this request"))
    }

    @app.post("/v1/answer", response_model=schemas.AnswerResponse, responses=error_responses,
              summary="Answer one question, or a list of (context, question) pairs")
    async def answer(body: schemas.AnswerRequest) -> Any:  # type: ignore[name-defined]
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
        out = [schemas.AnswerOut.from_answer(a) for a in result.answers]
        return schemas.AnswerResponse(
            answer=out[0] if body.pairs is None else None,
            answers=out,
            model_seconds=result.model_seconds,
            server_seconds=time.perf_counter() - arrived,
            batch_pairs=result.batch_pairs,
        )

    @app.get("/health", response_model=schemas.HealthResponse, responses={401: error_responses[401]},
             summary="Is the server up, and what is it serving")
    async def health() -> Any:
        return schemas.HealthResponse(
            status="ok" if state.predictor is not None else "loading",
            model=state.model_name,
            base_model=state.base_model,
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

    @app.get("/metrics", include_in_schema=True, responses={401: error_responses[401]},
             summary="Prometheus metrics: requests by status, latency, batch sizes, queue depth",
             response_class=PlainTextResponse)
    async def metrics_page() -> Any:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # Added last = outermost: the key is checked before the body is read at all, and the request log sees
    # every request, refusals included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key is not None:
        if not api_key.strip():
            raise ConfigError("--api-key (or T5QA_API_KEY) is empty; give a non-empty key or leave it unset")
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
        _document_security(app)
    app.add_middleware(RequestLogMiddleware, record=metrics.record_request, log=config.access_log)
    return app


def model_name(model_dir: str | Path | None, given: str | None = None) -> str:
    """How the server names its model: `given`, else the title of the directory's model card (t5qa's cards are
    titled with the run's name), else the directory's own name; a Hub id as it is."""
    if given:
        return given
    if model_dir is None:
        return "model"
    path = Path(model_dir)
    if not path.is_dir():
        return str(model_dir)  # a Hub id, not a path on this machine
    card = path / "README.md"
    try:
        lines = card.read_text(encoding="utf-8").splitlines() if card.is_file() else []
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        if line.startswith("# ") and line[2:].strip():
            return line[2:].strip()
    return path.resolve().name


def base_model(model_dir: str | Path | None) -> str | None:
    """The model a t5qa model was trained from (its t5qa.json), by Hub id or, for a local one, its name."""
    if model_dir is None:
        return None
    from t5qa.modelcard import public_name
    from t5qa.modeling import read_meta

    try:
        train_config = read_meta(model_dir).get("train_config")
    except T5QAError:  # an unreadable t5qa.json names no base model; loading the model says what is wrong
        return None
    base = train_config.get("model") if isinstance(train_config, dict) else None
    return public_name(base) if isinstance(base, str) else None


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


API_KEY_ENV = "T5QA_API_KEY"
"""The server's API key, read from the environment (other users cannot see it in the process list)."""
WORKER_SETTINGS_ENV = "T5QA_SERVE_WORKER"
"""`serve --workers N`: the settings every worker process builds its app from (JSON, set by the serve command)."""


def worker_settings(model_dir: str | Path, *, backend: str, generate: GenerateConfig, config: ServeConfig,
                    log_level: str, **safety: Any) -> str:
    """The JSON that `app_from_environment` reads in each worker (the API key travels in T5QA_API_KEY instead)."""
    import json

    from t5qa.config import to_dict

    return json.dumps({"model_dir": str(model_dir), "backend": backend, "generate": to_dict(generate),
                       "config": to_dict(config), "log_level": log_level,
                       "safety": {key: list(value) if isinstance(value, tuple) else value
                                  for key, value in safety.items()}})


def app_from_environment() -> "FastAPI":
    """The app of one `serve --workers N` worker (uvicorn's factory, run in each spawned process).

    Each worker loads its own model, logs like the single-process server, and takes its share of the cores
    (cores / N threads, unless OMP_NUM_THREADS says otherwise).
    """
    import json
    import os

    from t5qa.config import from_dict

    settings = json.loads(os.environ[WORKER_SETTINGS_ENV])
    level = getattr(logging, str(settings.get("log_level", "info")).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    logging.getLogger("t5qa").setLevel(level)
    config = from_dict(ServeConfig, settings["config"], source=WORKER_SETTINGS_ENV)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    safety = dict(settings.get("safety", {}))
    if "chosen" in safety:
        safety["chosen"] = tuple(safety["chosen"])
    return create_app_from_dir(settings["model_dir"], backend=settings["backend"],
                               generate=from_dict(GenerateConfig, settings["generate"], source=WORKER_SETTINGS_ENV),
                               config=config, api_key=os.environ.get(API_KEY_ENV) or None, **safety)
