"""`t5qa tune`: hyperparameter search (Optuna) over training runs."""

from __future__ import annotations

import argparse

from t5qa.cli.common import add_config_flags, config_overrides, print_table
from t5qa.config import TrainConfig, TuneConfig

# Set by the search itself: the search directory replaces --output, and the objective is tune's own
# --metric-for-best (the same name and choices as in train). --metric (the scorer) is a training flag.
_EXCLUDED = ("output", "resume", "metric_for_best")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the tune command."""
    p = sub.add_parser(
        "tune",
        help="search hyperparameters (learning rate, batch size, epochs, ...) with Optuna",
        description="Run training trials with sampled hyperparameters and keep the best by validation F1. "
                    "Trials are stored in a database (default OUTPUT/study.db): running the same command again "
                    "continues the study, and several machines can share one study with --storage. The search "
                    "space is the `search:` section of --config; the other keys of that file, and the flags "
                    "below, are the base training config of every trial.",
        # Flags defined both by TrainConfig and by this command: the later definition wins.
        conflict_handler="resolve",
    )
    p.add_argument("--config", help="YAML with the base training config and a `search:` section (the space)")
    p.add_argument("--decoding", action="store_true",
                   help="search decoding settings (beams, length penalty, answer length, no-repeat n-gram size) of "
                        "a trained --model on --validation, without training; the best is written into the model "
                        "directory, where predict and serve use it (--trials defaults to 20)")
    add_config_flags(p, TrainConfig, exclude=_EXCLUDED, group_title="base training config")
    # After TrainConfig's flags, so --output and --metric-for-best are the search's (conflict_handler above).
    add_config_flags(p, TuneConfig, group_title="search")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run or continue the search; print the trials table and where the results are."""
    import logging

    from t5qa.errors import require
    from t5qa.tune import load_search_config, run_search

    # Optuna's per-trial lines follow t5qa's -q/-v like every other log message.
    require("optuna", "tune", "Hyperparameter search").logging.set_verbosity(logging.getLogger().getEffectiveLevel())
    if args.decoding:
        return _run_decoding(args)
    train_flags = {k: v for k, v in config_overrides(args, TrainConfig).items() if k not in _EXCLUDED}
    base, space = load_search_config(args.config, **train_flags)
    search = TuneConfig(**config_overrides(args, TuneConfig))
    result = run_search(base, search, space=space)
    if result.rows:
        header = list(result.rows[0])
        print_table([[_cell(row[k]) for k in header] for row in result.rows], header=header)
    print()
    print(f"{result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed "
          f"(study '{result.study_name}' in {result.storage})")
    if result.best_trial is not None:
        params = ", ".join(f"{k}={_cell(v)}" for k, v in result.best_params.items())
        print(f"best: trial {result.best_trial}, {search.metric_for_best} {result.best_value:.4f} ({params}); "
              f"run {result.best_run_dir}")
        print(f"best config: {result.best_config_path} (train with: t5qa train --config {result.best_config_path})")
    else:
        print("no trial has completed yet; no best configuration")
    print(f"table: {result.table_path}")
    for path in result.plot_paths:
        print(f"plot: {path}")
    return 0


def _run_decoding(args: argparse.Namespace) -> int:
    """`tune --decoding`: search the generation settings of a trained model; print the trials and the gain."""
    from t5qa.config import DataConfig, from_dict
    from t5qa.errors import ConfigError
    from t5qa.tune_decoding import SEARCHED, search_decoding

    if not args.model or not args.validation:
        raise ConfigError("tune --decoding needs --model (a trained model directory) and --validation (labelled "
                          "data to score each setting on)")
    data = from_dict(DataConfig, config_overrides(args, DataConfig), source="flags")
    result = search_decoding(args.model, args.validation, trials=args.trials or 20, data_config=data,
                             max_examples=args.max_eval_examples, metric=args.metric, seed=args.seed or 0)
    header = ["trial", *SEARCHED, "f1", "exact_match", "seconds"]
    print_table([[_cell(row[k]) for k in header] for row in result.trials], header=header)
    print()
    print(result.describe())
    return 0


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
