"""`t5qa train`: fine-tune a seq2seq model for question answering (also under `accelerate launch -m t5qa train`)."""

from __future__ import annotations

import argparse
from typing import Any

from t5qa.cli.common import add_config_flags, config_overrides
from t5qa.config import TrainConfig
from t5qa.errors import ConfigError


def register(sub: Any) -> None:
    """Add the `train` subcommand."""
    parser = sub.add_parser(
        "train",
        help="fine-tune a model on question-answer data",
        description="Fine-tune any AutoModelForSeq2SeqLM for question answering. Settings come from the defaults, "
                    "then --config FILE (YAML, keys = the flag names with underscores), then the flags. "
                    "Multi-GPU: accelerate launch -m t5qa train ...",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file of settings (a run directory's config.yaml works); flags override it")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")
    parser.add_argument("--merge", action="store_true",
                        help="with --lora-rank: also write OUTPUT/best-merged, a plain model with the adapter "
                             "folded in, which predict and serve load like any other")
    add_config_flags(parser, TrainConfig, group_title="training settings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, and print where the results are."""
    from t5qa.api import train
    from t5qa.config import load_train_config

    cfg = load_train_config(args.config, **config_overrides(args, TrainConfig))
    if args.merge and cfg.lora_rank is None:
        raise ConfigError("--merge needs --lora-rank: without LoRA there is no adapter to merge")
    result = train(cfg, progress=args.progress)
    if not _is_main_process():
        return 0
    if args.merge:
        from t5qa.lora import merge_adapter

        merged = merge_adapter(result.best_dir, result.output_dir / "best-merged",
                               trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        print(f"merged model: {merged}")
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.2f}"
    print(f"trained {result.steps} steps{' (stopped early)' if result.stopped_early else ''}; "
          f"best {cfg.metric_for_best}: {best}")
    for key in ("exact_match", "f1", "loss"):
        if key in result.final_metrics:
            print(f"final validation {key}: {result.final_metrics[key]:.4g}")
    print(f"best model: {result.best_dir}")
    print(f"last model: {result.last_dir}")
    report = result.output_dir / f"report.{cfg.report_format}"
    if report.is_file():
        print(f"report: {report}")
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
