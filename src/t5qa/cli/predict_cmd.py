"""`t5qa predict` (answer questions with a trained model) and `t5qa export` (CTranslate2 conversion)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t5qa.cli.common import add_data_column_flags, add_config_flags, config_overrides, print_json
from t5qa.config import DataConfig, GenerateConfig, from_dict
from t5qa.api import OUTPUT_FORMATS
from t5qa.errors import ConfigError
from t5qa.export import DEFAULT_CHECK_EXAMPLES
from t5qa.shards import DEFAULT_SHARD_SIZE, processes


def register(sub: argparse._SubParsersAction) -> None:
    """Add the predict and export commands."""
    p = sub.add_parser(
        "predict",
        help="answer questions with a trained model (one question, or a whole data file)",
        description="Answer one question (--context and --question) or every question in a data file "
                    "(--data and --output). Contexts longer than the model's input are answered in overlapping "
                    "windows; the most confident answer wins.",
    )
    p.add_argument("--model", required=True, help="model directory (or a `t5qa export` directory with --backend ct2)")
    p.add_argument("--context", help="the context text, for one question")
    p.add_argument("--question", help="the question, for one question")
    p.add_argument("--data", help="data file of questions (any format `t5qa data` reads)")
    p.add_argument("--output", help="answers file for --data: .jsonl, .csv, .tsv, or .json (id -> answer)")
    p.add_argument("--json", action="store_true", help="print JSON (answer, score, window) instead of text")
    p.add_argument("--backend", choices=("torch", "ct2"), default="torch",
                   help="torch, or ct2 for a model written by `t5qa export --format ct2` (default: torch)")
    p.add_argument("--stride-tokens", "--stride", dest="stride_tokens", type=int, metavar="N",
                   help="overlap in tokens between windows of a long context (default: the model's; with "
                        "--max-source-tokens, a quarter of it, as in training)")
    p.add_argument("--max-source-tokens", type=int, metavar="N",
                   help="input length limit in tokens (default: the model's)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled (.bin) weights you trust")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help=f"questions per shard of --data (default {DEFAULT_SHARD_SIZE}): shards are shared by the "
                        f"processes of `accelerate launch -m t5qa predict`, kept in OUTPUT.shards/ until the output "
                        f"is written, and a crashed run, started again, answers only the shards not done")
    add_config_flags(p, GenerateConfig, group_title="generation")
    add_data_column_flags(p, group_title="data columns (for --data)")
    p.set_defaults(func=run_predict)

    e = sub.add_parser(
        "export",
        help="convert a trained model for fast CPU inference (CTranslate2)",
        description="Convert a model directory to CTranslate2 (`pip install 't5qa[ct2]'`). Answer with it via "
                    "`t5qa predict --backend ct2 --model OUTPUT` or `t5qa serve --backend ct2`.",
    )
    e.add_argument("--model", required=True, help="model directory to convert")
    e.add_argument("--format", choices=("ct2",), default="ct2", help="export format (default: ct2)")
    e.add_argument("--quantization", default="float32",
                   help="float32 (same answers as PyTorch), int8 or int8_float32 (smaller, faster), int16, "
                        "bfloat16 (default: float32)")
    e.add_argument("--output", required=True, help="directory to write")
    e.add_argument("--force", action="store_true", help="replace --output if it exists")
    e.add_argument("--allow-pickle", action="store_true", help="allow pickled (.bin) weights you trust")
    e.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    check = e.add_argument_group("check (the export and the trained model answer the same questions)")
    check.add_argument("--check-data", metavar="FILE",
                       help="questions with answers to check on (default: the run's validation set)")
    check.add_argument("--check-examples", type=int, default=DEFAULT_CHECK_EXAMPLES, metavar="N",
                       help=f"how many of its first questions (default: {DEFAULT_CHECK_EXAMPLES}; 0 skips the check)")
    check.add_argument("--max-f1-drop", type=float, metavar="POINTS",
                       help="fail, writing nothing, when the export's F1 is more than POINTS below the model's")
    add_data_column_flags(e, group_title="data columns (for --check-data; its format is detected)",
                          without=("format",))
    e.set_defaults(func=run_export)


def _check_args(args: argparse.Namespace) -> str:
    """Which mode the flags ask for ("one" or "file"), with every conflict reported at once."""
    problems = []
    one = args.context is not None or args.question is not None
    many = args.data is not None or args.output is not None
    if one and many:
        problems.append("use either --context/--question or --data/--output, not both")
    elif one and (args.context is None or args.question is None):
        problems.append("--context and --question go together; give both")
    elif many and (args.data is None or args.output is None):
        problems.append("--data and --output go together; give both")
    elif not one and not many:
        problems.append("give --context and --question, or --data and --output")
    if args.output is not None and Path(args.output).suffix.lower() not in OUTPUT_FORMATS:
        problems.append(f"--output {args.output}: unknown extension; use one of {', '.join(OUTPUT_FORMATS)}")
    if problems:
        raise ConfigError("; ".join(problems))
    return "one" if one else "file"


def run_predict(args: argparse.Namespace) -> int:
    """Answer one question (printed) or a data file (written to --output)."""
    from t5qa.api import load_predictor, predict_file

    mode = _check_args(args)
    procs = processes()  # one, or those of `accelerate launch`, which share the shards of --data
    flags = config_overrides(args, GenerateConfig)
    generate = from_dict(GenerateConfig, flags, source="flags")
    predictor = load_predictor(args.model, backend=args.backend, generate=generate, allow_pickle=args.allow_pickle,
                               trust_remote_code=args.trust_remote_code, stride_tokens=args.stride_tokens,
                               max_source_tokens=args.max_source_tokens, chosen=tuple(flags),
                               device=procs.device if procs.world > 1 else None)
    if args.backend == "ct2" and getattr(args, "verbose", False):
        from t5qa.export import read_check

        check = read_check(args.model)
        print(f"export check: {check.describe() if check else 'none recorded (exported without a check)'}",
              file=sys.stderr)
    if mode == "one":
        answer = predictor.answer(args.context, args.question)
        if args.json:
            print_json(answer.to_dict())
        else:
            print(answer.text)
        return 0

    data = from_dict(DataConfig, config_overrides(args, DataConfig), source="flags")
    result = predict_file(predictor, args.data, args.output, data_config=data, progress=not args.no_progress,
                          shard_size=args.shard_size, model_identity=args.model)
    if not procs.is_main:
        return 0
    summary = {"output": str(result.output), "questions": result.questions, "seconds": result.seconds,
               "questions_per_second": result.questions_per_second, "windows": result.windows,
               "padding_fraction": result.padding_fraction, "backend": result.backend}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {result.questions} answers to {args.output} ({result.questions_per_second} questions/s, "
              f"{result.windows} model inputs, {100 * result.padding_fraction:.1f}% padding)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Convert the model and print where it went."""
    from t5qa.export import export_ct2

    from t5qa.export import read_check

    columns = {k: v for k, v in config_overrides(args, DataConfig).items() if k != "format"}  # --format: the export's
    data = from_dict(DataConfig, columns, source="flags")
    out = export_ct2(args.model, args.output, quantization=args.quantization, force=args.force,
                     allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                     check_data=args.check_data, check_examples=args.check_examples, max_f1_drop=args.max_f1_drop,
                     data_config=data)
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    print(f"wrote {out} (CTranslate2, {args.quantization}, {size_mb:.1f} MB); answer with: "
          f"t5qa predict --backend ct2 --model {out} ...")
    check = read_check(out)
    if check is not None:
        print(f"checked: {check.describe()}")
    return 0
