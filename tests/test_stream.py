"""`train --streaming`: training from a `datasets` stream, with length-grouped micro-batches from a shuffle buffer,
the same batches for the same seed and pass (so resume is exact), and one-line errors for what cannot stream."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import synthetic_copy_examples
from t5qa.config import DataConfig, EncodeConfig
from t5qa.data import write_jsonl
from t5qa.errors import ConfigError, DataError
from t5qa.stream import StreamedBatches
from test_train import tiny_config

ENCODE = EncodeConfig(max_source_tokens=128, stride_tokens=32, max_target_tokens=16)


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream_file(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "stream.jsonl"
    examples = synthetic_copy_examples(n, seed=21)
    # Lengths that differ a lot, so length grouping has something to group.
    examples = [ex.__class__(ex.id, ex.context + " filler" * (i % 7) * 5, ex.question, ex.answers, ex.answer_starts)
                for i, ex in enumerate(examples)]
    write_jsonl(examples, path)
    return path


def batches(stream: StreamedBatches) -> list[list[int]]:
    return [[len(f["input_ids"]) for f in batch] for batch in stream]


def test_micro_batches_are_length_grouped_and_the_same_for_the_same_pass(tokenizer, tmp_path: Path) -> None:
    path = stream_file(tmp_path)
    stream = StreamedBatches(str(path), DataConfig(), tokenizer, ENCODE, batch_size=4, buffer_size=100, seed=3)
    first = batches(stream)
    assert sum(len(b) for b in first) == 40 and all(len(b) == 4 for b in first)
    ordered = sorted(first, key=lambda b: (min(b), max(b)))
    assert all(max(a) <= min(b) for a, b in zip(ordered, ordered[1:]))  # no two batches' lengths interleave
    assert batches(stream) == first  # the same seed and pass: the same batches (what an exact resume needs)
    stream.set_epoch(1)
    second = batches(stream)
    assert second != first and sorted(map(sorted, second)) == sorted(map(sorted, first))


def test_a_small_buffer_still_covers_every_example_once(tokenizer, tmp_path: Path) -> None:
    path = stream_file(tmp_path)
    stream = StreamedBatches(str(path), DataConfig(), tokenizer, ENCODE, batch_size=4, buffer_size=8, seed=3)
    seen = [tokenizer.decode(f["labels"], skip_special_tokens=True) for batch in stream for f in batch]
    want = [json.loads(line)["answers"][0] for line in path.read_text().splitlines()]
    assert sorted(seen) == sorted(want)


def test_several_processes_get_shares_of_one_processes_batches(tokenizer, tmp_path: Path) -> None:
    import itertools

    from t5qa.encode import make_collator

    path = stream_file(tmp_path)  # 40 examples
    one = StreamedBatches(str(path), DataConfig(), tokenizer, ENCODE, batch_size=8, buffer_size=40, seed=3)
    two = StreamedBatches(str(path), DataConfig(), tokenizer, ENCODE, batch_size=4, buffer_size=40, seed=3,
                          processes=2)
    collate = make_collator(tokenizer)
    shares = list(itertools.islice(two, 20))  # two passes: the iteration goes on into the next pass itself
    for first, second in zip(shares[::2], shares[1::2]):  # what Accelerate's dispatcher concatenates
        a, b = collate(first), collate(second)
        assert a["input_ids"].shape == b["input_ids"].shape and a["labels"].shape == b["labels"].shape
    joined = [[len(f["input_ids"]) for f in shares[k] + shares[k + 1]] for k in range(0, 20, 2)]
    assert joined[:5] == batches(one)  # process i gets the i-th half of one process's batch of 8
    one.set_epoch(1)
    assert joined[5:] == batches(one)

    # A buffer that does not divide into global batches carries its rest into the next buffer: nothing is lost
    # or repeated within a pass, and no share is short.
    odd = StreamedBatches(str(path), DataConfig(), tokenizer, ENCODE, batch_size=4, buffer_size=12, seed=3,
                          processes=2)
    shares = list(itertools.islice(odd, 20))
    assert all(len(share) == 4 for share in shares)
    seen = [tuple(f["input_ids"]) for share in shares for f in share]  # every context is another
    assert len(set(seen)) == 40 and all(seen.count(ids) == 2 for ids in seen)


def test_csv_streams_with_the_column_flags(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["passage", "query", "reply"])
        for ex in synthetic_copy_examples(12, seed=2):
            writer.writerow([ex.context, ex.question, ex.answers[0]])
    config = DataConfig(context_column="passage", question_column="query", answer_column="reply")
    stream = StreamedBatches(str(path), config, tokenizer, ENCODE, batch_size=4, buffer_size=50, seed=0)
    assert sum(len(b) for b in stream) == 12


def test_what_cannot_stream_is_one_line(tokenizer, tmp_path: Path) -> None:
    squad = tmp_path / "squad"
    squad.mkdir()
    with pytest.raises(DataError, match="--streaming reads one question per row"):
        StreamedBatches(str(squad), DataConfig(), tokenizer, ENCODE, batch_size=4, buffer_size=8, seed=0)
    with pytest.raises(ConfigError, match="--streaming needs --max-steps"):
        tiny_config(tmp_path / "model", tmp_path, streaming=True, max_steps=None)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


@pytest.mark.slow
def test_streamed_training_trains_and_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import StopTraining, fit

    path = stream_file(tmp_path, n=24)
    # 24 examples in batches of 4: 6 micro-batches a pass, so 9 steps read the stream twice.
    settings = dict(train=str(path), streaming=True, max_steps=9, eval_every_steps=3, shuffle_buffer=12,
                    train_batch_size=4)
    straight = fit(tiny_config(tiny_model_dir, tmp_path / "a", **settings))
    assert straight.steps == 9
    summary = json.loads((tmp_path / "a" / "run" / "run_summary.json").read_text())
    assert summary["streaming"] is True and summary["examples"] is None and summary["total_steps"] == 9
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 10))
    assert [r["step"] for r in rows if r["split"] == "validation"] == [3, 6, 9]
    card = (tmp_path / "a" / "run" / "best" / "README.md").read_text()
    assert "streamed (read as training went, 9 steps)" in card and "None examples" not in card

    def interrupt(step: int, metrics: dict) -> None:
        if step == 6:
            raise StopTraining("simulated interruption")

    assert fit(tiny_config(tiny_model_dir, tmp_path / "b", **settings), on_evaluate=interrupt).steps == 6
    resumed = fit(tiny_config(tiny_model_dir, tmp_path / "b", resume=True, **settings))
    assert resumed.steps == 9
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rows_dropped_by_cleaning_are_said(tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"context": ex.context, "question": ex.question, "answer": ex.answers[0]}
            for ex in synthetic_copy_examples(6, seed=4)]
    rows.insert(2, {"context": "", "question": "what?", "answer": "x"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    caplog.set_level("INFO", logger="t5qa.stream")
    stream = StreamedBatches(str(path), DataConfig(), tokenizer, ENCODE, batch_size=2, buffer_size=10, seed=0)
    assert sum(len(b) for b in stream) == 6
    assert "dropped by cleaning (empty_context)" in caplog.text
    assert "7 rows read so far, 1 dropped by cleaning (empty_context 1)" in caplog.text
