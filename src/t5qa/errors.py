"""The exceptions a user can cause. The CLI turns each into one line on stderr and a non-zero exit.

Every message says what is wrong, where (file, row, field or flag) and how to fix it.
"""

from __future__ import annotations


class T5QAError(Exception):
    """Base class of every error caused by the user's input, files, flags or environment."""

    exit_code: int = 2


class ConfigError(T5QAError):
    """A flag, a config-file key or a combination of them is invalid."""


class DataError(T5QAError):
    """An input data file is missing, unreadable, malformed or empty."""


class ModelError(T5QAError):
    """A model or tokenizer cannot be found, downloaded or loaded safely."""


class CheckpointError(T5QAError):
    """A checkpoint is missing, incomplete or corrupted."""


class TrainingError(T5QAError):
    """Training cannot go on (for example a non-finite loss); the last good checkpoint is kept."""


class MissingExtraError(T5QAError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 't5qa[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):  # noqa: ANN201 - returns a module
    """Import an optional dependency, or raise MissingExtraError with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
