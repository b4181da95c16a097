"""`t5qa push`: upload a trained model directory, with its model card, to the Hugging Face Hub."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the push command."""
    p = sub.add_parser(
        "push",
        help="upload a trained model (RUN/best, with its model card) to the Hugging Face Hub",
        description="Upload a model directory to the Hugging Face Hub through huggingface_hub: the repository is "
                    "created when it does not exist. Log in first with `hf auth login`, or set HF_TOKEN.",
    )
    p.add_argument("model", help="the model directory (RUN/best)")
    p.add_argument("--repo", required=True, help="the Hub repository: NAME or USER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="a Hub token (default: the logged-in one, or HF_TOKEN)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Push; print the repository's URL."""
    from t5qa.hub import push_model

    print(f"pushed {args.model} to {push_model(args.model, args.repo, private=args.private, token=args.token)}")
    return 0
