"""Uploading a trained model to the Hugging Face Hub (`t5qa push`, `t5qa train --push-to-hub`), through
`huggingface_hub`'s own `HfApi.create_repo` and `upload_folder`.

What goes up is the model directory as t5qa wrote it: safetensors weights, tokenizer, generation config, t5qa.json
and its model card (README.md, modelcard.py), so the Hub page shows the card and `transformers` alone loads it.
Anything that keeps the upload from happening (no network, offline mode, no token, no permission) is one line
that says what to do; the local directory is never touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from t5qa.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

# What a model directory holds that is not the model (a checkpoint's optimizer state never goes up).
IGNORED = ["checkpoints/*", "*.pt", "optimizer*", "scheduler*", "rng_state*"]


def push_model(model_dir: str | os.PathLike, repo: str, *, private: bool = False, token: str | None = None,
               commit_message: str | None = None) -> str:
    """Create `repo` on the Hub (kept when it exists) and upload `model_dir` into it; returns the repo's URL.

    Raises:
        ModelError: the directory is not a saved model, or the Hub cannot be reached or refuses the upload.
        ConfigError: the repo name is not a Hub name.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    directory = Path(model_dir)
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise ModelError(f"{directory}: not a saved model (no config.json); push a model directory such as RUN/best")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(directory), repo_type="model", ignore_patterns=IGNORED,
                          commit_message=commit_message or f"Upload {directory.name} with t5qa")
    except HFValidationError as exc:
        raise ConfigError(f"--repo {repo!r} is not a Hub repository name ({str(exc).splitlines()[0]}); use "
                          "NAME or USER/NAME") from None
    except OfflineModeIsEnabled:
        raise ModelError(f"cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE); {directory} is "
                         "unchanged, unset HF_HUB_OFFLINE and run `t5qa push` again") from None
    except LocalTokenNotFoundError:
        raise ModelError("cannot push to the Hugging Face Hub: not logged in; run `hf auth login` or set HF_TOKEN, "
                         "then `t5qa push` again") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = {401: "the token is not valid", 403: "the token may not write to this repository"}.get(status, "")
        raise ModelError(f"the Hugging Face Hub refused the upload to {repo}"
                         f"{f' ({why})' if why else ''}: {str(exc).splitlines()[0][:200]}") from None
    except (OSError, ConnectionError) as exc:
        raise ModelError(_unreachable(directory, exc)) from None
    except Exception as exc:  # httpx's transport errors (huggingface_hub's HTTP client) are not OSErrors
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3"):
            raise ModelError(_unreachable(directory, exc)) from None
        raise
    logger.info("pushed %s to %s", directory, url)
    return str(url)


def _unreachable(directory: Path, exc: BaseException) -> str:
    detail = str(exc).splitlines()[0][:160] if str(exc) else "no detail"
    return (f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {detail}); {directory} is unchanged: push "
            f"it later with `t5qa push {directory} --repo NAME`, or copy it by hand")
