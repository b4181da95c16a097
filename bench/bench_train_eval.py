"""A training run with evaluation from generated answers: t5qa against Seq2SeqTrainer with predict_with_generate.

    .venv/bin/python bench/bench_train_eval.py [--steps 40] [--evals 2] [--questions 96] [--rounds 1]
        [--output bench/TRAIN_EVAL_RESULTS.md]

Each tool trains --steps optimizer steps (batch 8, on the fixed 320-example subset that bench_train.py uses) and
evaluates --evals times, evenly spaced, the last at the last step, on the first --questions TyDi QA dev
questions: loss, and answers generated greedily with exactly 16 new tokens (the prediction setting of
bench_predict.py), scored against the references.
  trainer   Seq2SeqTrainer with bench_train.py's best flags (dynamic padding, length-grouped batches),
            predict_with_generate=True, eval_strategy="steps", evaluation batch 16 (as generate-16), an
            exact-match compute_metrics; sources truncated to 384 tokens.
  t5qa      t5qa.train.fit with eval_every_steps, its defaults otherwise (answers from its Predictor: length-sorted
            batches of 64 where the lean loop answers, long contexts in windows, its fast paths).
Timing: wall clock from the end of the first optimizer step to the end of the last evaluation, split into the
seconds inside evaluations (a wrapper around each tool's evaluation call) and the rest (training). Model loading
and tokenising the training set fall before the first step. Each tool runs in a process of its own; with
--rounds above 1 they alternate.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

IMPLS = ("trainer", "t5qa")
EXAMPLES = 320


class Clock:
    """The end of the first optimizer step and the seconds spent inside evaluations after it."""

    def __init__(self) -> None:
        self.first_step_end: float | None = None
        self.last_eval_end = 0.0
        self.eval_seconds = 0.0
        self.evals = 0
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()

    def timed(self, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.last_eval_end = time.perf_counter()
                self.eval_seconds += self.last_eval_end - started
                self.evals += 1
        return wrapper


def _dev_subset(work: Path, questions: int) -> Path:
    """The first `questions` dev questions as SQuAD JSON (what both tools evaluate on)."""
    ids = {r.id for r in common.read_squad(common.DEV_FILE)[:questions]}
    return common.write_squad_subset(common.DEV_FILE, ids, work / "dev-subset.json")


PUNCTUATION = set(string.punctuation)


def _normalise(text: str) -> str:
    # SQuAD's normalisation (lower case, no punctuation or articles, single spaces), for the Trainer's metric
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def run_trainer(model_dir: str, steps: int, evals: int, questions: int, clock: Clock) -> dict[str, Any]:
    import datasets
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments, TrainerCallback)

    import bench_train

    bench_train.EXAMPLES = EXAMPLES
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.generation_config.max_new_tokens = common.NEW_TOKENS
    model.generation_config.min_new_tokens = common.NEW_TOKENS
    sources, targets = bench_train._sources_targets()
    dev = common.read_squad(common.DEV_FILE)[:questions]

    def preprocess(batch: dict) -> dict:
        inputs = tokenizer(batch["source"], max_length=common.MAX_SOURCE_TOKENS, truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["target"], max_length=common.MAX_TARGET_TOKENS,
                                     truncation=True)["input_ids"]
        return inputs

    def dataset(src: list[str], tgt: list[str]) -> Any:
        raw = datasets.Dataset.from_dict({"source": src, "target": tgt})
        return raw.map(preprocess, batched=True, remove_columns=raw.column_names)

    train, validation = dataset(sources, targets), dataset([common.prompt(r) for r in dev], [r.answer for r in dev])

    def compute_metrics(prediction: Any) -> dict[str, float]:
        ids = prediction.predictions
        ids = ids.clip(min=0) if hasattr(ids, "clip") else ids
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return {"exact_match": 100.0 * sum(_normalise(t) == _normalise(r.answer) for t, r in zip(texts, dev)) / len(dev)}

    args = Seq2SeqTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="t5qa-bench-trainer-"), per_device_train_batch_size=common.BATCH_SIZE,
        per_device_eval_batch_size=16, learning_rate=common.LEARNING_RATE, max_steps=steps,
        train_sampling_strategy="group_by_length", report_to="none", save_strategy="no", eval_strategy="steps",
        eval_steps=steps // evals, predict_with_generate=True, disable_tqdm=True, seed=42)

    class Steps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step()

    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
                             processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[Steps()])
    trainer.evaluate = clock.timed(trainer.evaluate)  # type: ignore[method-assign]
    trainer.train()
    return {"eval_batch_size": 16, "model_inputs_per_evaluation": len(dev)}


def run_t5qa(model_dir: str, steps: int, evals: int, questions: int, clock: Clock, work: Path) -> dict[str, Any]:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import bench_train
    from t5qa import train as t5qa_train
    from t5qa.config import EncodeConfig, GenerateConfig, TrainConfig

    bench_train.EXAMPLES = EXAMPLES
    cfg = TrainConfig(
        model=model_dir, train=bench_train._train_file(work), validation=str(_dev_subset(work, questions)),
        output=str(work / "t5qa-run"),
        encode=EncodeConfig(max_source_tokens=common.MAX_SOURCE_TOKENS, max_target_tokens=common.MAX_TARGET_TOKENS),
        generate=GenerateConfig(min_new_tokens=common.NEW_TOKENS, max_new_tokens=common.NEW_TOKENS),
        train_batch_size=common.BATCH_SIZE, learning_rate=common.LEARNING_RATE, max_steps=steps,
        eval_every_steps=steps // evals, save_every_steps=steps + 1)
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: clock.step())
    t5qa_train._evaluate_and_track = clock.timed(t5qa_train._evaluate_and_track)
    refused: list[str] = []  # the answering fast paths' one-line refusals, if any

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            refused.append(record.getMessage())

    logging.getLogger("t5qa.fastpath.answering").addHandler(Refusals(logging.WARNING))
    t5qa_train.fit(cfg, progress=False)
    return {"eval_batch_size": cfg.generate.batch_size or "the backend's own (64 where the lean loop answers)",
            "answering_fast_paths_refused": refused}


def worker(args: argparse.Namespace) -> None:
    common.set_threads()
    logging.basicConfig(level=logging.WARNING)
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="t5qa-bench-train-eval-") as tmp:
        if args.impl == "trainer":
            extra = run_trainer(args.model_dir, args.steps, args.evals, args.questions, clock)
        else:
            extra = run_t5qa(args.model_dir, args.steps, args.evals, args.questions, clock, Path(tmp))
    if clock.first_step_end is None or clock.evals != args.evals:
        raise SystemExit(f"{args.impl}: {clock.steps} steps and {clock.evals} evaluations ran; expected "
                         f"{args.steps} and {args.evals}")
    total = clock.last_eval_end - clock.first_step_end
    common.write_result(args.out, {"name": args.impl, "steps": clock.steps, "evaluations": clock.evals,
                                   "seconds": total, "eval_seconds": clock.eval_seconds,
                                   "train_seconds": total - clock.eval_seconds, "peak_rss_mb": common.peak_rss_mb(),
                                   **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, help="run one tool in this process (what the driver calls)")
    parser.add_argument("--model-dir", help="a saved t5-small (bench/make_model.py); made in a temporary one if absent")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--evals", type=int, default=2)
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", help="result JSON path (with --impl)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "TRAIN_EVAL_RESULTS.md"))
    args = parser.parse_args()
    if args.steps % args.evals:
        parser.error("--steps must be a multiple of --evals")
    missing = common.shared_data_missing()
    if missing:
        print(f"skipped: {missing}")
        return
    if args.impl:
        worker(args)
        return
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="t5qa-bench-train-eval-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            subprocess.run([sys.executable, str(here / "make_model.py"), "--output", model_dir,
                            "--out", str(Path(tmp) / "make.json")], check=True)
        results: dict[str, list[dict]] = {name: [] for name in IMPLS}
        for round_ in range(args.rounds):
            for name in IMPLS:
                out = Path(tmp) / f"{name}-{round_}.json"
                subprocess.run([sys.executable, __file__, "--impl", name, "--model-dir", model_dir, "--steps",
                                str(args.steps), "--evals", str(args.evals), "--questions", str(args.questions),
                                "--out", str(out)], check=True)
                results[name].append(json.loads(out.read_text(encoding="utf-8")))
                print(name, {k: results[name][-1][k] for k in ("seconds", "train_seconds", "eval_seconds")})
    write_report(args, results)


def write_report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    def total(name: str, key: str) -> float:
        return sum(r[key] for r in results[name])

    command = (f"python bench/bench_train_eval.py --steps {args.steps} --evals {args.evals} "
               f"--questions {args.questions} --rounds {args.rounds}")
    lines = [
        "# A training run with evaluation: t5qa against Seq2SeqTrainer with predict_with_generate", "",
        f"`{command}` ({time.strftime('%Y-%m-%d')}, {common.cpu_name()}, {common.THREADS} threads). "
        f"Each trains {args.steps} steps of batch {common.BATCH_SIZE} on bench_train.py's {EXAMPLES}-example "
        f"subset and evaluates {args.evals} times on the first {args.questions} TyDi QA dev questions (loss, and "
        f"greedy answers of exactly {common.NEW_TOKENS} new tokens); seconds from the end of the first step to "
        "the end of the last evaluation, summed over the rounds. The Trainer evaluates in batches of 16 in "
        "file order; t5qa in its own length-sorted batches (64 where the lean loop answers), with long contexts "
        "in windows.", "",
        "| tool | total s | training s | evaluation s | evaluation questions/s | t5qa faster by (total / evaluation) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in IMPLS:
        evaluated = args.questions * args.evals * len(results[name])
        lines.append(
            f"| {name} | {total(name, 'seconds'):.1f} | {total(name, 'train_seconds'):.1f} | "
            f"{total(name, 'eval_seconds'):.1f} | {evaluated / total(name, 'eval_seconds'):.2f} | "
            f"{total(name, 'seconds') / total('t5qa', 'seconds'):.2f}x / "
            f"{total(name, 'eval_seconds') / total('t5qa', 'eval_seconds'):.2f}x | "
            f"{max(r['peak_rss_mb'] for r in results[name]):,.0f} |")
    refused = sorted({line for r in results["t5qa"] for line in r.get("answering_fast_paths_refused", [])})
    lines += ["", "t5qa's evaluations answered with every fast path for answering (the lean decoding loop included)"
              if not refused else "t5qa's answering fast paths refused: " + "; ".join(refused),
              "", "t5qa's evaluation seconds include saving `best/` when the score improved (the Trainer here "
              "saves nothing)."]
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
