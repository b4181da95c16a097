"""`t5qa serve`: the HTTP API and web page, run with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from t5qa.cli.common import add_config_flags, config_overrides
from t5qa.config import GenerateConfig, ServeConfig, ServeLimits
from t5qa.errors import ConfigError, ModelError, T5QAError, require

API_KEY_ENV = "T5QA_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the serve command."""
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (JSON API + web page), batching concurrent requests",
        description="Serve a model: POST /v1/answer, GET /health, the web page at /, API docs at /docs. "
                    "Concurrent requests are answered together in batches.",
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
    """Load the model (in the app's start-up) and serve until Ctrl-C."""
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

    app = create_app_from_dir(
        args.model, backend=args.backend, generate=generate, config=serve, api_key=api_key,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        chosen=chosen,
    )
    level = args.log_level or ("warning" if getattr(args, "quiet", False) else "info")
    where = f"http://{'[' + serve.host + ']' if ':' in serve.host else serve.host}:{serve.port}/"
    logging.getLogger(__name__).info("loading %s, then serving on %s (Ctrl-C stops)", args.model, where)
    config = uvicorn.Config(app, host=serve.host, port=serve.port, log_level=level, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    startup_error = app.state.t5qa.startup_error
    if startup_error is not None:
        if isinstance(startup_error, T5QAError):
            raise startup_error
        raise ModelError(f"{args.model}: the model could not be loaded ({type(startup_error).__name__}: "
                         f"{startup_error}); see the log above") from None
    if not server.started:
        raise ConfigError(f"the server did not start on {serve.host}:{serve.port} (is the port in use? try "
                          f"another --port)")
    return 0
