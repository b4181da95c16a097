"""The `t5qa` command: the only place that parses arguments, prints, or exits.

Each command group lives in its own module with a `register(subparsers)` function; `main` dispatches and
turns every t5qa error into one line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from t5qa.errors import T5QAError

# Command modules, in the order their commands appear in `t5qa --help`.
COMMAND_MODULES = (
    "data_cmd", "model_cmd", "train_cmd", "evaluate_cmd", "predict_cmd", "serve_cmd", "tune_cmd", "lora_cmd",
    "push_cmd", "demo_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand."""
    from t5qa import __version__

    parser = argparse.ArgumentParser(
        prog="t5qa",
        description="Fine-tune, evaluate, serve and tune seq2seq models (T5, Flan-T5, mT5, ByT5, BART) "
                    "for question answering.",
    )
    parser.add_argument("--version", action="version", version=f"t5qa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"t5qa.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"t5qa.cli.{name}":
                continue  # a command group not built in this version
            raise
        module.register(sub)
    # -v/-q also after the command (`t5qa predict ... --verbose`); SUPPRESS keeps a flag given before it.
    for command in {id(p): p for p in sub.choices.values()}.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show debug logging (and, with --backend ct2, the export's check)")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="show warnings and errors only")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # Libraries' own chatter stays out of the user's way unless --verbose.
    for noisy in ("transformers", "datasets", "accelerate", "urllib3", "httpx", "filelock", "torch"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        # "Loading weights" / "Writing model shards" bars on every load and save drown t5qa's own output.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `t5qa` command. Returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    code = 1
    try:
        code = int(args.func(args) or 0)
        return code
    except T5QAError as exc:
        code = exc.exit_code
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        code = 130
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `t5qa predict ... | head`
        code = 0
        return 0
    finally:
        _end_distributed(code)


def _end_distributed(code: int) -> None:
    """Leave a torch.distributed run (accelerate launch / torchrun) without the interpreter's shutdown.

    With gloo, C++ threads of the process group can still be joinable when static destructors run at
    interpreter exit, and the process then aborts ("terminate called without an active exception", about
    one run in ten here) after all its work is done and saved. So a distributed process destroys its process
    group, flushes its output and ends with os._exit; a single process exits normally.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return
    distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """Console-script wrapper: exit with main's code."""
    sys.exit(main())
