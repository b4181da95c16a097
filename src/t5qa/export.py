"""Export a trained model for fast CPU inference with CTranslate2 (`t5qa export --format ct2`).

The export directory holds the CTranslate2 model (model.bin, config.json, shared_vocabulary.json), the
tokenizer and the t5qa.json of the source model (with the quantization added), so that
`Predictor.from_pretrained(DIR, backend="ct2")` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from t5qa.errors import ConfigError, ModelError, require
from t5qa.rundir import MODEL_META_FILE

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "int8", "int8_float32", "bfloat16", "int16")


def export_ct2(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    quantization: str = "float32",
    *,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Convert a saved model directory to a CTranslate2 model directory.

    Args:
        model_dir: a local model directory (HF layout, as written by t5qa).
        output: the directory to create.
        quantization: weight type: float32 (answers identical to PyTorch), int8 / int8_float32 (about 4x
            smaller, fastest on CPU), int16, or bfloat16.
        force: replace `output` if it exists.
        allow_pickle, trust_remote_code: safety switches, as for loading the model.
    Returns:
        The output directory.
    Raises:
        ConfigError: an unknown quantization, or `output` exists without force.
        ModelError: the model directory is missing, unsafe or not convertible.
        MissingExtraError: ctranslate2 is not installed.
    """
    from t5qa.modeling import check_weights_are_safe, load_tokenizer, read_meta

    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    source = Path(model_dir)
    if not source.is_dir():
        raise ModelError(f"{source}: no such model directory; pass the directory of a trained model with --model")
    check_weights_are_safe(source, allow_pickle=allow_pickle)
    output = Path(output)
    if output.exists() and not force:
        raise ConfigError(f"{output}: already exists; choose another --output or remove it first")
    converters = require("ctranslate2.converters", "ct2", "CTranslate2 export")
    meta = read_meta(source)
    tokenizer = load_tokenizer(str(source), trust_remote_code=trust_remote_code)

    # Convert into a temporary sibling, then move into place: a failed conversion leaves nothing behind.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        converter = converters.TransformersConverter(str(source), trust_remote_code=trust_remote_code)
        try:
            converter.convert(str(tmp), quantization=quantization, force=True)
        except (ValueError, NotImplementedError, KeyError, OSError, AttributeError, TypeError) as exc:
            # AttributeError/TypeError: CTranslate2's converter reading a config field this transformers
            # version renamed (BART with transformers 5: `normalize_before`).
            raise ModelError(f"{source}: CTranslate2 cannot convert this model ({type(exc).__name__}: {exc}); "
                             "answer with the torch backend instead") from None
        try:  # some architectures convert but do not load (T5Gemma with CTranslate2 4.x): refuse them here
            import ctranslate2

            ctranslate2.Translator(str(tmp), device="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{source}: CTranslate2 cannot convert this model (the converted model does not load: "
                             f"{exc}); answer with the torch backend instead") from None
        tokenizer.save_pretrained(tmp)
        meta = {**meta, "ct2": {"quantization": quantization, "source": str(source)}}
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s (CTranslate2, %s)", source, output, quantization)
    return output
