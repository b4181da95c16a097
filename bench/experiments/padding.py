"""How much of a training epoch's work is padding, by batching strategy (no model is run; takes seconds).

For TyDi QA GoldP English with the t5-small tokenizer, batch 8, source <= 384 and target <= 30 tokens: the
share of real tokens among padded source and target tokens, and of real work among padded work, with work
per token weighted as in t5-small (an encoder token ~19M multiply-adds, a decoder token ~35M: its six layers
with cross-attention, plus the 32k-word output layer).

    .venv/bin/python bench/experiments/padding.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

ENCODER_MACS, DECODER_MACS = 19.0, 35.4  # millions per token, t5-small


def main() -> None:
    missing = common.shared_data_missing()
    if missing:
        print(f"skipped: {missing}")
        return
    from transformers import AutoTokenizer

    from t5qa.encode import LengthGroupedSampler

    tokenizer = AutoTokenizer.from_pretrained(str(common.TOKENIZER_DIR))
    rows = common.read_squad(common.TRAIN_FILE)
    sources = [min(common.MAX_SOURCE_TOKENS, len(x)) for x in tokenizer([common.prompt(r) for r in rows]).input_ids]
    # tokenizer(...) appends </s>, as t5qa's labels do
    targets = [min(common.MAX_TARGET_TOKENS, len(x)) for x in tokenizer([r.answer for r in rows]).input_ids]
    batch = common.BATCH_SIZE

    def report(name: str, order: list[int]) -> None:
        chunks = [order[k:k + batch] for k in range(0, len(order), batch)]
        real_src = sum(sources[i] for c in chunks for i in c)
        real_tgt = sum(targets[i] for c in chunks for i in c)
        pad_src = sum(len(c) * max(sources[i] for i in c) for c in chunks)
        pad_tgt = sum(len(c) * max(targets[i] for i in c) for c in chunks)
        real = ENCODER_MACS * real_src + DECODER_MACS * real_tgt
        padded = ENCODER_MACS * pad_src + DECODER_MACS * pad_tgt
        print(f"| {name} | {100 * real_src / pad_src:.1f}% | {100 * real_tgt / pad_tgt:.1f}% | "
              f"{100 * real / padded:.1f}% |")

    print(f"{len(rows)} examples; mean real tokens: source {sum(sources) / len(sources):.0f}, "
          f"target {sum(targets) / len(targets):.1f}")
    print("| batching | real / padded source tokens | real / padded target tokens | real / padded work |")
    print("|---|---|---|---|")
    shuffled = list(range(len(rows)))
    random.Random(0).shuffle(shuffled)
    report("random (no grouping)", shuffled)
    for group_batches in (50, 100):
        report(f"by source length, groups of {group_batches} batches (Trainer's group_by_length: 50)",
               list(LengthGroupedSampler(sources, batch, seed=0, group_batches=group_batches)))
    for group_batches in (50, 100, 200):
        report(f"by source and target length, groups of {group_batches} batches"
               + (" (t5qa's default)" if group_batches == 100 else ""),
               list(LengthGroupedSampler(sources, batch, seed=0, group_batches=group_batches,
                                         target_lengths=targets)))


if __name__ == "__main__":
    main()
