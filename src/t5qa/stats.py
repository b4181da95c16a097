"""Token statistics of a dataset with a given tokenizer, and plain-language recommendations.

What they answer: how long are the model inputs (the formatted prompt) and the answers in tokens; how many
answers lie past the input limit (so a plain truncating trainer would never see them); and how much of the text
the tokenizer cannot represent (characters that map to the unknown token).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from t5qa.config import EncodeConfig
from t5qa.data import QAExample

logger = logging.getLogger(__name__)

# Above this share of characters mapping to <unk>, training quality suffers visibly.
UNK_WARN_RATE = 0.01
_TOKENIZE_BATCH = 256


@dataclass
class DatasetStats:
    """Token statistics of a dataset for one tokenizer and encode settings."""

    examples: int
    contexts: int
    max_source_tokens: int
    max_target_tokens: int
    source_tokens: dict[str, int] = field(default_factory=dict)
    """Percentiles p50/p90/p99/max of the formatted prompt length, special tokens included."""
    target_tokens: dict[str, int] = field(default_factory=dict)
    """Percentiles p50/p90/p99/max of reference answer lengths (every answer), end-of-sequence included."""
    sources_over_limit: int = 0
    """Prompts longer than max_source_tokens (they need several windows)."""
    answers_lost_to_truncation: int = 0
    """Answerable questions none of whose located answers ends inside the prompt truncated to max_source_tokens."""
    answers_checked: int = 0
    """Answerable questions with a located answer (the denominator of answers_lost_to_truncation)."""
    targets_over_limit: int = 0
    """Reference answers longer than max_target_tokens (their labels are cut)."""
    unk_rate: float = 0.0
    """Fraction of non-space characters (contexts, questions, answers) the tokenizer maps to its unknown token."""
    unk_token: str | None = None
    cjk_share: float = 0.0
    """Fraction of non-space characters that are Chinese, Japanese or Korean."""
    recommendations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def percentiles(values: Sequence[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and the max of integer values ({} when empty)."""
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> int:
        return ordered[max(0, math.ceil(p / 100 * n) - 1)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


# Chinese/Japanese/Korean characters: CJK ideographs (with extensions), kana and hangul syllables.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff]")


def _split_template(template: str, question: str) -> tuple[str, str]:
    """The prompt text before and after the context, with the question filled in."""
    before, after = template.split("{context}", 1)
    return before.replace("{question}", question), after.replace("{question}", question)


def _batched(tokenizer: Any, texts: list[str], **kwargs: Any) -> dict[str, list]:
    out: dict[str, list] = {}
    for i in range(0, len(texts), _TOKENIZE_BATCH):
        # verbose=False: lengths over model_max_length are what we measure, not a mistake to warn about.
        encoded = tokenizer(texts[i : i + _TOKENIZE_BATCH], verbose=False, **kwargs)
        for key in encoded:
            out.setdefault(key, []).extend(encoded[key])
    return out


def compute_stats(examples: Sequence[QAExample], tokenizer: Any, encode: EncodeConfig | None = None) -> DatasetStats:
    """Token statistics of `examples` for `tokenizer` and the prompt/limits of `encode`.

    Each distinct context is tokenised once (with character offsets); a prompt's length is the sum of its pieces
    (text before the context, the context, text after it, special tokens), which matches tokenising the whole
    prompt to within a token or two at the joins. An answer is lost to truncation when its end lies past the
    last context character that fits in `max_source_tokens`.

    Args:
        examples: cleaned examples.
        tokenizer: a Hugging Face tokenizer; a slow one (no offsets of its own) gets them from
            `encode.token_offsets`.
        encode: prompt template and token limits; None uses the defaults.
    Returns:
        The statistics with recommendations.
    """
    encode = encode or EncodeConfig()
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    context_index = {c: i for i, c in enumerate(contexts)}
    fast = bool(getattr(tokenizer, "is_fast", False))
    ctx = _batched(tokenizer, contexts, add_special_tokens=False, return_offsets_mapping=fast)
    ctx_ids: list[list[int]] = ctx.get("input_ids", [])
    if fast:
        ctx_offsets: list[list[tuple[int, int]]] = ctx.get("offset_mapping", [])
    else:
        from t5qa.encode import token_offsets  # slow tokenizers (ByT5, SentencePiece-only): derived offsets

        ctx_offsets = [token_offsets(tokenizer, c) for c in contexts]

    befores, afters = zip(*(_split_template(encode.prompt_template, ex.question) for ex in examples)) \
        if examples else ((), ())
    pieces = list(dict.fromkeys([*befores, *afters]))
    piece_lengths = dict(zip(pieces, (len(ids) for ids in
                                      _batched(tokenizer, pieces, add_special_tokens=False).get("input_ids", []))))
    n_special = tokenizer.num_special_tokens_to_add(pair=False)

    source_lengths = []
    lost = checked = 0
    for ex, before, after in zip(examples, befores, afters):
        i = context_index[ex.context]
        length = piece_lengths[before] + len(ctx_ids[i]) + piece_lengths[after] + n_special
        source_lengths.append(length)
        located = [(s, s + len(a)) for a, s in zip(ex.answers, ex.answer_starts) if s >= 0]
        if not located:
            continue
        checked += 1
        budget = encode.max_source_tokens - n_special - piece_lengths[before]  # context tokens that fit
        if budget <= 0:
            lost += 1
            continue
        if budget >= len(ctx_ids[i]):
            continue
        last_char = ctx_offsets[i][budget - 1][1]
        if all(end > last_char for _, end in located):
            lost += 1

    answers = [a for ex in examples for a in ex.answers]
    target_lengths = [len(ids) for ids in _batched(tokenizer, answers, add_special_tokens=True).get("input_ids", [])]

    unk_rate, cjk_share = _unk_and_cjk(tokenizer, contexts, ctx_ids, ctx_offsets,
                                        list(dict.fromkeys([ex.question for ex in examples] + answers)), fast)
    stats = DatasetStats(
        examples=len(examples),
        contexts=len(contexts),
        max_source_tokens=encode.max_source_tokens,
        max_target_tokens=encode.max_target_tokens,
        source_tokens=percentiles(source_lengths),
        target_tokens=percentiles(target_lengths),
        sources_over_limit=sum(n > encode.max_source_tokens for n in source_lengths),
        answers_lost_to_truncation=lost,
        answers_checked=checked,
        targets_over_limit=sum(n > encode.max_target_tokens for n in target_lengths),
        unk_rate=unk_rate,
        unk_token=getattr(tokenizer, "unk_token", None),
        cjk_share=cjk_share,
    )
    stats.recommendations = recommendations(stats, truncation_checked=True)
    return stats


def _non_space(text: str) -> int:
    return len("".join(text.split()))


def _unk_and_cjk(tokenizer: Any, contexts: list[str], ctx_ids: list[list[int]],
                 ctx_offsets: list[list[tuple[int, int]]] | None, others: list[str], fast: bool) -> tuple[float, float]:
    """(fraction of non-space characters mapped to unk, fraction of non-space characters that are CJK)."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    texts = contexts + others
    total = sum(_non_space(t) for t in texts)
    cjk = sum(len(_CJK.findall(t)) for t in texts)
    if total == 0:
        return 0.0, 0.0
    if unk_id is None:
        return 0.0, cjk / total
    other = _batched(tokenizer, others, add_special_tokens=False, return_offsets_mapping=fast)
    all_ids = ctx_ids + other.get("input_ids", [])
    if fast and ctx_offsets is not None:
        all_offsets = ctx_offsets + other.get("offset_mapping", [])
        unk_chars = 0
        for text, ids, offsets in zip(texts, all_ids, all_offsets):
            for token, (start, end) in zip(ids, offsets):
                if token == unk_id:
                    unk_chars += _non_space(text[start:end])
        return unk_chars / total, cjk / total
    # Without offsets: assume each unknown token stands for one character.
    return min(1.0, sum(ids.count(unk_id) for ids in all_ids) / total), cjk / total


def recommendations(stats: DatasetStats, *, truncation_checked: bool = True) -> list[str]:
    """Plain-language advice from the statistics (empty when nothing needs attention)."""
    advice = []
    if stats.unk_rate >= UNK_WARN_RATE:
        pct = f"{100 * stats.unk_rate:.0f}%" if stats.unk_rate >= 0.01 else f"{100 * stats.unk_rate:.2f}%"
        why = ("Chinese/Japanese/Korean text needs a multilingual tokenizer such as mT5 or ByT5"
               if stats.cjk_share >= 0.2 else
               "use a tokenizer that covers this text (e.g. mT5 or ByT5), or train one with `t5qa init-model`")
        advice.append(f"{pct} of characters map to {stats.unk_token or 'the unknown token'} "
                      f"with this tokenizer: {why}")
    if stats.answers_lost_to_truncation:
        pct = 100 * stats.answers_lost_to_truncation / max(1, stats.answers_checked)
        advice.append(
            f"{stats.answers_lost_to_truncation} answers ({pct:.1f}%) lie past the {stats.max_source_tokens}-token "
            "limit: t5qa trains on a window containing the answer; raise --max-source-tokens or rely on windows"
        )
    elif stats.sources_over_limit:
        advice.append(
            f"{stats.sources_over_limit} inputs exceed {stats.max_source_tokens} tokens and will be read in "
            "overlapping windows"
        )
    if not truncation_checked:
        advice.append("this tokenizer gives no character offsets (not a fast tokenizer): truncation losses not checked")
    if stats.targets_over_limit:
        p99 = stats.target_tokens.get("p99", 0)
        advice.append(
            f"{stats.targets_over_limit} answers are longer than --max-target-tokens {stats.max_target_tokens} "
            f"and will be cut; raise it (p99 of answers is {p99} tokens)"
        )
    return advice

