"""Training from a stream (`train --streaming`): a training set read as it goes, never whole in memory or on disk.

The rows come from `datasets` in streaming mode: a local JSON-lines, CSV, TSV or Parquet file, or a Hub dataset
by name. `datasets`' shuffle buffer mixes the examples (seeded, reshuffled each pass through the stream); they are
read into examples in chunks (the same column mapping and answer parsing as every other path), cleaned per chunk
(normalised, empty or duplicate rows dropped, counted), and encoded a buffer at a time, where they are grouped by
length into micro-batches whose order is shuffled again. The same seed and pass give the same batches, so a
resumed run skips exactly the batches the interrupted one consumed.

Under several processes (`accelerate launch`), the stream is read once, by the main process, through Accelerate's
dispatcher (what `accelerator.prepare` does with an iterable loader): it takes N consecutive items, concatenates
them and gives process i the i-th. So the stream cuts each sorted buffer into global micro-batches of N x batch
rows (the same batches, in the same order, as one process with an N times larger batch), yields each as N
items padded to one shape (the dispatcher concatenates tensors), carries the rows that do not fill a global
batch into the next buffer, and goes on into the next pass by itself, so no process runs out before another.

What a stream cannot give: its length (so --max-steps is required, and an "epoch" is one pass, however long),
a held-out validation split (give --validation), and cleaning across the whole set (duplicates are found within a
chunk of CHUNK_ROWS rows).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterator

import torch

from t5qa.config import DataConfig, EncodeConfig
from t5qa.data import QAExample, clean_examples
from t5qa.data.records import records_to_examples
from t5qa.encode import encode_for_training
from t5qa.errors import DataError

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1000
"""Rows read into examples and cleaned together."""
STREAM_BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                   ".parquet": "parquet"}


def open_stream(source: str, config: DataConfig) -> Any:
    """A `datasets.IterableDataset` of the rows of `source` (a local file, or a Hub dataset name).

    Raises:
        DataError: a format that does not stream, or a Hub dataset that cannot be reached; one line.
    """
    import datasets

    path = Path(source)
    if path.exists():
        builder = STREAM_BUILDERS.get(path.suffix.lower()) if path.is_file() else None
        if builder is None:
            raise DataError(f"{source}: --streaming reads one question per row, from a JSON-lines, CSV, TSV or "
                            f"Parquet file or a Hub dataset; convert it first (t5qa data prepare {source} "
                            f"--output FILE.jsonl) or train without --streaming")
        options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
    try:
        return datasets.load_dataset(source, split=config.hf_split or "train", streaming=True)
    except (ConnectionError, OSError) as exc:
        raise DataError(f"{source}: not a local file, and the Hugging Face Hub is unreachable to stream it as a "
                        f"dataset ({type(exc).__name__}); pass a local file instead") from None
    except (ValueError, datasets.exceptions.DatasetNotFoundError) as exc:  # type: ignore[attr-defined]
        raise DataError(f"{source}: no such local file, and not a Hub dataset to stream ({exc})") from None


class PaddedBatch(list):
    """One process's share of a global micro-batch: its features, and the lengths the whole global batch pads to
    (read by `encode.make_collator`), so the N shares collate to tensors of one shape."""

    def __init__(self, features: list[dict[str, Any]], source_length: int, target_length: int) -> None:
        super().__init__(features)
        self.source_length = source_length
        self.target_length = target_length


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))


class StreamedBatches(torch.utils.data.IterableDataset):
    """Length-grouped micro-batches (lists of training features) of a streamed training set.

    Iterate it through a DataLoader with `batch_size=None` and the collator; `set_epoch` starts another pass,
    shuffled anew. `peek_features` encodes the first buffer for what training decides before step one (the
    answer length, the fast paths' proof batch). With `processes` N > 1 the items are the N shares of each
    global micro-batch (`PaddedBatch`), and iteration does not end: pass after pass, from `set_epoch`'s.
    """

    def __init__(self, source: str, data_config: DataConfig, tokenizer: Any, encode: EncodeConfig, *,
                 batch_size: int, buffer_size: int, seed: int, processes: int = 1) -> None:
        super().__init__()
        self.source = source
        self.data_config = data_config
        self.tokenizer = tokenizer
        self.encode = encode
        self.batch_size = batch_size
        self.processes = max(1, processes)
        self.buffer_size = max(buffer_size, batch_size * self.processes)
        self.seed = seed
        self.epoch = 0
        self.rows_read = 0
        self.pass_features = 0
        self.dropped: dict[str, int] = {}
        open_stream(source, data_config)  # a source that cannot stream fails here, before training starts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _examples(self, epoch: int) -> Iterator[QAExample]:
        stream = open_stream(self.source, self.data_config).shuffle(seed=self.seed, buffer_size=self.buffer_size)
        stream.set_epoch(epoch)
        chunk: list[tuple[str, dict[str, Any]]] = []
        for row in stream:
            self.rows_read += 1
            chunk.append((f"streamed row {self.rows_read}", row))
            if len(chunk) == CHUNK_ROWS:
                yield from self._clean(chunk)
                chunk = []
        if chunk:
            yield from self._clean(chunk)
        dropped = sum(self.dropped.values())
        logger.info("one pass over the stream %s: %d rows read so far, %d dropped by cleaning%s", self.source,
                    self.rows_read, dropped, f" ({_reasons(self.dropped)})" if dropped else "")

    def _clean(self, chunk: list[tuple[str, dict[str, Any]]]) -> list[QAExample]:
        columns = list(dict.fromkeys(key for _, row in chunk for key in row))
        examples = records_to_examples(chunk, columns, self.data_config, self.source)
        kept, report = clean_examples(examples, self.data_config)
        for reason, count in report.dropped.items():
            if reason not in self.dropped:  # the first of each kind is said at once; the counts at each pass's end
                where = ", ".join(report.examples.get(reason, [])[:2])
                logger.warning("%s: streamed rows dropped by cleaning (%s), e.g. %s", self.source, reason, where)
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        return kept

    def _buffers(self, epoch: int) -> Iterator[list[QAExample]]:
        buffer: list[QAExample] = []
        for example in self._examples(epoch):
            buffer.append(example)
            if len(buffer) >= self.buffer_size:
                yield buffer
                buffer = []
        if buffer:
            yield buffer

    def peek_features(self) -> tuple[list[dict[str, Any]], Any]:
        """The training features of the stream's first buffer (of this pass), in stream order, with their
        EncodeStats."""
        for buffer in self._buffers(self.epoch):
            return encode_for_training(buffer, self.tokenizer, self.encode)
        raise DataError(f"{self.source}: no training examples in the stream; check the file and the column flags")

    def _grouped(self, epoch: int, size: int, carry: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """One pass's micro-batches of `size` features, length-grouped per buffer and shuffled. With `carry` (a
        list, updated in place), features that do not fill a batch wait in it for the next buffer rather than
        making a short batch."""
        rng = random.Random(f"{self.seed}-{epoch}")  # a str seed: the same batches in every process start
        self.pass_features = 0
        for buffer in self._buffers(epoch):
            encoded, _ = encode_for_training(buffer, self.tokenizer, self.encode)
            self.pass_features += len(encoded)
            features = carry + encoded  # rows carried over from the last buffer come first
            order = sorted(range(len(features)),
                           key=lambda i: (len(features[i]["input_ids"]), len(features[i]["labels"])))
            end = len(order)
            if self.processes > 1:
                end -= end % size
                carry[:] = [features[i] for i in order[end:]]
            batches = [[features[i] for i in order[k:k + size]] for k in range(0, end, size)]
            rng.shuffle(batches)
            yield from batches

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        if self.processes == 1:
            yield from self._grouped(self.epoch, self.batch_size, [])
            return
        size = self.batch_size * self.processes
        carry: list[dict[str, Any]] = []
        epoch = self.epoch
        while True:
            for batch in self._grouped(epoch, size, carry):
                source = max(len(f["input_ids"]) for f in batch)
                target = max(len(f["labels"]) for f in batch)
                for k in range(0, size, self.batch_size):
                    yield PaddedBatch(batch[k:k + self.batch_size], source, target)
            if not self.pass_features:
                raise DataError(f"{self.source}: a pass over the stream gave no training examples")
            epoch += 1
