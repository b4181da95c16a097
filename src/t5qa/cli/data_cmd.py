"""`t5qa data inspect|prepare`: look at a dataset before training, and write clean grouped splits."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from t5qa.cli.common import add_config_flags, config_overrides, print_json, print_table
from t5qa.config import DataConfig, EncodeConfig, from_dict
from t5qa.data import CleaningReport

_SPLIT_FLAGS = ("val_fraction", "test_fraction", "split_seed")
_ENCODE_EXCLUDE = ("stride_tokens", "group_by_length")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data inspect` and `data prepare`."""
    data = sub.add_parser("data", help="inspect a QA dataset, or clean and split it into train/validation/test",
                          description="Inspect or prepare question-answer data (SQuAD v1/v2 JSON, flat JSON, "
                                      "JSON lines, CSV, TSV, Parquet, datasets save_to_disk folders, PubMedQA).")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    inspect = actions.add_parser("inspect", help="counts, cleaning report and token statistics of a dataset",
                                 description="Load a dataset, report what cleaning would do and, with --model, "
                                             "token statistics and recommendations. Writes nothing.")
    _add_common(inspect, exclude=_SPLIT_FLAGS)
    inspect.set_defaults(func=run_inspect)

    prepare = actions.add_parser("prepare", help="clean and split a dataset into JSONL files with a report",
                                 description="Clean a dataset and split it by context (no context in two splits) "
                                             "into OUTPUT/train.jsonl, validation.jsonl, test.jsonl and "
                                             "report.json.")
    _add_common(prepare, exclude=())
    prepare.add_argument("--output", required=True, help="directory for the split files and report.json")
    prepare.set_defaults(func=run_prepare)


def _add_common(parser: argparse.ArgumentParser, exclude: tuple[str, ...]) -> None:
    parser.add_argument("path", metavar="PATH",
                        help="data file, `datasets` save_to_disk folder, or Hugging Face Hub dataset name")
    add_config_flags(parser, DataConfig, exclude=exclude, group_title="data")
    group = parser.add_argument_group("token statistics (with --model)")
    group.add_argument("--model", default=None,
                       help="tokenizer (or model) directory or Hub name for token statistics")
    add_config_flags(group, EncodeConfig, exclude=_ENCODE_EXCLUDE)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def _configs(args: argparse.Namespace) -> tuple[DataConfig, EncodeConfig]:
    data = from_dict(DataConfig, config_overrides(args, DataConfig), source="flags")
    values = {k: v for k, v in config_overrides(args, EncodeConfig).items() if k not in _ENCODE_EXCLUDE}
    # The window overlap is left to its default, which follows --max-source-tokens.
    encode = from_dict(EncodeConfig, values, source="flags")
    return data, encode


def run_inspect(args: argparse.Namespace) -> int:
    """Print counts, the cleaning report and token statistics."""
    from t5qa.api import inspect_data

    data, encode = _configs(args)
    result = inspect_data(args.path, data, encode, model=args.model)
    if args.json:
        print_json(result.to_dict())
        return 0
    _print_summary(result)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """Clean, split by context, and write the JSONL splits and report.json."""
    from t5qa.api import prepare_data

    data, encode = _configs(args)
    result, report = prepare_data(args.path, args.output, data, encode, model=args.model)
    if args.json:
        print_json(report)
        return 0
    _print_summary(result)
    print()
    print_table([[name, info["questions"], info["contexts"], info["unanswerable"], info["path"]]
                 for name, info in report["splits"].items()],
                header=["split", "questions", "contexts", "unanswerable", "file"])
    print(f"report: {Path(args.output) / 'report.json'}")
    return 0


def _print_summary(result: Any) -> None:
    loaded, kept = result.loaded, result.kept
    print(f"{result.source}: {result.format}, {loaded['questions']} questions "
          f"({loaded['unanswerable']} unanswerable) on {loaded['contexts']} contexts, "
          f"read in {result.load_seconds:.2f}s")
    print(f"after cleaning: {kept['questions']} questions ({kept['unanswerable']} unanswerable) "
          f"on {kept['contexts']} contexts")
    report: CleaningReport = result.cleaning
    rows = []
    for action, bucket in (("dropped", report.dropped), ("flagged", report.flagged),
                           ("normalised", report.normalised)):
        for reason, count in sorted(bucket.items()):
            rows.append([action, reason, count, (report.examples.get(reason) or [""])[0]])
    if rows:
        print()
        print_table(rows, header=["cleaning", "reason", "examples", "e.g."])
    stats = result.stats
    if stats is None:
        print("\n(pass --model TOKENIZER for token lengths, truncation losses and the unknown-token rate)")
        return
    print()
    src, tgt = stats.source_tokens, stats.target_tokens
    print_table([
        ["source (prompt)", src.get("p50"), src.get("p90"), src.get("p99"), src.get("max"),
         f"{stats.sources_over_limit} over {stats.max_source_tokens}"],
        ["target (answers)", tgt.get("p50"), tgt.get("p90"), tgt.get("p99"), tgt.get("max"),
         f"{stats.targets_over_limit} over {stats.max_target_tokens}"],
    ], header=[f"tokens ({result.model})", "p50", "p90", "p99", "max", "over the limit"])
    print(f"answers past the {stats.max_source_tokens}-token input limit: {stats.answers_lost_to_truncation} "
          f"of {stats.answers_checked}; characters mapped to {stats.unk_token}: {100 * stats.unk_rate:.2f}%")
    for line in stats.recommendations:
        print(f"- {line}")
