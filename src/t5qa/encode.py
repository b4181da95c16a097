"""From QA examples to model inputs: prompt template, tokenisation, long-context windows, collation.

Shapes: a feature is one model input, {"input_ids": list[int] (<= max_source_tokens), "labels": list[int]
(<= max_target_tokens, ends with </s>)}. The collator turns a list of features into padded tensors of shape
(batch, longest_source_in_batch) and (batch, longest_target_in_batch).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from t5qa.config import NO_ANSWER_TEXT, EncodeConfig
from t5qa.data import QAExample


# Tokens kept free in each window's budget, because a context slice tokenised inside the prompt can take a
# token or two more than the same slice tokenised alone (word-boundary pieces).
_WINDOW_MARGIN_TOKENS = 2


def format_source(template: str, question: str, context: str) -> str:
    """Fill the prompt template. Only the template is parsed, so braces in user text are safe."""
    return template.format_map({"question": question, "context": context})


@dataclass
class Window:
    """One model input for one (context, question) pair."""

    input_ids: list[int]
    context_char_start: int
    context_char_end: int
    window_index: int
    num_windows: int


def _context_spans(
    tokenizer: Any, question: str, context: str, cfg: EncodeConfig
) -> list[tuple[int, int]]:
    """Character spans of the context, one per window, overlapping by cfg.stride_tokens tokens."""
    empty_prompt = format_source(cfg.prompt_template, question, "")
    fixed_tokens = len(tokenizer(empty_prompt)["input_ids"])  # prefix + suffix + </s>
    budget = max(8, cfg.max_source_tokens - fixed_tokens - _WINDOW_MARGIN_TOKENS)
    stride = min(cfg.stride_tokens, budget // 2)
    offsets = token_offsets(tokenizer, context)
    if len(offsets) <= budget:
        return [(0, len(context))]
    spans = []
    start = 0
    while True:
        end = min(len(offsets), start + budget)
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end == len(offsets):
            return spans
        start = end - stride


def token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets in `text` of each token of `tokenizer(text, add_special_tokens=False)`.

    Fast tokenizers report them; slow ones (ByT5's byte tokenizer, SentencePiece-only tokenizers) cannot, so
    they are derived: exactly from the UTF-8 bytes for byte-level tokenizers, by aligning each token's text with
    `text` otherwise. A window cut at these offsets then holds at most the tokens it was given.
    """
    if getattr(tokenizer, "is_fast", False):
        return list(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    if _is_byte_level(tokenizer):
        offsets = _byte_offsets(text)
        if len(offsets) == len(tokenizer(text, add_special_tokens=False)["input_ids"]):
            return offsets
        # Special-token text inside `text` ("</s>") is one token, not bytes: align instead.
    return _aligned_offsets(tokenizer, text)


def _is_byte_level(tokenizer: Any) -> bool:
    from transformers import ByT5Tokenizer

    return isinstance(tokenizer, ByT5Tokenizer)


def _byte_offsets(text: str) -> list[tuple[int, int]]:
    """One (start, end) per UTF-8 byte. A character of several bytes starts at its first byte and ends at its
    last, so a window that cuts through a character leaves it out instead of holding more bytes than it may."""
    offsets: list[tuple[int, int]] = []
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        offsets.extend((i if k == 0 else i + 1, i + 1 if k == n - 1 else i) for k in range(n))
    return offsets


def _aligned_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Offsets of a slow tokenizer's tokens, found by locating each token's own text in `text` in order.

    A token whose text cannot be found where expected (`<unk>` for characters outside the vocabulary, a
    normalised form) spans the text from the previous token's end to the next found token's start, as a fast
    tokenizer reports an unknown run. On the t5-small vocabulary this gives the fast tokenizer's offsets
    exactly, for English and for Chinese (tests/test_encode.py).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # tokenize() keeps an unknown run's own characters (SentencePiece's surface form), where decoding its
    # id gives "<unk>"; use it when it yields one piece per id.
    tokens = tokenizer.tokenize(text)
    if len(tokens) == len(ids):
        pieces = [tokenizer.convert_tokens_to_string([token]) for token in tokens]
    else:
        pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
    offsets: list[tuple[int, int]] = []
    unplaced: list[int] = []  # tokens waiting for the next found token to close their span

    def close(end: int) -> None:
        for k in unplaced:
            start = offsets[k][0]
            offsets[k] = (start, max(start, len(text[start:end].rstrip()) + start))
        unplaced.clear()

    cursor = 0
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            # A lone word-start marker ("▁" before a piece that begins a word): fast SentencePiece tokenizers
            # give it the span of the next character, so do the same.
            nxt = len(text) - len(text[cursor:].lstrip())
            offsets.append((nxt, min(nxt + 1, len(text))))
            continue
        found = text.find(piece, cursor, cursor + len(piece) + 16) if not unplaced else text.find(piece, cursor)
        if found == -1:
            start = len(text) - len(text[cursor:].lstrip())
            offsets.append((start, start))
            unplaced.append(len(offsets) - 1)
            continue
        close(found)
        offsets.append((found, found + len(piece)))
        cursor = found + len(piece)
    close(len(text))
    return offsets


def encode_windows(tokenizer: Any, question: str, context: str, cfg: EncodeConfig) -> list[Window]:
    """All model inputs needed to cover `context`: one when the prompt fits, else overlapping windows.

    Args:
        tokenizer: a transformers fast tokenizer.
        question, context: the pair to encode.
        cfg: prompt template, max_source_tokens, stride_tokens.
    Returns:
        Windows in context order; each input fits cfg.max_source_tokens.
    """
    whole = tokenizer(format_source(cfg.prompt_template, question, context))["input_ids"]
    if len(whole) <= cfg.max_source_tokens:
        return [Window(whole, 0, len(context), 0, 1)]
    spans = _context_spans(tokenizer, question, context, cfg)
    sources = [format_source(cfg.prompt_template, question, context[a:b]) for a, b in spans]
    ids = tokenizer(sources, truncation=True, max_length=cfg.max_source_tokens)["input_ids"]
    return [Window(list(i), a, b, k, len(spans)) for k, (i, (a, b)) in enumerate(zip(ids, spans))]


@dataclass
class EncodeStats:
    """What encoding did to a dataset, for the run summary."""

    examples: int = 0
    needed_window: int = 0
    """Examples whose prompt was longer than max_source_tokens (cut to the window holding the answer)."""
    answer_outside_every_window: int = 0
    """Answerable examples whose answer lies in no window (answer not found in the context)."""
    truncated_targets: int = 0
    """Answers longer than max_target_tokens (their labels were cut)."""


def _answer_span(example: QAExample) -> tuple[int, int] | None:
    if not example.answers:
        return None
    start = example.answer_starts[0] if example.answer_starts else -1
    if start < 0:
        start = example.context.find(example.answers[0])
    if start < 0:
        return None
    return start, start + len(example.answers[0])


def encode_for_training(
    examples: Sequence[QAExample], tokenizer: Any, cfg: EncodeConfig
) -> tuple[list[dict[str, Any]], EncodeStats]:
    """One teacher-forced feature per example (for training, and for the validation loss); a long context is cut
    to the window that holds the answer.

    Tokenises in batches (the fast tokenizer's Rust loop) and only re-tokenises the long contexts.
    """
    stats = EncodeStats(examples=len(examples))
    sources = [format_source(cfg.prompt_template, ex.question, ex.context) for ex in examples]
    targets = [ex.answers[0] if ex.answers else NO_ANSWER_TEXT for ex in examples]
    source_ids = tokenizer(sources)["input_ids"] if sources else []
    target_ids = tokenizer(text_target=targets)["input_ids"] if targets else []
    features: list[dict[str, Any]] = []
    for index, (ex, src, tgt) in enumerate(zip(examples, source_ids, target_ids)):
        if len(src) > cfg.max_source_tokens:
            stats.needed_window += 1
            src = _window_holding_answer(ex, tokenizer, cfg, stats)
        if len(tgt) > cfg.max_target_tokens:
            stats.truncated_targets += 1
            tgt = list(tgt[: cfg.max_target_tokens - 1]) + [tokenizer.eos_token_id]
        features.append({"input_ids": list(src), "labels": list(tgt), "example_index": index})
    return features, stats  # the callers say what the windows mean for them (training, or validation loss)


def _window_holding_answer(ex: QAExample, tokenizer: Any, cfg: EncodeConfig, stats: EncodeStats) -> list[int]:
    spans = _context_spans(tokenizer, ex.question, ex.context, cfg)
    answer = _answer_span(ex)
    chosen = spans[0]
    if answer is not None:
        inside = [s for s in spans if s[0] <= answer[0] and answer[1] <= s[1]]
        if inside:
            # The window in which the answer sits most centrally gives the model context on both sides.
            middle = (answer[0] + answer[1]) / 2
            chosen = min(inside, key=lambda s: abs((s[0] + s[1]) / 2 - middle))
        else:
            stats.answer_outside_every_window += 1
    elif ex.answers:
        stats.answer_outside_every_window += 1
    source = format_source(cfg.prompt_template, ex.question, ex.context[chosen[0]:chosen[1]])
    return tokenizer(source, truncation=True, max_length=cfg.max_source_tokens)["input_ids"]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, length): the token id lists padded on the right with `pad_id` to
    `length` (default: the longest). The one padding routine of training batches and of the Predictor."""
    length = max(len(s) for s in sequences) if length is None else length
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def make_collator(tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> Callable[[list[dict]], dict]:
    """A collate function with dynamic padding: pad to the longest sequence in the batch, labels with -100.

    Written here instead of DataCollatorForSeq2Seq because features are already token ids: filling two
    preallocated tensors is several times cheaper per batch than tokenizer.pad's per-example Python work.
    """
    pad_id = tokenizer.pad_token_id

    def round_up(n: int) -> int:
        if pad_to_multiple_of:
            return -(-n // pad_to_multiple_of) * pad_to_multiple_of
        return n

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch_size = len(features)
        sources = [f["input_ids"] for f in features]
        # A share of a bigger batch (stream.PaddedBatch) pads to that batch's lengths.
        source_len = max(max(len(s) for s in sources), getattr(features, "source_length", 0))
        input_ids, attention_mask = pad_batch(sources, pad_id, round_up(source_len))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}  # (batch, source_len) each
        if "labels" in features[0]:
            target_len = round_up(max(max(len(f["labels"]) for f in features),
                                      getattr(features, "target_length", 0)))
            labels = torch.full((batch_size, target_len), -100, dtype=torch.long)  # (batch, target_len)
            for row, f in enumerate(features):
                labels[row, : len(f["labels"])] = torch.as_tensor(f["labels"], dtype=torch.long)
            batch["labels"] = labels
        if "example_index" in features[0]:
            batch["example_index"] = torch.as_tensor([f["example_index"] for f in features], dtype=torch.long)
        return batch

    return collate


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Random order, but each run of `batch_size` indices has similar lengths, so padding wastes little.

    Indices are shuffled, cut into mega-batches of `batch_size * group_batches`, each sorted by length and
    cut into batches; the batch order is shuffled again. The order depends only on (seed, epoch), which is
    what makes resuming mid-epoch exact.

    With `target_lengths`, each mega-batch is first split into target-length classes (up to 4 tokens, 5-8,
    9-16, 17-32, ...) and each class is sorted by source length and cut into batches on its own; the few left
    over from every class are batched together. Targets are then padded to less than twice their length in
    most batches: on TyDi QA, grouping by source length alone pads targets to 2.8x their real length (36% real
    tokens), and a decoder token costs about twice an encoder token in t5-small.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, group_batches: int = 50,
                 shuffle: bool = True, target_lengths: Sequence[int] | None = None) -> None:
        self.lengths = list(lengths)
        self.target_lengths = list(target_lengths) if target_lengths is not None else None
        if self.target_lengths is not None and len(self.target_lengths) != len(self.lengths):
            raise ValueError("target_lengths must have one entry per example")
        self.batch_size = batch_size
        self.seed = seed
        self.group_batches = group_batches
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order __iter__ yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _target_class(self, index: int) -> int:
        if self.target_lengths is None:
            return 0
        return max(0, (self.target_lengths[index] - 1).bit_length() - 2)  # <=4: 0, 5-8: 1, 9-16: 2, ...

    def _batches_of(self, mega_batch: list[int]) -> list[list[int]]:
        by_length = lambda i: -self.lengths[i]  # noqa: E731 - longest first, ties keep the shuffled order
        classes: dict[int, list[int]] = {}
        for i in mega_batch:
            classes.setdefault(self._target_class(i), []).append(i)
        batches: list[list[int]] = []
        left_over: list[int] = []
        for _, members in sorted(classes.items()):
            members.sort(key=by_length)
            full = len(members) - len(members) % self.batch_size
            batches.extend(members[k:k + self.batch_size] for k in range(0, full, self.batch_size))
            left_over.extend(members[full:])
        left_over.sort(key=by_length)
        batches.extend(left_over[k:k + self.batch_size] for k in range(0, len(left_over), self.batch_size))
        return batches

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        indices = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(indices)
        mega = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(indices), mega):
            batches.extend(self._batches_of(indices[start:start + mega]))
        if self.shuffle:
            rng.shuffle(batches)
        # At most one batch is short (the tail); keep it last so the DataLoader's consecutive chunks of
        # batch_size indices stay aligned with these length groups.
        batches.sort(key=lambda b: len(b) < self.batch_size)
        for batch in batches:
            yield from batch


def feature_lengths(features: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(source lengths, target lengths) of training features: a list of them, or the cached ones
    (encode_cache.CachedFeatures, which keeps them in columns of their own)."""
    if hasattr(features, "lengths"):
        return features.lengths()
    return [len(f["input_ids"]) for f in features], [len(f["labels"]) for f in features]


def answer_length_p99(features: Sequence[dict[str, Any]]) -> int:
    """99th percentile of the training answers' token lengths, + 1 for </s>: the default max_new_tokens."""
    # labels end with </s>, so len(labels) - 1 answer tokens
    lengths = [n - 1 for n in feature_lengths(features)[1]] or [0]
    return int(math.ceil(float(np.percentile(lengths, 99)))) + 1
