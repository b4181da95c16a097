"""`t5qa init-model`: a randomly initialised model to train from scratch."""

from __future__ import annotations

import argparse

from t5qa.cli.common import add_data_column_flags, config_overrides
from t5qa.config import DataConfig, from_dict
from t5qa.modeling import PRESETS, count_parameters, init_model, load_model


def register(sub: argparse._SubParsersAction) -> None:
    """Add the init-model command."""
    p = sub.add_parser(
        "init-model",
        help="create a randomly initialised model (preset or config) with a tokenizer, to train from scratch",
        description="Create a randomly initialised seq2seq model and save it with its tokenizer. "
                    f"Presets: {', '.join(PRESETS)}.",
    )
    p.add_argument("--config", required=True, help=f"preset ({', '.join(PRESETS)}) or a directory with config.json")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer directory; a data file to train a SentencePiece tokenizer on (every character "
                        "covered, byte fallback for the rest: no <unk> in Chinese); or 'bytes' for ByT5's byte "
                        "tokenizer")
    p.add_argument("--output", required=True, help="directory to write the model to")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size when training a tokenizer")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation")
    add_data_column_flags(p, group_title="data columns (when --tokenizer is a data file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Create and save the model; print where and how big."""
    data = from_dict(DataConfig, config_overrides(args, DataConfig), source="flags")
    out = init_model(args.config, args.tokenizer, args.output, vocab_size=args.vocab_size, seed=args.seed,
                     data_config=data)
    model, tokenizer = load_model(str(out))
    print(f"wrote {out}: {args.config}, {count_parameters(model) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}")
    return 0
