"""LoRA adapters (PEFT) for seq2seq models: train a few million adapter weights instead of every weight.

LoRA adds to a frozen linear layer W a low-rank update (alpha / rank) * B @ A, with A: (rank, in_features) and
B: (out_features, rank); B starts at zero, so the adapted model starts out equal to the base model. Only A and
B are trained, which cuts optimizer state and gradient memory to a small fraction (see docs/DISTRIBUTED.md).

An adapter directory holds adapter_model.safetensors, adapter_config.json (which names the base model), the
tokenizer and t5qa.json. `modeling.load_model` loads such a directory onto its base model, and
`merge_adapter` folds the update into the base weights to give a plain model directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from t5qa.errors import ConfigError, ModelError, require
from t5qa.modeling import load_model, save_model
from t5qa.rundir import MODEL_META_FILE

logger = logging.getLogger(__name__)

# Attention query and value projections, the pairing of the LoRA paper, named per architecture.
_T5_TARGETS = ("q", "v")
_PROJ_TARGETS = ("q_proj", "v_proj")
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    **{t: _T5_TARGETS for t in ("t5", "mt5", "umt5", "longt5", "switch_transformers")},
    **{t: _PROJ_TARGETS for t in ("bart", "mbart", "marian", "pegasus", "pegasus_x", "m2m_100", "blenderbot",
                                  "blenderbot-small", "plbart", "led", "nllb-moe", "bigbird_pegasus")},
}


def _linear_module_names(model: Any) -> list[str]:
    """The last name component of every nn.Linear in the model (the names target_modules matches)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def resolve_target_modules(model: Any, requested: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The module names to adapt: `requested`, or, when it is empty, the model type's query/value projections.

    Args:
        model: the (base) seq2seq model.
        requested: TrainConfig.lora_target_modules (empty: the model type's default).
    Returns:
        Module names, each matching at least one linear layer of the model.
    Raises:
        ConfigError: a requested name matches no linear layer, or nothing was requested for a model type with
            no known default (the message lists the names that exist).
    """
    model_type = getattr(model.config, "model_type", "")
    available = _linear_module_names(model)
    targets = tuple(requested)
    if not targets:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ConfigError(f"--lora-target-modules: t5qa knows no default for a {model_type or 'model'}; name "
                              f"the layers to adapt among its linear layers: {', '.join(available)}")
        targets = DEFAULT_TARGET_MODULES[model_type]
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"--lora-target-modules: no linear layer named {', '.join(repr(m) for m in missing)} in this "
            f"{model_type or 'model'}; its linear layers are named {', '.join(available)} "
            f"(e.g. --lora-target-modules {','.join(DEFAULT_TARGET_MODULES.get(model_type, available[:2]))})"
        )
    return targets


def apply_lora(model: Any, *, rank: int | None, alpha: float, dropout: float,
               target_modules: tuple[str, ...] | list[str] = (), gradient_checkpointing: bool = False) -> Any:
    """Wrap a seq2seq model with LoRA adapters so that only the adapter weights are trainable.

    Args:
        model: a loaded AutoModelForSeq2SeqLM.
        rank, alpha, dropout, target_modules: the LoRA settings (TrainConfig's lora_* fields); empty
            target_modules adapts the model type's attention query and value projections. The defaults are
            TrainConfig's (`train` passes them), not repeated here.
        gradient_checkpointing: whether the model recomputes activations (the embeddings then need gradients).
    Returns:
        A peft.PeftModel (task SEQ_2_SEQ_LM); base weights frozen, adapter weights trainable.
    Raises:
        ConfigError: lora_rank unset, or target modules not found in the model.
        MissingExtraError: peft is not installed.
    """
    peft = require("peft", "lora", "LoRA training")
    if rank is None:
        raise ConfigError("apply_lora needs --lora-rank (e.g. --lora-rank 8)")
    targets = resolve_target_modules(model, target_modules)
    lora_config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
    )
    if gradient_checkpointing:
        # With every base weight frozen, the embedding output needs requires_grad, or checkpointed blocks
        # would see no input that needs a gradient and back-propagate nothing.
        model.enable_input_require_grads()
    wrapped = peft.get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA rank %d on %s: %.2fM trainable of %.2fM parameters (%.2f%%)", rank,
                ",".join(targets), trainable / 1e6, total / 1e6, 100.0 * trainable / max(total, 1))
    return wrapped


def is_lora_model(model: Any) -> bool:
    """Whether `model` is a PEFT-wrapped model (as returned by apply_lora or loaded from an adapter dir)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _absolute_base(name: str | None) -> str | None:
    # A base model given as a relative directory must still be found when the adapter is loaded from
    # another working directory; Hub names stay as they are.
    if name and os.path.isdir(name):
        return str(Path(name).resolve())
    return name


def save_adapter(model: Any, tokenizer: Any, directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Save a LoRA model's adapter (not the base weights), tokenizer and t5qa.json, atomically.

    Writes adapter_model.safetensors, adapter_config.json (base_model_name_or_path made absolute when it is a
    local directory), the tokenizer files and t5qa.json with `meta` plus a "lora" entry.

    Raises:
        ModelError: `model` carries no LoRA adapter.
    """
    if not is_lora_model(model):
        raise ModelError("save_adapter needs a model wrapped by apply_lora (no LoRA adapter found)")
    peft_config = model.peft_config["default"]
    base = peft_config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None)
    peft_config.base_model_name_or_path = _absolute_base(base)
    lora_meta = {
        "base_model": peft_config.base_model_name_or_path,
        "rank": peft_config.r,
        "alpha": peft_config.lora_alpha,
        "dropout": peft_config.lora_dropout,
        "target_modules": sorted(peft_config.target_modules or []),
    }
    save_model(model, tokenizer, directory, {**meta, "lora": lora_meta})


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base model and save a plain model that predict/serve load like any other.

    Args:
        adapter_dir: directory written by save_adapter (adapter_config.json names the base model).
        output_dir: where to write the merged model (HF layout, model.safetensors).
        trust_remote_code, allow_pickle: passed on to loading the base model.
    Returns:
        output_dir as a Path.
    Raises:
        ModelError: not an adapter directory, or the base model cannot be loaded.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json; pass the directory of a LoRA adapter to --adapter")
    if Path(output_dir).resolve() == adapter_dir.resolve():
        raise ConfigError("--output must differ from --adapter: merging would overwrite the adapter")
    model, tokenizer = load_model(str(adapter_dir), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    merged = model.merge_and_unload()
    meta_path = adapter_dir / MODEL_META_FILE
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    meta["merged_from_adapter"] = str(adapter_dir.resolve())
    if "lora" in meta:  # the merged model is no adapter any more; keep the settings for the record
        meta["merged_lora"] = meta.pop("lora")
    save_model(merged, tokenizer, output_dir, meta)
    logger.info("merged %s into %s", adapter_dir, output_dir)
    return Path(output_dir)
