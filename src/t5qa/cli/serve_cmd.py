"""`t5qa serve`: the HTTP API and web page, run with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from t5qa.cli.common import add_config_flags, config_overrides
from t5qa.config import GenerateConfig, ServeConfig, ServeLimits
from t5qa.errors import ConfigError, ModelError, T5QAError, require
from t5qa.serve.app import API_KEY_ENV



def register(sub: argparse._SubParsersAction) -> None:
    """Add the serve command."""
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (JSON API + web page), batching concurrent requests",
        description="Serve a model: POST /v1/answer, GET /health, GET /metrics (Prometheus), the web page at /, "
                    "API docs at /docs. Concurrent requests are answered together in batches; SIGTERM lets "
                    "queued requests finish.",
    )
    p.add_argument("--model", required=True, help="model directory (saved by t5qa or transformers, or a "
                                                  "`t5qa export` directory with --backend ct2)")
    p.add_argument("--backend", choices=("torch", "ct2"), default="torch", help="inference backend (default: torch)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key on every API request (header 'Authorization: Bearer KEY' or "
                        f"'X-API-Key: KEY'); prefer the {API_KEY_ENV} environment variable, which other "
                        f"users cannot see in the process list")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (can run code)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"),
                   help="server log level (default: info; warning with -q)")
    add_config_flags(p, ServeConfig, exclude=[f.name for f in fields(ServeLimits)], group_title="server")
    add_config_flags(p, ServeLimits, group_title="request limits")
    add_config_flags(p, GenerateConfig, group_title="default generation settings (a request may override them)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Load the model (in the app's start-up) and serve until Ctrl-C or SIGTERM, which let queued requests finish."""
    require("uvicorn", "serve", "t5qa serve")
    import uvicorn

    from t5qa.serve import create_app_from_dir

    if not Path(args.model).is_dir():
        raise ModelError(f"{args.model}: no such model directory; pass a directory saved by t5qa or transformers "
                         f"(or `t5qa export` with --backend ct2) to --model")
    limits = ServeLimits(**config_overrides(args, ServeLimits))
    limit_names = {f.name for f in fields(ServeLimits)}
    serve = ServeConfig(limits=limits, **{k: v for k, v in config_overrides(args, ServeConfig).items()
                                           if k not in limit_names})
    generate_values = config_overrides(args, GenerateConfig)
    chosen = tuple(generate_values)  # kept over the decoding settings tuned for the model
    # One model call then runs the whole micro-batch at once.
    generate_values.setdefault("batch_size", serve.max_batch_size)
    generate = GenerateConfig(**generate_values)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(serve.host) and api_key is None:
        print(f"warning: listening on {serve.host} without an API key: anyone who can reach this machine can "
              f"use the model. Set {API_KEY_ENV} (or --api-key), or keep --host 127.0.0.1.", file=sys.stderr)
    safety = dict(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, chosen=chosen)
    level = args.log_level or ("warning" if getattr(args, "quiet", False) else "info")
    where = f"http://{'[' + serve.host + ']' if ':' in serve.host else serve.host}:{serve.port}/"
    # t5qa writes the access log itself (JSON lines with request ids), so uvicorn's is off. On SIGTERM or Ctrl-C
    # uvicorn stops accepting, waits up to the timeout for the requests in flight (queued ones included), and
    # only then runs the app's shutdown.
    options = dict(host=serve.host, port=serve.port, log_level=level, lifespan="on", access_log=False,
                   timeout_graceful_shutdown=serve.shutdown_timeout_s)
    if serve.workers > 1:
        return _run_workers(args.model, backend=args.backend, generate=generate, serve=serve, api_key=api_key,
                            level=level, where=where, options=options, safety=safety)

    app = create_app_from_dir(args.model, backend=args.backend, generate=generate, config=serve, api_key=api_key,
                              **safety)
    logging.getLogger(__name__).info("loading %s, then serving on %s (Ctrl-C stops)", args.model, where)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler it found; with this
    # one in place, a stop that was asked for ends in exit status 0 rather than death by the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    startup_error = app.state.t5qa.startup_error
    if startup_error is not None:
        raise _startup_failure(args.model, startup_error)
    if not server.started:
        raise _not_started(serve)
    return 0


def _run_workers(model: str, *, backend: str, generate: GenerateConfig, serve: ServeConfig, api_key: str | None,
                 level: str, where: str, options: dict, safety: dict) -> int:
    """`--workers N`: uvicorn's own supervisor runs N processes on the one port, each building its app (and
    loading its model) from the settings in the environment. The model is loaded once here first, so a model
    that cannot load is one line, not N workers' tracebacks; metrics from every worker meet in one directory."""
    import shutil
    import tempfile

    import uvicorn

    from t5qa.api import load_predictor
    from t5qa.serve.app import WORKER_SETTINGS_ENV, worker_settings
    from t5qa.serve.metrics import MULTIPROCESS_ENV

    log = logging.getLogger(__name__)
    log.info("checking that %s loads, then starting %d workers on %s (Ctrl-C stops)", model, serve.workers, where)
    try:
        predictor = load_predictor(model, backend=backend, generate=generate, **safety)
    except T5QAError:
        raise
    except Exception as exc:  # the loaders' own errors: one line, as the single-process server gives
        raise _startup_failure(model, exc) from None
    del predictor
    os.environ[WORKER_SETTINGS_ENV] = worker_settings(model, backend=backend, generate=generate, config=serve,
                                                      log_level=level, **safety)
    if api_key is not None:
        os.environ[API_KEY_ENV] = api_key  # the workers' environment, not their command line
    made = None  # a metrics directory of our own is removed when the server stops; the user's is theirs
    if not os.environ.get(MULTIPROCESS_ENV):
        made = tempfile.mkdtemp(prefix="t5qa-metrics-")
        os.environ[MULTIPROCESS_ENV] = made
    try:
        uvicorn.run("t5qa.serve.app:app_from_environment", factory=True, workers=serve.workers, **options)
    except SystemExit as exc:  # uvicorn exits when it cannot bind the port or a worker cannot start
        if exc.code not in (0, None):
            raise _not_started(serve) from None
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return 0


def _startup_failure(model: str, exc: BaseException) -> T5QAError:
    if isinstance(exc, T5QAError):
        return exc
    return ModelError(f"{model}: the model could not be loaded ({type(exc).__name__}: {exc}); see the log above")


def _not_started(serve: ServeConfig) -> ConfigError:
    return ConfigError(f"the server did not start on {serve.host}:{serve.port} (is the port in use? try "
                       f"another --port)")
