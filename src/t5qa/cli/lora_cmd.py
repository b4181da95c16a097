"""`t5qa lora merge`: fold a trained LoRA adapter into its base model."""

from __future__ import annotations

import argparse

from t5qa.lora import merge_adapter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the lora command group (merge)."""
    p = sub.add_parser("lora", help="LoRA adapter tools (merge an adapter into its base model)",
                       description="Tools for LoRA adapters trained with `t5qa train --lora-rank R`.")
    lora_sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    m = lora_sub.add_parser(
        "merge",
        help="write a plain model with the adapter folded into the base weights",
        description="Load the base model named in ADAPTER/adapter_config.json, add the adapter's low-rank "
                    "update to its weights and save a plain model that predict, serve and export load like "
                    "any other (no peft needed at inference).",
    )
    m.add_argument("--adapter", required=True, help="adapter directory (best/ or last/ of a LoRA training run)")
    m.add_argument("--output", required=True, help="directory to write the merged model to")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model repository's own Python code to run")
    m.add_argument("--allow-pickle", action="store_true", help="allow pickled (.bin) base model weights")
    m.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    """Merge and say where the result is."""
    out = merge_adapter(args.adapter, args.output, trust_remote_code=args.trust_remote_code,
                        allow_pickle=args.allow_pickle)
    print(f"wrote merged model {out} (from adapter {args.adapter})")
    return 0
