"""Load, create and save any AutoModelForSeq2SeqLM with its tokenizer, safely.

Safety defaults: weights load from safetensors only (pickled `.bin` weights can run code when unpickled, so
they need `allow_pickle=True`), and `trust_remote_code` stays off unless the caller asks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from t5qa.errors import ConfigError, DataError, ModelError
from t5qa.rundir import MODEL_META_FILE

logger = logging.getLogger(__name__)


# Architectures for `t5qa init-model --config NAME`. t5-small / t5-base are the public T5 v1.0 shapes;
# tiny, mini and byte-mini are for tests and offline demos (trained from scratch in seconds to minutes on a CPU).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                 dropout_rate=0.0, feed_forward_proj="relu", relative_attention_num_buckets=16,
                 relative_attention_max_distance=64),
    "mini": dict(d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=3, num_decoder_layers=3,
                 dropout_rate=0.0, feed_forward_proj="relu", relative_attention_num_buckets=32,
                 relative_attention_max_distance=128),
    # ByT5's shape in miniature, for bytes: gated GELU, T5 v1.1's untied-head setting, a deeper encoder than decoder
    # (ByT5 puts three encoder layers per decoder layer: its inputs are long, its answers short).
    "byte-mini": dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=3, num_decoder_layers=1,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128),
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6,
                     dropout_rate=0.1, feed_forward_proj="relu", relative_attention_num_buckets=32,
                     relative_attention_max_distance=128),
    "t5-base": dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                    dropout_rate=0.1, feed_forward_proj="relu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128),
}

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def hub_unreachable_message(name: str) -> str:
    """The one line shown when a Hub model is asked for and the Hub cannot be reached."""
    return (
        f"cannot download '{name}': the Hugging Face Hub is unreachable from this machine. "
        f"Pass a local model directory with --model DIR (one saved by t5qa or transformers), or create a "
        f"model to train from scratch: t5qa init-model --config t5-small --tokenizer TOKENIZER_DIR --output DIR"
    )


def _is_local(name: str) -> bool:
    return os.path.isdir(name)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep) and name.count("/") > 1


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within `timeout_s` (False with HF_HUB_OFFLINE=1).

    Checked once per process so an unreachable Hub costs seconds, not the minute of retries that
    `from_pretrained` spends before it gives up.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout_s):
            return True
    except OSError:
        return False


def _hub_kwargs(name: str) -> dict[str, Any]:
    """Load a Hub name from the local cache only when the Hub cannot be reached."""
    if _is_local(name) or hub_reachable():
        return {}
    return {"local_files_only": True}


def _raise_load_error(name: str, what: str, exc: Exception) -> None:
    text = str(exc)
    if not _is_local(name) and not _looks_like_path(name) and not hub_reachable():
        raise ModelError(hub_unreachable_message(name)) from None
    if not _is_local(name):
        if _looks_like_path(name):
            raise ModelError(f"{name}: no such {what} directory; check the path given to --model") from None
        offline_markers = ("offline", "connect", "resolve", "Network", "timed out", "Max retries", "couldn't")
        if os.environ.get("HF_HUB_OFFLINE") == "1" or any(m.lower() in text.lower() for m in offline_markers):
            raise ModelError(hub_unreachable_message(name)) from None
        raise ModelError(f"cannot load {what} '{name}': {text.splitlines()[0] if text else exc!r}") from None
    raise ModelError(f"{name}: cannot load the {what} ({text.splitlines()[0] if text else exc!r})") from None


def load_tokenizer(name_or_dir: str, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local directory or a Hub name.

    Raises:
        ModelError: not found, Hub unreachable, or unreadable.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_dir), trust_remote_code=trust_remote_code,
                                             **_hub_kwargs(str(name_or_dir)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _raise_load_error(str(name_or_dir), "tokenizer", exc)
        raise  # unreachable; keeps type checkers happy


def check_weights_are_safe(directory: str | os.PathLike, *, allow_pickle: bool) -> None:
    """Refuse a local model directory that holds only pickled weights unless `allow_pickle`.

    Raises:
        ModelError: pickled weights only and allow_pickle is False, or no weights at all.
    """
    path = Path(directory)
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    has_safe = any(n in names for n in _SAFE_WEIGHTS) or any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n in names for n in _PICKLE_WEIGHTS) or any(
        n.startswith("pytorch_model-") and n.endswith(".bin") for n in names
    )
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path}: the weights are pickled (pytorch_model.bin), and unpickling can run arbitrary code. "
            f"Convert them to safetensors, or pass --allow-pickle if you trust where they came from"
        )
    if not has_safe and not has_pickle:
        raise ModelError(f"{path}: no model weights found (expected model.safetensors); is this a model directory?")


# transformers 5 draws a progress bar for every load and save of a model's weights, also of a 0.1M-parameter model
# that takes milliseconds; t5qa's own calls hide those two (the Hub's download bars stay).
_QUIET_BARS = ("Loading weights", "Writing model shards")


@contextlib.contextmanager
def quiet_weight_bars() -> Iterator[None]:
    """Within the block, transformers draws no 'Loading weights' / 'Writing model shards' bars."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):
        yield
        return
    previous: Any = None

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("desc") in _QUIET_BARS:
            return hf_logging.EmptyTqdm(*args, **kwargs)
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def load_model(
    name_or_dir: str,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Load any AutoModelForSeq2SeqLM and its tokenizer from a directory or the Hub.

    A directory holding a PEFT adapter (adapter_config.json) is loaded onto its base model.

    Args:
        name_or_dir: local directory or Hub name (e.g. "t5-small", "google/flan-t5-base").
        trust_remote_code: allow the repository's own Python code to run.
        allow_pickle: allow pickled `.bin` weights (refused by default).
        dtype: torch dtype to load in (default: the checkpoint's).
    Returns:
        (model in eval mode, tokenizer).
    Raises:
        ModelError: missing, unsafe, unreachable or not a seq2seq model.
    """
    from transformers import AutoModelForSeq2SeqLM

    name = str(name_or_dir)
    if _is_local(name) and (Path(name) / "adapter_config.json").is_file():
        return _load_adapter(name, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, dtype=dtype)
    if _is_local(name):
        check_weights_are_safe(name, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **_hub_kwargs(name)}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with quiet_weight_bars():
            model = AutoModelForSeq2SeqLM.from_pretrained(name, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration" in str(exc) or "AutoModelForSeq2SeqLM" in str(exc):
            raise ModelError(
                f"'{name}' is not a sequence-to-sequence model (AutoModelForSeq2SeqLM); use a T5, Flan-T5, mT5, "
                f"ByT5 or BART model"
            ) from None
        _raise_load_error(name, "model", exc)
    except OSError as exc:
        if not allow_pickle and "safetensors" in str(exc).lower() and not _is_local(name):
            raise ModelError(
                f"'{name}' has no safetensors weights; pass --allow-pickle to load its pickled weights if you trust it"
            ) from None
        _raise_load_error(name, "model", exc)
    ensure_generation_ids(model, tokenizer)
    model.eval()
    return model, tokenizer


def _load_adapter(directory: str, *, trust_remote_code: bool, allow_pickle: bool, dtype: Any) -> tuple[Any, Any]:
    from t5qa.errors import require

    peft = require("peft", "lora", "Loading a LoRA adapter")
    config = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{directory}/adapter_config.json names no base_model_name_or_path")
    model, _ = load_model(base, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, dtype=dtype)
    tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
    with quiet_weight_bars():
        model = peft.PeftModel.from_pretrained(model, directory)
    model.eval()
    return model, tokenizer


def ensure_generation_ids(model: Any, tokenizer: Any) -> None:
    """Make sure decoder_start/pad/eos ids are set (transformers 5's T5Config() no longer sets them)."""
    config = model.config
    for holder in (config, model.generation_config):
        if getattr(holder, "pad_token_id", None) is None:
            holder.pad_token_id = tokenizer.pad_token_id
        if getattr(holder, "eos_token_id", None) is None:
            holder.eos_token_id = tokenizer.eos_token_id
        if getattr(holder, "decoder_start_token_id", None) is None:
            holder.decoder_start_token_id = tokenizer.pad_token_id


BYTE_FALLBACK_MIN_VOCAB = 512
"""The smallest vocabulary that gets byte fallback: 256 of its pieces are the bytes."""


def train_tokenizer(texts: list[str], vocab_size: int, *, byte_fallback: bool = False) -> Any:
    """Train a SentencePiece-style Unigram tokenizer (T5 layout: <pad>=0, </s>=1, <unk>=2) on texts.

    Built with the `tokenizers` library's Unigram trainer and Metaspace pre-tokenizer, which is the
    SentencePiece algorithm. Every character of `texts` gets a piece (full character coverage: the texts are not
    normalised, so full-width punctuation such as "，" and "？" stays itself). With `byte_fallback`, 256 byte
    pieces (<0x00>..<0xFF>, counted in `vocab_size`, which must then be at least 512) are added and a character
    outside the vocabulary is written as its UTF-8 bytes instead of <unk>, as SentencePiece's byte_fallback does:
    a from-scratch Chinese model never sees <unk>.

    Returns:
        A transformers T5Tokenizer; with byte_fallback a tokenizers-backed tokenizer with the same layout,
        saved and reloaded as is (T5Tokenizer rebuilds its model without byte fallback).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Tokenizer

    if not texts:
        raise DataError("cannot train a tokenizer on no text; the data file has no examples")
    if byte_fallback and vocab_size < BYTE_FALLBACK_MIN_VOCAB:
        logger.info("vocabulary of %d pieces: too small to hold the 256 byte pieces, so no byte fallback "
                    "(use --vocab-size %d or more for it)", vocab_size, BYTE_FALLBACK_MIN_VOCAB)
        byte_fallback = False
    if byte_fallback:
        vocab_size -= 256  # the byte pieces count in the vocabulary size
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        max_piece_length=16,
    )
    trainer_tok.train_from_iterator(texts, trainer)
    vocab = [tuple(piece) for piece in json.loads(trainer_tok.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    if not byte_fallback:
        return tokenizer
    known = {piece for piece, _ in vocab}
    # Byte pieces score below every learned piece, so they are used only where nothing else fits.
    lowest = min(score for _, score in vocab)
    vocab += [(f"<0x{b:02X}>", lowest - 10.0) for b in range(256) if f"<0x{b:02X}>" not in known]
    backend = tokenizer.backend_tokenizer
    backend.model = models.Unigram(vocab, unk_id=2, byte_fallback=True)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _texts_for_tokenizer(data_file: str, data_config: Any = None) -> list[str]:
    from t5qa.data import load_examples
    from t5qa.config import DataConfig

    examples = load_examples(data_file, data_config or DataConfig(), require_answers=False)
    texts: list[str] = []
    seen_contexts: set[str] = set()
    for ex in examples:
        if ex.context not in seen_contexts:
            seen_contexts.add(ex.context)
            texts.append(ex.context)
        texts.append(ex.question)
        texts.extend(ex.answers)
    # The prompt words must be in the vocabulary too.
    texts.append("question: context:")
    return texts


BYTE_TOKENIZER = "bytes"
"""`init-model --tokenizer bytes`: ByT5's byte-level tokenizer."""


def init_model(
    config: str,
    tokenizer_source: str,
    output: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    seed: int = 0,
    data_config: Any = None,
) -> Path:
    """Create a randomly initialised seq2seq model to train from scratch, and save it with its tokenizer.

    Args:
        config: a preset name (see PRESETS) or a directory/file with a transformers config.json.
        tokenizer_source: a tokenizer directory, a data file to train a SentencePiece tokenizer on (every
            character covered, byte fallback for the rest), or "bytes" for ByT5's byte tokenizer.
        output: directory to write (HF layout).
        vocab_size: vocabulary size when training a tokenizer.
        seed: seed of the weight initialisation.
        data_config: how to read `tokenizer_source` when it is a data file (a DataConfig: its columns).
    Returns:
        The output directory.
    Raises:
        ConfigError, ModelError, DataError: unknown preset, unreadable tokenizer or data.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, T5Config

    if tokenizer_source == BYTE_TOKENIZER:
        from transformers import ByT5Tokenizer

        tokenizer = ByT5Tokenizer()  # no vocabulary to learn: UTF-8 bytes cover every language
    elif os.path.isdir(tokenizer_source) or not os.path.exists(tokenizer_source):
        tokenizer = load_tokenizer(tokenizer_source)
    else:
        tokenizer = train_tokenizer(_texts_for_tokenizer(tokenizer_source, data_config), vocab_size,
                                    byte_fallback=True)

    if config in PRESETS:
        model_config = T5Config(vocab_size=len(tokenizer), **PRESETS[config])
    elif os.path.exists(config):
        try:
            model_config = AutoConfig.from_pretrained(config)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{config}: not a readable model config ({exc})") from None
        if getattr(model_config, "vocab_size", 0) < len(tokenizer):
            model_config.vocab_size = len(tokenizer)
    else:
        raise ConfigError(
            f"--config: unknown preset '{config}'; use one of {', '.join(PRESETS)} or a directory with config.json"
        )
    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.eos_token_id = tokenizer.eos_token_id
    model_config.decoder_start_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(model_config)
    ensure_generation_ids(model, tokenizer)
    save_model(model, tokenizer, output, {"created_by": "t5qa init-model", "preset": config})
    logger.info("initialised %s (%.1fM parameters) in %s", config, count_parameters(model) / 1e6, output)
    return Path(output)


def save_model(model: Any, tokenizer: Any, directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Save model, tokenizer, generation config and t5qa.json in the Hugging Face layout, atomically.

    The files are written to a temporary sibling directory which then replaces `directory`, so a crash
    never leaves a half-written model where a complete one was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with quiet_weight_bars():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The t5qa.json saved with a model ({} for a model not saved by t5qa, e.g. a Hub name)."""
    path = Path(directory) / MODEL_META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable t5qa metadata ({exc}); delete the file to use defaults") from None


def update_meta(directory: str | os.PathLike, key: str, value: Any) -> None:
    """Set one key of the t5qa.json saved with a model; the file is replaced whole, so a crash leaves the old one.

    Raises:
        OSError: the directory cannot be written (callers say which setting was not saved).
    """
    from t5qa.rundir import write_json

    path = Path(directory) / MODEL_META_FILE
    partial = path.with_name(path.name + ".tmp")
    write_json(partial, {**read_meta(directory), key: value})
    os.replace(partial, path)


def count_parameters(model: Any, *, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def is_t5_family(model: Any) -> bool:
    """T5, mT5, ByT5, Flan-T5, UMT5: the models that overflow in fp16."""
    return getattr(model.config, "model_type", "") in ("t5", "mt5", "umt5", "longt5")


def check_precision(model: Any, precision: str) -> None:
    """Refuse fp16 for the T5 family, which overflows (inf/NaN activations) in float16.

    Raises:
        ConfigError: fp16 with a T5-family model.
    """
    if precision == "fp16" and is_t5_family(model):
        raise ConfigError(
            "--precision fp16 is refused for T5-family models: their activations overflow float16 and the loss "
            "becomes NaN. Use --precision bf16 (same memory saving, wider range) or fp32"
        )


def freeze(model: Any, *, embeddings: bool = False, encoder: bool = False, first_layers: int = 0) -> int:
    """Freeze parts of a seq2seq model; returns the number of parameters frozen.

    Args:
        embeddings: the shared token embeddings (and tied input embeddings).
        encoder: the whole encoder.
        first_layers: the first N blocks of the encoder and of the decoder.
    """
    frozen: set[int] = set()

    def off(module: Any) -> None:
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.add(id(p))

    if embeddings:
        off(model.get_input_embeddings())
    if encoder:
        off(model.get_encoder())
    if first_layers:
        for stack in (model.get_encoder(), getattr(model, "get_decoder", lambda: None)()):
            blocks = getattr(stack, "block", None) or getattr(stack, "layers", None)
            if blocks is None:
                raise ConfigError("--freeze-layers: this model's layers are not in a .block/.layers list")
            for block in list(blocks)[:first_layers]:
                off(block)
    params = {id(p): p.numel() for p in model.parameters()}
    return sum(params[i] for i in frozen if i in params)
