"""`t5qa demo`: the whole job on the bundled sample data in a few minutes on a CPU.

Split the sample data by context, fine-tune, evaluate on the held-out test contexts, write the run report, and
answer one question with the same `Predictor` users call. English (`lang="en"`): t5-small when the Hugging Face
Hub is reachable, otherwise a tiny model trained from scratch with a tokenizer learned from the sample data.
Chinese (`lang="zh"`, the tutorial's own question 异常检测的示例是什么？): mt5-small when the Hub is reachable,
otherwise a ByT5-shaped model over bytes trained from scratch; scored with the CMRC 2018 metric.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from t5qa.api import load_predictor, train
from t5qa.config import DataConfig, GenerateConfig, load_train_config
from t5qa.data import load_dataset, sample_data_path, split_examples, write_jsonl
from t5qa.errors import DataError, ModelError
from t5qa.evaluate import evaluate_model
from t5qa.modeling import init_model, load_model

logger = logging.getLogger(__name__)

DEMO_QUESTION = "What is an example of anomaly detection?"
PRETRAINED = "t5-small"


@dataclass(frozen=True)
class _Language:
    question: str
    pretrained: str
    scratch_preset: str
    scratch_tokenizer: str | None  # None: learn a vocabulary from the training split
    max_source_tokens: int
    max_target_tokens: int


LANGUAGES = {
    "en": _Language(DEMO_QUESTION, PRETRAINED, "tiny", None, 256, 32),
    # Bytes: a Chinese character is 3 of them, so inputs and answers get three times the room.
    "zh": _Language("异常检测的示例是什么？", "google/mt5-small", "byte-mini", "bytes", 512, 64),
}
FROM_SCRATCH_NOTE = ("this model was trained from scratch on the sample questions: it shows the pipeline working "
                     "end to end, not the quality of a pretrained model (run the demo where the Hugging Face Hub "
                     "is reachable to fine-tune {pretrained})")


@dataclass
class DemoResult:
    """What the demo did and found."""

    pretrained: bool
    """True when a pretrained model (t5-small, mt5-small) was fine-tuned; False for the from-scratch model."""
    model_name: str
    """The pretrained model's name, or the from-scratch model's directory."""
    metric: str
    """The scorer of the test metrics (squad, cmrc)."""
    model_dir: Path
    report: Path
    question_split: str
    """The split ("train", "validation" or "test") holding the demo question's context."""
    test_metrics: dict[str, float]
    question: str
    context: str
    answer: str
    reference: str
    seconds: float


def run_demo(output: str | Path, *, lang: str = "en", offline: bool = False, max_steps: int | None = None,
             progress: bool | None = None) -> DemoResult:
    """Train, evaluate and answer on the bundled sample data.

    Args:
        output: the demo directory (data splits, run directory).
        lang: "en" (the data-science set) or "zh" (its Chinese counterpart).
        offline: skip the Hub and train a small model from scratch.
        max_steps: override the number of optimizer steps (for quick checks).
        progress: show progress bars (None: when stderr is a terminal).
    Returns:
        DemoResult with the test EM/F1, the report path and the answer to the language's question.
    Raises:
        DataError: an unknown language.
    """
    started = time.perf_counter()
    output = Path(output)
    language = LANGUAGES.get(lang)
    if language is None:
        raise DataError(f"--lang must be one of {', '.join(LANGUAGES)}, got {lang!r}")
    examples, _ = load_dataset(sample_data_path(lang), DataConfig())
    splits = split_examples(examples, 0.1, 0.15, seed=42)
    data_dir = output / "data"
    for name, part in splits.items():
        write_jsonl(part, data_dir / f"{name}.jsonl")
    logger.info("sample data: %d questions split by context into %d train, %d validation, %d test",
                len(examples), len(splits["train"]), len(splits["validation"]), len(splits["test"]))

    model_name, pretrained = _choose_model(output, data_dir / "train.jsonl", language, offline=offline)
    common = dict(model=model_name, train=str(data_dir / "train.jsonl"),
                  validation=str(data_dir / "validation.jsonl"), output=str(output / "run"), seed=42,
                  max_target_tokens=language.max_target_tokens, log_every_steps=5)
    if pretrained:
        steps = max_steps or 150
        overrides = dict(learning_rate=3e-4, train_batch_size=8, max_source_tokens=384, stride_tokens=96)
    else:
        # A tiny model and a vocabulary learned from 200 questions: many steps at a high learning rate.
        steps = max_steps or 400
        overrides = dict(learning_rate=3e-3, train_batch_size=16, warmup_steps=20,
                         max_source_tokens=language.max_source_tokens,
                         stride_tokens=language.max_source_tokens // 4)
    cfg = load_train_config(None, **common, **overrides, max_steps=steps,
                            eval_every_steps=max(1, steps // 2), keep_checkpoints=1)
    result = train(cfg, progress=progress)

    # A from-scratch model scores 0 on held-out contexts at every evaluation, so "best" is just the first one;
    # the last model is the one that trained longest.
    model_dir = result.best_dir if pretrained else result.last_dir
    predictor = load_predictor(model_dir, generate=GenerateConfig())
    model, tokenizer = predictor.model, predictor.tokenizer
    test = evaluate_model(model, tokenizer, splits["test"], cfg.encode, GenerateConfig(
        max_new_tokens=predictor.max_new_tokens()), batch_size=cfg.generate.batch_size)
    example = next(e for e in examples if e.question == language.question)
    question_split = next(name for name, part in splits.items() if any(e.id == example.id for e in part))
    answer = predictor.answer(example.context, example.question)
    report = result.output_dir / f"report.{cfg.report_format}"
    return DemoResult(pretrained=pretrained, model_name=model_name, metric=test.metric, model_dir=model_dir,
                      report=report, question_split=question_split,
                      test_metrics={k: v for k, v in test.metrics.items() if isinstance(v, (int, float))},
                      question=example.question, context=example.context, answer=answer.text,
                      reference=example.answers[0] if example.answers else "",
                      seconds=time.perf_counter() - started)


def _choose_model(output: Path, train_file: Path, language: _Language, *, offline: bool) -> tuple[str, bool]:
    """The pretrained model when it can be loaded (downloaded or cached); else a small one from scratch."""
    if not offline:
        try:
            load_model(language.pretrained)
            return language.pretrained, True
        except ModelError as exc:
            logger.warning("cannot use %s (%s); training a small model from scratch instead", language.pretrained, exc)
    directory = init_model(language.scratch_preset, language.scratch_tokenizer or str(train_file),
                           output / "scratch-model", vocab_size=2000, seed=0)
    return str(directory), False
