"""The on-disk cache of tokenised training sets (t5qa.encode_cache): the same features as encoding in memory, read
back without tokenising, keyed by data, tokenizer and settings, never trusted half-written; training on it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import synthetic_copy_examples
from t5qa.config import EncodeConfig
from t5qa.encode import encode_for_training, feature_lengths
from t5qa.encode_cache import STATS_FILE, cache_key, encode_cached
from test_train import tiny_config

CFG = EncodeConfig(max_source_tokens=48, stride_tokens=16, max_target_tokens=8)


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def examples(n: int = 30, seed: int = 3, filler: int = 12):
    return synthetic_copy_examples(n, seed=seed, filler_words=filler)


def test_cached_features_equal_the_in_memory_ones_and_are_read_back(tokenizer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = examples()
    want, want_stats = encode_for_training(data, tokenizer, CFG)
    assert want_stats.needed_window > 0  # long contexts: the windowed path is part of what is cached
    got, stats, hit = encode_cached(data, tokenizer, CFG, cache_dir=tmp_path)
    assert not hit and list(got) == want and stats == want_stats
    assert feature_lengths(got) == feature_lengths(want)

    import t5qa.encode_cache as module

    def no_tokenising(*args, **kwargs):
        raise AssertionError("a cached set was tokenised again")

    monkeypatch.setattr(module, "encode_for_training", no_tokenising)
    again, stats_again, hit = encode_cached(data, tokenizer, CFG, cache_dir=tmp_path)
    assert hit and list(again) == want and stats_again == want_stats
    assert again[2:4] == want[2:4]


def test_the_key_follows_the_data_the_tokenizer_and_the_settings(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = examples()
    key = cache_key(data, tokenizer, CFG)
    assert cache_key(examples(), tokenizer, CFG) == key
    changed = [dataclasses.replace(data[0], answers=("other",)), *data[1:]]
    assert cache_key(changed, tokenizer, CFG) != key
    assert cache_key(data, tokenizer, dataclasses.replace(CFG, max_source_tokens=64)) != key
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra-token-for-the-key>"])
    assert cache_key(data, other, CFG) != key


def test_several_processes_encode_the_same_features(tokenizer, tmp_path: Path) -> None:
    data = examples(n=40)
    one, _, _ = encode_cached(data, tokenizer, CFG, cache_dir=tmp_path / "a")
    two, _, _ = encode_cached(data, tokenizer, CFG, cache_dir=tmp_path / "b", num_proc=2)
    assert len(list((tmp_path / "b").rglob("encoded*.arrow"))) == 2  # one file per process
    assert list(two) == list(one)


def test_a_cache_without_its_stats_file_is_encoded_again(tokenizer, tmp_path: Path) -> None:
    data = examples()
    encode_cached(data, tokenizer, CFG, cache_dir=tmp_path)
    stats_file = next(tmp_path.rglob(STATS_FILE))
    stats_file.unlink()  # as if the run was killed after the Arrow files, before the stats
    got, _, hit = encode_cached(data, tokenizer, CFG, cache_dir=tmp_path)
    assert not hit and list(got) == encode_for_training(data, tokenizer, CFG)[0] and stats_file.is_file()


@pytest.mark.slow
def test_training_on_the_cache_trains_like_training_in_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit

    def losses(run: Path) -> list[float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "train"]

    cache = tmp_path / "cache"
    settings = dict(max_steps=4, encode_cache_dir=str(cache))
    fit(tiny_config(tiny_model_dir, tmp_path / "memory", encode_cache="never", **settings))
    fit(tiny_config(tiny_model_dir, tmp_path / "first", encode_cache="always", **settings))
    fit(tiny_config(tiny_model_dir, tmp_path / "second", encode_cache="always", **settings))
    summaries = [json.loads((tmp_path / name / "run" / "run_summary.json").read_text())
                 for name in ("memory", "first", "second")]
    assert [s["encode_cache"] for s in summaries] == ["off", "written", "read"]
    assert summaries[2]["truncated_targets"] == summaries[0]["truncated_targets"]
    assert losses(tmp_path / "second" / "run") == losses(tmp_path / "first" / "run") == \
        losses(tmp_path / "memory" / "run")


def test_a_second_run_on_unchanged_files_reads_neither_their_questions_nor_their_text(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import t5qa.train as train
    from t5qa.data import QAExample, write_jsonl

    train_file = tmp_path / "questions.jsonl"  # tiny_config writes its own files afresh each time
    write_jsonl(synthetic_copy_examples(24, seed=3), train_file)
    settings = dict(train=str(train_file), encode_cache="always", encode_cache_dir=str(tmp_path / "cache"),
                    validation=None, val_fraction=0.25)
    first = train.setup(tiny_config(tiny_model_dir, tmp_path, output=str(tmp_path / "a"), **settings))
    assert first.summary["encode_cache"] == "written"

    def no_reading(*args, **kwargs):
        raise AssertionError("the data files were read again")

    with monkeypatch.context() as patch:
        patch.setattr(train, "load_run_examples", no_reading)
        second = train.setup(tiny_config(tiny_model_dir, tmp_path, output=str(tmp_path / "b"), **settings))
    assert second.summary["encode_cache"] == "read" and second.train_examples == first.train_examples == 18
    assert second.validation_examples == first.validation_examples  # the same held-out questions, sources and all
    assert all(isinstance(ex, QAExample) for ex in second.validation_examples)
    assert second.summary["cleaning"] == first.summary["cleaning"]
    assert list(second.train_loader.dataset) == list(first.train_loader.dataset)

    # A changed file, or another split, is read and cleaned again.
    train_file.write_text(train_file.read_text() + train_file.read_text().splitlines()[0].replace(
        '"id": "', '"id": "extra-').replace('?"', ' again?"') + "\n")
    changed = train.setup(tiny_config(tiny_model_dir, tmp_path, output=str(tmp_path / "c"), **settings))
    assert changed.summary["cleaning"]["training"]["total_in"] == 25
    resplit = train.setup(tiny_config(tiny_model_dir, tmp_path, output=str(tmp_path / "d"),
                                      **{**settings, "val_fraction": 0.5}))
    assert len(resplit.validation_examples) != len(first.validation_examples)
