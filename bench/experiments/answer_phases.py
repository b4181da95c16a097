"""Where `t5qa predict`'s time goes with the torch backend: wall seconds of the encoder, the lean loop's decoder
steps, the output layer, and everything outside the model (tokenising, windows, batching, decoding text), timed
with module hooks over one `answer_many` call (no profiler, so nothing is slowed but by a clock read per call).

The first --questions TyDi QA dev questions, greedy, exactly 16 new tokens each, sources cut at 384 tokens (the
setting of bench_predict.py), at each --batch-size. Prints one row per batch size, with the FLOP rate each phase
reaches (bench/flops.py's count of its products over real tokens; padding earns nothing).

    .venv/bin/python bench/experiments/answer_phases.py --model-dir DIR [--questions 440] [--batch-size 32 64]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

args = common.answering_experiment_args(
    __doc__, **{"--batch-size": {"type": int, "nargs": "+", "default": [32], "help": "answering batch sizes"}})

from t5qa.config import GenerateConfig  # noqa: E402
from t5qa.fastpath import decoding  # noqa: E402
from t5qa.predict import Predictor  # noqa: E402

pairs = [(r.context, r.question) for r in common.read_squad(common.DEV_FILE)[:args.questions]]


class Phase:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0

    def before(self, *_: object) -> None:
        self._start = time.perf_counter()

    def after(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


print("| batch | q/s | total s | encoder s | decode loop s (of it: output layer s) | outside the model s | "
      "source tokens real / padded |")
print("|---|---|---|---|---|---|---|")
for size in args.batch_size:
    predictor = Predictor.from_pretrained(args.model_dir, max_source_tokens=common.MAX_SOURCE_TOKENS,
                                          generate=GenerateConfig(min_new_tokens=common.NEW_TOKENS,
                                                                  max_new_tokens=common.NEW_TOKENS,
                                                                  batch_size=size))
    predictor.answer_many(pairs[:4])  # warm-up and the proofs
    model = predictor.model
    encoder, head, loop = Phase(), Phase(), Phase()
    model.get_encoder().register_forward_pre_hook(encoder.before)
    model.get_encoder().register_forward_hook(encoder.after)
    model.lm_head.register_forward_pre_hook(head.before)
    model.lm_head.register_forward_hook(head.after)
    original = decoding.LeanGreedy.decode

    def timed(self, *a, **k):  # type: ignore[no-untyped-def]
        loop.before()
        try:
            return original(self, *a, **k)
        finally:
            loop.after()

    decoding.LeanGreedy.decode = timed
    real0, padded0 = predictor.stats.real_tokens, predictor.stats.padded_tokens
    started = time.perf_counter()
    predictor.answer_many(pairs)
    total = time.perf_counter() - started
    decoding.LeanGreedy.decode = original
    decoder = loop.seconds - encoder.seconds
    print(f"| {size} | {len(pairs) / total:.2f} | {total:.1f} | {encoder.seconds:.1f} | {decoder:.1f} "
          f"({head.seconds:.1f}) | {total - loop.seconds:.1f} | {predictor.stats.real_tokens - real0} / "
          f"{predictor.stats.padded_tokens - padded0} |")
    print(f"fast paths: {predictor._runner.fast.summary()['used']}", file=sys.stderr)
