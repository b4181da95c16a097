"""Grounded answers: an answer that is a contiguous span of its context, and where that span is.

`SpanConstraint` is the prefix constraint `--grounded` decodes under: after the answer tokens so far, the next token
must continue them as a run of the context window's own tokens (or be </s>, the end). It plugs into transformers'
`generate(prefix_allowed_tokens_fn=...)`, which applies it in greedy and in beam search alike. The model's <unk>
and <pad> are never allowed: their text is dropped when decoding, and what remained would not be a span.

`find_in_context` is how every answer is checked against its context (the `in_context` of an answer, and the
character offsets the server returns): the exact text first, then ignoring case, then allowing any run of
whitespace where the answer has one (tokenizers normalise spaces).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence


class SpanConstraint:
    """Which tokens may come next so that the answer stays a contiguous run of each row's context tokens."""

    def __init__(self, contexts: Sequence[Sequence[int]], eos_id: int, never: Sequence[int] = ()) -> None:
        """
        Args:
            contexts: each row's context token ids (the window's context alone, without the prompt).
            eos_id: the end token, allowed at every step (an empty answer, or the end of a span).
            never: ids never allowed (the model's unknown and padding tokens).
        """
        self.eos_id = int(eos_id)
        self.contexts = [list(ids) for ids in contexts]
        self.banned = set(never)
        self._positions: list[dict[int, list[int]]] = []
        for ids in self.contexts:
            where: dict[int, list[int]] = defaultdict(list)
            for i, token in enumerate(ids):
                if token not in self.banned:
                    where[token].append(i)
            self._positions.append(where)

    def allowed(self, row: int, prefix: Sequence[int]) -> list[int]:
        """The tokens that may follow `prefix` (the answer tokens so far) in `row`."""
        context, where = self.contexts[row], self._positions[row]
        if not prefix:
            return sorted(where) + [self.eos_id]
        if prefix[-1] == self.eos_id:  # finished: anything (the step is padding)
            return [self.eos_id]
        n, prefix = len(prefix), list(prefix)
        following = {context[i + n] for i in where.get(prefix[0], ())
                     if i + n < len(context) and context[i:i + n] == prefix and context[i + n] not in self.banned}
        return sorted(following) + [self.eos_id]

    def for_generate(self, start_tokens: int = 1):
        """A `prefix_allowed_tokens_fn` for `model.generate`: (input index, one sequence's decoder ids so far) ->
        allowed ids, for every beam of that input. The decoder ids begin with `start_tokens` start tokens, which
        are not part of the answer."""
        def allowed(batch_id: int, decoder_ids) -> list[int]:
            return self.allowed(batch_id, decoder_ids[start_tokens:].tolist())
        return allowed


def find_in_context(answer: str, context: str) -> tuple[int, int] | None:
    """Character offsets (start, end) of `answer` in `context`, or None where it is not there (or is empty)."""
    answer = answer.strip()
    if not answer:
        return None
    start = context.find(answer)
    if start >= 0:
        return start, start + len(answer)
    start = context.lower().find(answer.lower())
    if start >= 0 and len(context.lower()) == len(context):  # lower() kept every offset
        return start, start + len(answer)
    pattern = r"\s*".join(re.escape(part) for part in answer.split()) if " " in answer else \
        r"\s*".join(re.escape(ch) for ch in answer)
    match = re.search(pattern, context, flags=re.IGNORECASE)
    return (match.start(), match.end()) if match else None
