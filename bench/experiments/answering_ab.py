"""The fast paths for answering (fastpath/answering.py) on and off, against batched `model.generate`, in one
process.

The first --questions TyDi QA dev questions, greedy, exactly 16 new tokens each, sources cut at 384 tokens (the
setting of bench_predict.py). Four variants alternate round by round, so load from other jobs hits each:
generate-16 (model.generate on batches of 16 in file order), t5qa with --no-fast-answering, t5qa's fast paths
around `generate` without the lean decoding loop (fastpath/decoding.py), and t5qa's default.
Prints questions/s per round and how many answers equal generate-16's.

    .venv/bin/python bench/experiments/answering_ab.py --model-dir DIR [--questions 96] [--rounds 3]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

args = common.answering_experiment_args(__doc__)
import torch  # noqa: E402

from t5qa.config import GenerateConfig  # noqa: E402
from t5qa.predict import Predictor  # noqa: E402

pairs = [(r.context, r.question) for r in common.read_squad(common.DEV_FILE)[:args.questions]]
predictors = {
    name: Predictor.from_pretrained(args.model_dir, max_source_tokens=common.MAX_SOURCE_TOKENS, generate=GenerateConfig(
        min_new_tokens=common.NEW_TOKENS, max_new_tokens=common.NEW_TOKENS, fast_answering=fast))
    for name, fast in (("t5qa --no-fast-answering", False), ("t5qa, generate", True), ("t5qa", True))}
predictors["t5qa, generate"]._runner.fast.lean = None  # the fast paths around generate, without the lean loop
tokenizer, model = predictors["t5qa"].tokenizer, predictors["t5qa"].model


def generate_16() -> list[str]:
    texts = []
    for i in range(0, len(pairs), 16):
        sources = [common.PROMPT.format(question=q.lstrip(), context=c.lstrip()) for c, q in pairs[i:i + 16]]
        inputs = tokenizer(sources, max_length=common.MAX_SOURCE_TOKENS, truncation=True, padding=True,
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=common.NEW_TOKENS, min_new_tokens=common.NEW_TOKENS,
                                 num_beams=1, do_sample=False)
        texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    return texts


runs = {"generate-16": generate_16, **{name: (lambda p=p: [a.text for a in p.answer_many(pairs)])
                                      for name, p in predictors.items()}}
for predictor in predictors.values():
    predictor.answer_many(pairs[:4])  # warm-up (and the linear path's proof)
rates: dict[str, list[float]] = {name: [] for name in runs}
answers: dict[str, list[str]] = {}
for _ in range(args.rounds):
    for name, run in runs.items():
        started = time.perf_counter()
        answers[name] = run()
        rates[name].append(len(pairs) / (time.perf_counter() - started))
print(f"{len(pairs)} questions, {args.rounds} rounds; fast paths used: {predictors['t5qa']._runner.fast.summary()}")
base = sum(rates["generate-16"]) / args.rounds
for name, values in rates.items():
    mean = sum(values) / len(values)
    same = sum(a == b for a, b in zip(answers[name], answers["generate-16"]))
    print(f"| {name} | {mean:.2f} | {mean / base:.2f}x | {', '.join(f'{v:.2f}' for v in values)} | "
          f"{same}/{len(pairs)} |")
