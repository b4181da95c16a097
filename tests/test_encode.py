"""Prompt formatting, long-context windows, training features, collation and length grouping."""

from __future__ import annotations

import random

import pytest
import torch

from t5qa.config import EncodeConfig
from t5qa.data import QAExample
from t5qa.encode import (
    LengthGroupedSampler,
    encode_for_training,
    encode_windows,
    format_source,
    make_collator,
)


def test_format_source_keeps_braces_in_user_text():
    assert format_source("q: {question} c: {context}", "what is {x}?", "a {b} c") == "q: what is {x}? c: a {b} c"


def _long_context(n: int = 40) -> str:
    return " . ".join(f"alpha bravo {i % 10} charlie" for i in range(n)) + " . the code is kilo ."


def test_short_context_is_one_window(tiny_tokenizer):
    cfg = EncodeConfig(max_source_tokens=128, stride_tokens=16)
    windows = encode_windows(tiny_tokenizer, "what is the code?", "the code is kilo .", cfg)
    assert len(windows) == 1 and windows[0].num_windows == 1
    assert windows[0].input_ids[-1] == tiny_tokenizer.eos_token_id


def test_long_context_windows_fit_overlap_and_cover_everything(tiny_tokenizer):
    cfg = EncodeConfig(max_source_tokens=48, stride_tokens=12)
    context = _long_context()
    windows = encode_windows(tiny_tokenizer, "what is the code?", context, cfg)
    assert len(windows) > 2
    assert all(len(w.input_ids) <= 48 for w in windows)
    assert windows[0].context_char_start == 0 and windows[-1].context_char_end == len(context)
    for left, right in zip(windows, windows[1:]):
        assert right.context_char_start < left.context_char_end, "consecutive windows must overlap"
    # every window is the prompt with its slice of the context
    text = tiny_tokenizer.decode(windows[1].input_ids, skip_special_tokens=True)
    assert text.startswith("question: what is the code? context:")


def test_training_keeps_the_window_that_holds_the_answer(tiny_tokenizer):
    cfg = EncodeConfig(max_source_tokens=48, stride_tokens=12)
    context = _long_context()
    start = context.index("kilo")
    far = QAExample("far", context, "what is the code?", ("kilo",), (start,))
    near = QAExample("near", "the code is kilo .", "what is the code?", ("kilo",), (12,))
    features, stats = encode_for_training([far, near], tiny_tokenizer, cfg)
    assert stats.examples == 2 and stats.needed_window == 1 and stats.answer_outside_every_window == 0
    assert all(len(f["input_ids"]) <= 48 for f in features)
    kept = tiny_tokenizer.decode(features[0]["input_ids"], skip_special_tokens=True)
    assert "kilo" in kept, "plain truncation would have cut the answer away"
    assert tiny_tokenizer.decode(features[0]["labels"], skip_special_tokens=True) == "kilo"
    assert [f["example_index"] for f in features] == [0, 1]


def test_unanswerable_target_is_end_of_sequence_only(tiny_tokenizer):
    ex = QAExample("u", "the code is kilo .", "what is the city?", (), ())
    features, _ = encode_for_training([ex], tiny_tokenizer, EncodeConfig())
    assert features[0]["labels"] == [tiny_tokenizer.eos_token_id]


def test_long_targets_are_cut_and_counted(tiny_tokenizer):
    answer = "alpha bravo charlie echo foxtrot golf hotel india"
    ex = QAExample("t", f"x {answer} y", "q?", (answer,), (2,))
    features, stats = encode_for_training([ex], tiny_tokenizer, EncodeConfig(max_target_tokens=4))
    assert stats.truncated_targets == 1
    assert len(features[0]["labels"]) == 4 and features[0]["labels"][-1] == tiny_tokenizer.eos_token_id


def test_collator_pads_dynamically_and_masks_labels(tiny_tokenizer):
    collate = make_collator(tiny_tokenizer)
    batch = collate([{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [5, 1], "labels": [1]}])
    assert batch["input_ids"].shape == (2, 3)  # longest in batch, not a fixed maximum
    assert batch["input_ids"][1].tolist() == [5, 1, tiny_tokenizer.pad_token_id]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1], [1, -100]]


def test_collator_pads_to_multiple(tiny_tokenizer):
    batch = make_collator(tiny_tokenizer, pad_to_multiple_of=8)([{"input_ids": [5, 1], "labels": [1]}])
    assert batch["input_ids"].shape == (1, 8) and batch["labels"].shape == (1, 8)


def test_length_grouped_sampler_groups_lengths_and_is_reproducible():
    lengths = [((i * 37) % 101) + 1 for i in range(400)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=10)
    order = list(sampler)
    assert sorted(order) == list(range(400))  # a permutation: nothing lost or repeated
    assert order == list(LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=10))
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new order each epoch
    # padding waste: grouped batches pad far less than random batches
    def waste(indices):
        total = 0
        for k in range(0, len(indices), 8):
            batch = [lengths[i] for i in indices[k:k + 8]]
            total += max(batch) * len(batch) - sum(batch)
        return total
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert waste(order) < 0.3 * waste(shuffled)


def test_length_grouped_sampler_keeps_the_short_batch_last():
    sampler = LengthGroupedSampler(list(range(21)), batch_size=4, seed=0, group_batches=2)
    order = list(sampler)
    assert len(order) == 21
    # all full batches first: every aligned chunk of 4 before the tail comes from one sorted group
    tail = order[20:]
    assert len(tail) == 1


def test_length_grouped_sampler_groups_target_lengths_too():
    rng = random.Random(0)
    sources = [rng.randint(20, 380) for _ in range(803)]
    targets = [min(30, int(rng.expovariate(1 / 6)) + 2) for _ in range(803)]  # short answers, a long tail

    def padded(order, lengths):
        chunks = [order[k:k + 8] for k in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in c) * len(c) for c in chunks)

    plain = list(LengthGroupedSampler(sources, batch_size=8, seed=1, group_batches=50))
    grouped_sampler = LengthGroupedSampler(sources, batch_size=8, seed=1, group_batches=50, target_lengths=targets)
    grouped = list(grouped_sampler)
    assert sorted(grouped) == list(range(803))  # a permutation
    assert grouped == list(LengthGroupedSampler(sources, batch_size=8, seed=1, group_batches=50,
                                                target_lengths=targets))
    assert padded(grouped, targets) < 0.8 * padded(plain, targets)  # far less target padding
    assert padded(grouped, sources) < 1.1 * padded(plain, sources)  # for a little more source padding
    # every batch but the last is full, so the DataLoader's chunks stay aligned with the groups
    chunks = [grouped[k:k + 8] for k in range(0, 803, 8)]
    assert all(len(c) == 8 for c in chunks[:-1]) and len(chunks[-1]) == 3
    with pytest.raises(ValueError, match="one entry per example"):
        LengthGroupedSampler(sources, batch_size=8, target_lengths=targets[:-1])


# --- tokenizers without offsets (ByT5, SentencePiece-only) --------------------------------------------------


class _SlowView:
    """A fast tokenizer seen as a slow one: same tokens, but no offsets of its own."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


_ZH = ("异常检测（anomaly detection）是机器学习的一个分支，用于发现与大多数数据显著不同的样本。"
       "异常检测的示例是信用卡欺诈检测：银行根据交易记录找出可疑的交易。")


def test_slow_route_gives_the_fast_offsets_and_windows(tiny_tokenizer):
    from t5qa.encode import _context_spans, token_offsets

    context = _long_context(60) + " Credit card fraud detection; 2018年 (ok) 'x'."
    slow = _SlowView(tiny_tokenizer)
    assert token_offsets(slow, context) == token_offsets(tiny_tokenizer, context)
    cfg = EncodeConfig(max_source_tokens=64, stride_tokens=16)
    assert _context_spans(slow, "what is the code?", context, cfg) == \
        _context_spans(tiny_tokenizer, "what is the code?", context, cfg)
    windows = encode_windows(slow, "what is the code?", context, cfg)
    assert len(windows) > 2 and [w.input_ids for w in windows] == \
        [w.input_ids for w in encode_windows(tiny_tokenizer, "what is the code?", context, cfg)]


@pytest.mark.shared_data
def test_sentencepiece_only_tokenizer_matches_the_fast_one(t5_small_tokenizer_dir):
    from transformers import AutoTokenizer, SentencePieceBackend

    from t5qa.encode import token_offsets

    fast = AutoTokenizer.from_pretrained(t5_small_tokenizer_dir)
    slow = SentencePieceBackend(vocab_file=str(t5_small_tokenizer_dir / "spiece.model"))
    assert not slow.is_fast
    # English with a lone word-start piece ("▁" before "A"), and Chinese that the T5 vocabulary maps to <unk>
    for text in ("SIGNR Are A Associated with 1,000 U.S. cases (2020).", _ZH * 3):
        assert token_offsets(slow, text) == token_offsets(fast, text)


def test_byte_level_windows_fit_and_cover_a_long_chinese_context():
    from transformers import ByT5Tokenizer

    from t5qa.encode import token_offsets

    tokenizer = ByT5Tokenizer()
    context = _ZH * 12
    assert len(context.encode("utf-8")) > 2000
    offsets = token_offsets(tokenizer, context)
    assert len(offsets) == len(context.encode("utf-8"))
    cfg = EncodeConfig(max_source_tokens=256, stride_tokens=64)
    question = "异常检测的示例是什么？"
    windows = encode_windows(tokenizer, question, context, cfg)
    assert len(windows) > 5
    assert all(len(w.input_ids) <= 256 for w in windows)
    assert windows[0].context_char_start == 0 and windows[-1].context_char_end == len(context)
    for before, after in zip(windows, windows[1:]):
        assert after.context_char_start < before.context_char_end  # they overlap
    # A window is whole characters: its text re-encodes to exactly the bytes in its input
    for w in windows:
        piece = context[w.context_char_start:w.context_char_end]
        assert bytes(i - 3 for i in w.input_ids if i >= 3).decode("utf-8").endswith(piece)
    answer = "信用卡欺诈检测"
    start = context.index(answer, len(context) // 2)
    example = QAExample("zh-1", context, question, (answer,), (start,))
    features, stats = encode_for_training([example], tokenizer, cfg)
    assert stats.needed_window == 1 and stats.answer_outside_every_window == 0
    assert len(features[0]["input_ids"]) <= 256
    assert answer.encode("utf-8") in bytes(i - 3 for i in features[0]["input_ids"] if i >= 3)
