"""`t5qa demo`: train, evaluate, report and answer on the bundled sample data, with no arguments."""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(sub: Any) -> None:
    """Add the `demo` subcommand."""
    parser = sub.add_parser(
        "demo",
        help="the whole pipeline on the bundled sample data in a few minutes",
        description="Fine-tune on the bundled machine-learning QA sample, evaluate on its held-out contexts, "
                    "write the run report and answer a question. Uses t5-small when the Hugging Face Hub is "
                    "reachable, otherwise a small model trained from scratch.",
    )
    parser.add_argument("--output", default="runs/demo", help="demo directory (default: runs/demo)")
    parser.add_argument("--lang", choices=("en", "zh"), default="en",
                        help="en: the data-science sample, t5-small (default); zh: its Chinese counterpart, "
                             "mt5-small, asking 异常检测的示例是什么？ (offline: a ByT5-shaped model from scratch)")
    parser.add_argument("--offline", action="store_true",
                        help="do not try the Hub: train a small model from scratch")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")
    # Quick checks (tests, CI): fewer optimizer steps. Also settable with T5QA_DEMO_MAX_STEPS.
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the scores, the report's path and the answer."""
    from t5qa.demo import FROM_SCRATCH_NOTE, run_demo

    max_steps = args.max_steps or (int(os.environ["T5QA_DEMO_MAX_STEPS"])
                                   if os.environ.get("T5QA_DEMO_MAX_STEPS") else None)
    result = run_demo(args.output, lang=args.lang, offline=args.offline, max_steps=max_steps,
                      progress=args.progress)
    metrics = result.test_metrics
    kind = f"{result.model_name} (pretrained, fine-tuned)" if result.pretrained else "small model trained from scratch"
    print(f"model: {kind} -> {result.model_dir}")
    print(f"held-out test ({result.metric}): exact match {metrics.get('exact_match', 0.0):.1f}, "
          f"F1 {metrics.get('f1', 0.0):.1f} ({int(metrics.get('count', 0))} questions)")
    print(f"report: {result.report}")
    print(f"question: {result.question}")
    print(f"answer: {result.answer!r} (reference: {result.reference!r})")
    if result.question_split == "train":
        print("this question's context is in the training split, so the answer shows what the model learned "
              "from it, not how it handles unseen text (that is the held-out score above)")
    if not result.pretrained:
        pretrained = "mt5-small" if args.lang == "zh" else "t5-small"
        print(f"note: {FROM_SCRATCH_NOTE.format(pretrained=pretrained)}")
    print(f"demo took {result.seconds:.0f} s")
    return 0
