"""The lean greedy decoding loop (fastpath/decoding.py) against t5qa's other fast paths around `generate`, in one
process, where answers end at different lengths: grounded answers (spans of the context end where the context
does), up to --max-new-tokens. Both answer the first --questions TyDi QA dev questions, alternating round by
round; prints questions/s per round, whether the answers are the same, and how often finished rows left a batch.

    .venv/bin/python bench/experiments/lean_decoding_ab.py --model-dir DIR [--questions 96] [--rounds 2]
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

args = common.answering_experiment_args(
    __doc__, **{"--max-new-tokens": {"type": int, "nargs": "+", "default": [16, 32], "help": "answer length limits"}})

from t5qa.config import GenerateConfig  # noqa: E402
from t5qa.predict import Predictor  # noqa: E402

pairs = [(r.context, r.question) for r in common.read_squad(common.DEV_FILE)[:args.questions]]
print("| max new tokens | generate (fast paths) q/s | lean loop q/s | lean / generate | same answers | "
      "mean answer words | rows-left-batch events |")
print("|---|---|---|---|---|---|---|")
for limit in args.max_new_tokens:
    predictors = {name: Predictor.from_pretrained(args.model_dir, max_source_tokens=common.MAX_SOURCE_TOKENS,
                                                  generate=GenerateConfig(max_new_tokens=limit, grounded=True))
                  for name in ("generate", "lean")}
    predictors["generate"]._runner.fast.lean = None  # the other fast paths stay on
    for predictor in predictors.values():
        predictor.answer_many(pairs[:4])  # warm-up and the proofs
    rates: dict[str, list[float]] = {name: [] for name in predictors}
    texts: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            texts[name] = [a.text for a in predictor.answer_many(pairs)]
            rates[name].append(len(pairs) / (time.perf_counter() - started))
    mean = {name: statistics.mean(values) for name, values in rates.items()}
    words = statistics.mean(len(t.split()) for t in texts["lean"])
    same = sum(a == b for a, b in zip(texts["lean"], texts["generate"]))
    print(f"| {limit} | {mean['generate']:.2f} ({', '.join(f'{v:.2f}' for v in rates['generate'])}) | "
          f"{mean['lean']:.2f} ({', '.join(f'{v:.2f}' for v in rates['lean'])}) | "
          f"{mean['lean'] / mean['generate']:.2f}x | {same}/{len(pairs)} | {words:.1f} | "
          f"{predictors['lean']._runner.fast.lean.loop.compactions} |")
