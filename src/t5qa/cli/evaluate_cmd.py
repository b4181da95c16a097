"""`t5qa evaluate`: score a model (or a predictions file) on a labelled data file."""

from __future__ import annotations

import argparse
from typing import Any

from t5qa.cli.common import add_data_column_flags, add_config_flags, config_overrides, print_json, print_table
from t5qa.config import DataConfig, GenerateConfig, from_dict
from t5qa.errors import ConfigError
from t5qa.metrics import SCORERS
from t5qa.shards import DEFAULT_SHARD_SIZE, shards_dir


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluate command."""
    p = sub.add_parser(
        "evaluate",
        help="exact match, F1, loss and token accuracy of a model on a data file (or score a predictions file)",
        description="With --model: generate answers and compute loss, token accuracy, exact match and F1. "
                    "With --predictions: score answers written elsewhere (JSON lines with id + "
                    "prediction/answer, or a JSON object id -> answer). EM/F1 equal the official scorer named "
                    "by --metric; every question in --data is scored, duplicates included.",
    )
    p.add_argument("--data", required=True, help="labelled data file (any format `t5qa data` reads)")
    p.add_argument("--model", help="model directory to evaluate")
    p.add_argument("--predictions", help="predictions file to score instead of a model")
    p.add_argument("--output", help="write per-example predictions and scores here (JSON lines)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--max-examples", type=int, metavar="N", help="evaluate only the first N examples")
    p.add_argument("--metric", choices=SCORERS,
                   help="official scorer: squad (SQuAD v1.1), squad_v2 (SQuAD v2.0), cmrc (CMRC 2018 / DRCD); "
                        "default: cmrc when most contexts are Chinese, squad_v2 when some question has no "
                        "answer, squad otherwise")
    p.add_argument("--no-answer-probs", metavar="FILE",
                   help="squad_v2: JSON object id -> probability of no answer (the v2.0 script's --na-prob-file); "
                        "adds the best thresholds")
    p.add_argument("--no-answer-threshold", type=float, default=1.0, metavar="P",
                   help="squad_v2: a prediction whose no-answer probability exceeds P counts as no answer "
                        "(default: 1.0, as the v2.0 script)")
    p.add_argument("--calibrate-no-answer", action="store_true",
                   help="with --model, on data with unanswerable questions: choose the no-answer threshold that "
                        "maximises F1 on --data (use validation data, not the test set), report F1 before and "
                        "after, and save it with the model for predict, evaluate and serve")
    p.add_argument("--stride-tokens", "--stride", dest="stride_tokens", type=int, metavar="N",
                   help="overlap in tokens between windows of a long context (default: the model's; with "
                        "--max-source-tokens, a quarter of it, as in training)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled (.bin) weights you trust")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help=f"with --model and --output: questions per shard (default {DEFAULT_SHARD_SIZE}), kept in "
                        f"OUTPUT.shards/ until the scores are written; the processes of `accelerate launch -m "
                        f"t5qa evaluate` share them, and a crashed run, started again, answers only the shards "
                        f"not done")
    add_config_flags(p, GenerateConfig, group_title="generation (with --model)")
    add_data_column_flags(p, group_title="data columns")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the metrics, optionally write the per-example rows."""
    from t5qa.api import evaluate, score_predictions
    from t5qa.evaluate import write_predictions

    if (args.model is None) == (args.predictions is None):
        raise ConfigError("give exactly one of --model (evaluate a model) or --predictions (score a file)")
    if args.no_answer_probs is not None and args.predictions is None:
        raise ConfigError("--no-answer-probs goes with --predictions and the squad_v2 metric")
    if args.calibrate_no_answer and args.model is None:
        raise ConfigError("--calibrate-no-answer goes with --model: it measures the model's answers")
    data = from_dict(DataConfig, config_overrides(args, DataConfig), source="flags")
    if args.predictions is not None:
        result = score_predictions(args.predictions, args.data, data_config=data, metric=args.metric,
                                   no_answer_probs=args.no_answer_probs,
                                   no_answer_threshold=args.no_answer_threshold, max_examples=args.max_examples)
    else:
        flags = config_overrides(args, GenerateConfig)
        generate = from_dict(GenerateConfig, flags, source="flags")
        result = evaluate(args.model, args.data, data_config=data, generate=generate, metric=args.metric,
                          stride_tokens=args.stride_tokens, max_examples=args.max_examples,
                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                          calibrate_no_answer=args.calibrate_no_answer, chosen=tuple(flags),
                          shards=shards_dir(args.output) if args.output else None, shard_size=args.shard_size)
        if result is None:  # another process of `accelerate launch`: the main one reports
            return 0
    analysis = write_predictions(result, args.output) if args.output else None
    _print_metrics({"metric": result.metric, **result.metrics}, as_json=args.json)
    if result.no_answer is not None and not args.json:
        print(f"{result.no_answer.describe()}; saved with the model in {args.model}")
    if analysis is not None and not args.json:
        print(f"per-example predictions: {args.output}")
        print(f"error analysis (EM/F1 by context length, answer length, question word, ...): {analysis}")
    return 0


def _print_metrics(metrics: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print_json(metrics)
        return
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float):
            shown = f"{value:.4f}" if key in ("loss", "token_accuracy") else f"{value:.2f}"
        else:
            shown = str(value)
        rows.append((key, shown))
    print_table(rows, header=("metric", "value"))
