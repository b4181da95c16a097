"""Training features encoded once, through `datasets`, and kept on disk: a second run with the same data, tokenizer
and encode settings skips tokenisation.

`encode_cached` runs `encode.encode_for_training` inside `Dataset.map` (batched, over `num_proc` processes) and
writes the features as Arrow files under a directory named by a key: the SHA-256 of the examples' text, the
tokenizer (its `datasets` fingerprint, which covers its vocabulary and settings), the EncodeConfig and the version
of the encoding. The directory counts as a cache only once its `stats.json` is written, after the last Arrow file,
so a run killed while encoding leaves nothing that a later run would trust. Reading the features back maps the
Arrow files into memory rather than building Python lists: 4 bytes a token, shared with the page cache, where a
list of Python ints costs about 36.

A training run goes one step further (`read_prepared` / `write_prepared`): under a key of its data *files* (their
paths and SHA-256), the data settings (columns, cleaning, split), the encode settings and the tokenizer, it keeps
what it made of them: which features it trained on, how many examples, the validation examples it held out or read,
and the cleaning reports. A second run with unchanged files then reads neither the training file's questions nor
their text: only the file's bytes, to hash them, so its memory does not grow with the training set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from t5qa.config import DataConfig, EncodeConfig
from t5qa.data import QAExample
from t5qa.encode import EncodeStats, encode_for_training

logger = logging.getLogger(__name__)

ENCODING_VERSION = 1
"""Bump when encode_for_training's output for the same inputs changes: old caches are then not used."""
AUTO_MIN_EXAMPLES = 20_000
"""--encode-cache auto caches from this many training examples (below it, tokenising takes about a second)."""
STATS_FILE = "stats.json"
PREPARED_FILE = "prepared.json"
PREPARED_VERSION = 1
"""Bump when what load_run_examples makes of the same files and settings changes (cleaning, splitting)."""


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """Where the encoded features live: `configured`, else `datasets`' cache directory (HF_DATASETS_CACHE)."""
    if configured:
        return Path(configured)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "t5qa-encoded"


def cache_key(examples: Sequence[QAExample], tokenizer: Any, cfg: EncodeConfig) -> str:
    """The key of a set of features: the examples' text, the tokenizer, the encode settings, the encoding's version."""
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256(f"t5qa-encode-v{ENCODING_VERSION}".encode())
    digest.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    digest.update(Hasher.hash(tokenizer).encode())
    for ex in examples:
        digest.update(json.dumps([ex.id, ex.question, ex.context, list(ex.answers), list(ex.answer_starts)],
                                 ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:32]


def should_cache(mode: str, examples: int) -> bool:
    """Whether --encode-cache MODE caches a training set of `examples`."""
    return mode == "always" or (mode == "auto" and examples >= AUTO_MIN_EXAMPLES)


class CachedFeatures(Sequence[dict]):
    """The encoded features in Arrow files, indexed like encode_for_training's list: row i is
    {"input_ids", "labels", "example_index"}; a slice is a list of rows."""

    def __init__(self, dataset: Any, key: str = "") -> None:
        self.dataset = dataset
        self.key = key
        """The cache key (the directory's name under the cache root)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.dataset[int(index)]
        return {"input_ids": row["input_ids"], "labels": row["labels"], "example_index": row["example_index"]}

    def lengths(self) -> tuple[list[int], list[int]]:
        """(source lengths, target lengths), read from their own columns, not from the token lists."""
        return list(self.dataset["source_length"]), list(self.dataset["target_length"])


def _encode_rows(batch: dict[str, list], indices: list[int], *, tokenizer: Any, cfg: EncodeConfig) -> dict[str, list]:
    examples = [QAExample(id=i, context=c, question=q, answers=tuple(a), answer_starts=tuple(s))
                for i, c, q, a, s in zip(batch["id"], batch["context"], batch["question"], batch["answers"],
                                         batch["answer_starts"])]
    features, stats = encode_for_training(examples, tokenizer, cfg)
    count = len(features)
    # The batch's counts ride on its first row (zeros elsewhere), so the columns' sums are the whole set's.
    first = [1] + [0] * (count - 1) if count else []
    return {
        "input_ids": [f["input_ids"] for f in features],
        "labels": [f["labels"] for f in features],
        "example_index": list(indices),
        "source_length": [len(f["input_ids"]) for f in features],
        "target_length": [len(f["labels"]) for f in features],
        "needed_window": [stats.needed_window * k for k in first],
        "answer_outside_every_window": [stats.answer_outside_every_window * k for k in first],
        "truncated_targets": [stats.truncated_targets * k for k in first],
    }


def encode_cached(examples: Sequence[QAExample], tokenizer: Any, cfg: EncodeConfig, *,
                  cache_dir: str | os.PathLike | None = None, num_proc: int | None = None
                  ) -> tuple[CachedFeatures, EncodeStats, bool]:
    """The training features of `examples` from the cache, or encoded now (Dataset.map over `num_proc`
    processes) and cached. Returns (features, stats, whether they came from the cache)."""
    from datasets import Dataset

    key = cache_key(examples, tokenizer, cfg)
    directory = cache_root(cache_dir) / key
    stats_path = directory / STATS_FILE
    cached = _read_features(directory, len(examples))
    if cached is not None:
        logger.info("tokenised features of %d examples read from the cache %s", len(cached[0]), directory)
        return cached[0], cached[1], True
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("encoded*.arrow"):
        stale.unlink()
    source = Dataset.from_dict({
        "id": [ex.id for ex in examples], "context": [ex.context for ex in examples],
        "question": [ex.question for ex in examples], "answers": [list(ex.answers) for ex in examples],
        "answer_starts": [list(ex.answer_starts) for ex in examples]})
    processes = num_proc if num_proc and num_proc > 1 and len(examples) >= 2 * num_proc else None
    dataset = source.map(_encode_rows, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, batched=True,
                         batch_size=1000, with_indices=True, remove_columns=source.column_names,
                         num_proc=processes, cache_file_name=str(directory / "encoded.arrow"), new_fingerprint=key,
                         load_from_cache_file=False, desc="tokenising")
    counts = dataset.select_columns(["needed_window", "answer_outside_every_window", "truncated_targets"])
    stats = EncodeStats(examples=len(examples), **{name: int(sum(counts[name])) for name in counts.column_names})
    tmp = stats_path.with_name(STATS_FILE + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(stats)) + "\n", encoding="utf-8")
    os.replace(tmp, stats_path)  # the cache counts from here on
    logger.info("tokenised %d examples into the cache %s", len(dataset), directory)
    return CachedFeatures(dataset, key), stats, False


def _read_features(directory: Path, examples: int | None) -> tuple[CachedFeatures, EncodeStats] | None:
    """The features cached in `directory` with their stats, or None when it holds no complete cache (of
    `examples` examples, when given)."""
    from datasets import Dataset, concatenate_datasets

    stats_path = directory / STATS_FILE
    if not stats_path.is_file():
        return None
    try:
        files = sorted(directory.glob("encoded*.arrow"))
        dataset = concatenate_datasets([Dataset.from_file(str(path)) for path in files])
        stats = EncodeStats(**json.loads(stats_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:  # a damaged cache is encoded again
        logger.warning("%s: the cached features cannot be read (%s); encoding again", directory, exc)
        return None
    if examples is not None and len(dataset) != examples:
        return None
    return CachedFeatures(dataset, directory.name), stats


# ---------------------------------------------------------------------------------------- a run's prepared data


@dataclasses.dataclass
class PreparedData:
    """What a training run made of its data files, read back by the next run with the same files and settings."""

    features: CachedFeatures
    stats: EncodeStats
    train_examples: int
    validation: list[QAExample]
    cleaning: dict[str, Any]


def _file_digest(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def prepared_key(train: Any, validation: Any, data: DataConfig, encode: EncodeConfig, tokenizer: Any) -> str | None:
    """The key of a run's prepared data: the training and validation files (resolved path and SHA-256 of the
    bytes; every file of a directory), the data and encode settings, the tokenizer. None when a source is not a
    local file or directory (a Hub dataset, an in-memory dataset): there is no file to key it by."""
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256(f"t5qa-prepared-v{PREPARED_VERSION}-encode-v{ENCODING_VERSION}".encode())
    digest.update(json.dumps([dataclasses.asdict(data), dataclasses.asdict(encode)], sort_keys=True,
                             default=str).encode())
    digest.update(Hasher.hash(tokenizer).encode())
    for source in (train, validation):
        if source is None:
            digest.update(b"\0none")
            continue
        if not isinstance(source, (str, os.PathLike)) or not Path(source).exists():
            return None
        root = Path(source).resolve()
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        digest.update(str(root).encode("utf-8"))
        for path in files:
            digest.update(f"\0{path.relative_to(root) if path != root else ''}\0".encode("utf-8"))
            _file_digest(path, digest)
    return digest.hexdigest()[:32]


def _example_row(ex: QAExample) -> list[Any]:
    return [ex.id, ex.context, ex.question, list(ex.answers), list(ex.answer_starts), ex.source]


def write_prepared(key: str, features: CachedFeatures, train_examples: int, validation: Sequence[QAExample],
                   cleaning: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> None:
    """Keep what a run made of its data under `key` (the features stay in their own cache directory)."""
    directory = cache_root(cache_dir) / "prepared" / key
    directory.mkdir(parents=True, exist_ok=True)
    record = {"features": features.key, "train_examples": train_examples, "cleaning": cleaning,
              "validation": [_example_row(ex) for ex in validation]}
    tmp = directory / (PREPARED_FILE + ".tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / PREPARED_FILE)  # whole or absent


def read_prepared(key: str, cache_dir: str | os.PathLike | None = None) -> PreparedData | None:
    """A run's prepared data under `key`, or None (never written, damaged, or its features gone)."""
    path = cache_root(cache_dir) / "prepared" / key / PREPARED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        validation = [QAExample(id=i, context=c, question=q, answers=tuple(a), answer_starts=tuple(s), source=src)
                      for i, c, q, a, s, src in record["validation"]]
        cached = _read_features(cache_root(cache_dir) / record["features"], record["train_examples"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("%s: the prepared data cannot be read (%s); reading the data files again", path, exc)
        return None
    if cached is None:
        return None
    return PreparedData(features=cached[0], stats=cached[1], train_examples=record["train_examples"],
                        validation=validation, cleaning=record["cleaning"])
