"""Splitting by context: every question about one context lands in the same split, so none leaks across."""

from __future__ import annotations

import logging
import random
import unicodedata
from collections.abc import Sequence

from t5qa.data.records import QAExample
from t5qa.errors import DataError

logger = logging.getLogger(__name__)


def context_key(context: str) -> str:
    """The grouping key of a context: NFC with whitespace collapsed, so trivially different copies group together."""
    return " ".join(unicodedata.normalize("NFC", context).split())


def split_examples(
    examples: Sequence[QAExample], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[QAExample]]:
    """Split examples by context: every question about one context lands in the same split.

    Fractions are of distinct contexts. A split with a positive fraction gets at least one context when
    enough contexts exist to leave one for training. Deterministic for a given seed and input order.

    Returns:
        {"train": [...], "validation": [...], "test": [...]}, each in input order.
    Raises:
        DataError: fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must each be in [0, 1) "
            "and sum to less than 1"
        )
    keys: dict[str, None] = {}
    example_keys = []
    for ex in examples:
        key = context_key(ex.context)
        keys.setdefault(key, None)
        example_keys.append(key)
    order = list(keys)
    random.Random(seed).shuffle(order)
    n = len(order)

    def count(fraction: float, available: int) -> int:
        if fraction <= 0 or available < 2:
            return 0
        return min(max(1, round(fraction * n)), available - 1)

    n_test = count(test_fraction, n)
    n_val = count(val_fraction, n - n_test)
    split_of = {}
    for i, key in enumerate(order):
        split_of[key] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    splits: dict[str, list[QAExample]] = {"train": [], "validation": [], "test": []}
    for ex, key in zip(examples, example_keys):
        splits[split_of[key]].append(ex)
    if n and (val_fraction > 0 and not splits["validation"] or test_fraction > 0 and not splits["test"]):
        logger.warning("only %d distinct context(s): some requested splits are empty", n)
    return splits

