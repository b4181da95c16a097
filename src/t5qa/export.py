"""Export a trained model for fast CPU inference with CTranslate2 (`t5qa export --format ct2`), and check it.

The export directory holds the CTranslate2 model (model.bin, config.json, shared_vocabulary.json), the
tokenizer and the t5qa.json of the source model (with the quantization added), so that
`Predictor.from_pretrained(DIR, backend="ct2")` needs nothing else.

An export can answer differently from the model it came from (a converter bug, a quantization that costs more
than expected, weights changed on the way): so the export answers a validation slice (--check-data, or the
run's own validation set) with the trained PyTorch model and with the export, and export_check.json records the
answer agreement, EM/F1 of each, their difference and the speed of each. `max_f1_drop` turns a bigger F1 drop
into an error, and then no export is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from t5qa.errors import ConfigError, DataError, ModelError, require
from t5qa.rundir import MODEL_META_FILE, write_json

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "int8", "int8_float32", "bfloat16", "int16")
CHECK_FILE = "export_check.json"
DEFAULT_CHECK_EXAMPLES = 200
# Questions answered by both models before timing (the torch backend proves its fast paths on its first batch).
WARM_UP_QUESTIONS = 2
SHOWN_DISAGREEMENTS = 5


def export_ct2(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    quantization: str = "float32",
    *,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    check_data: str | os.PathLike | None = None,
    check_examples: int = DEFAULT_CHECK_EXAMPLES,
    max_f1_drop: float | None = None,
    data_config: Any = None,
) -> Path:
    """Convert a saved model directory to a CTranslate2 model directory, and check its answers.

    Args:
        model_dir: a local model directory (HF layout, as written by t5qa).
        output: the directory to create.
        quantization: weight type: float32 (answers identical to PyTorch), int8 / int8_float32 (about 4x
            smaller, fastest on CPU), int16, or bfloat16.
        force: replace `output` if it exists.
        allow_pickle, trust_remote_code: safety switches, as for loading the model.
        check_data: the data to check the export on (any format `t5qa data` reads, with answers); None uses the
            run's validation set, found through the model's t5qa.json.
        check_examples: how many of its first questions to answer with both models; 0 skips the check.
        max_f1_drop: the largest F1 drop (points, PyTorch minus export) accepted; a bigger one is an error and
            nothing is written. None records the check without judging it.
        data_config: column mapping for `check_data` (a DataConfig).
    Returns:
        The output directory, with export_check.json when the export was checked.
    Raises:
        ConfigError: an unknown quantization, `output` exists without force, or max_f1_drop without data.
        ModelError: the model directory is missing, unsafe or not convertible, or the export failed its check.
        DataError: the check data cannot be read.
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
    if check_examples < 0:
        raise ConfigError(f"--check-examples must be 0 (no check) or more, got {check_examples}")
    if max_f1_drop is not None and (max_f1_drop != max_f1_drop or max_f1_drop < 0):
        raise ConfigError(f"--max-f1-drop must be 0 or more F1 points, got {max_f1_drop}")
    converters = require("ctranslate2.converters", "ct2", "CTranslate2 export")
    meta = read_meta(source)
    tokenizer = load_tokenizer(str(source), trust_remote_code=trust_remote_code)
    examples, described = (check_slice(meta, tokenizer, check_data, data_config, check_examples)
                           if check_examples else ([], "--check-examples 0"))
    if not examples:
        if max_f1_drop is not None:
            raise ConfigError(f"--max-f1-drop needs questions to check the export on, and there are none "
                              f"({described}); pass --check-data FILE")
        if check_examples:
            logger.warning("the export is not checked (%s); pass --check-data FILE to compare its answers with the "
                           "trained model's", described)

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
        if examples:
            run_metric = meta.get("train_config", {}).get("metric") if check_data is None else None
            check = check_export(source, tmp, examples, described, quantization=quantization,
                                 max_f1_drop=max_f1_drop, metric=run_metric, allow_pickle=allow_pickle,
                                 trust_remote_code=trust_remote_code)
            if not check.passed:
                raise ModelError(f"{output}: the export failed its check and was not written: {check.describe()}; "
                                 "export float32, or raise --max-f1-drop")
            write_json(tmp / CHECK_FILE, check.to_dict())
            logger.debug("export check: %s", check.describe())
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s (CTranslate2, %s)", source, output, quantization)
    return output


# ------------------------------------------------------------------------------------------------ the check


@dataclass
class ExportCheck:
    """How an export answers a validation slice compared with the PyTorch model it came from."""

    data: str
    """Which questions were answered (a file, or the run's validation set)."""
    questions: int
    metric: str
    quantization: str
    agreement: float
    """Share of questions (0-1) the two answer with the same text."""
    torch: dict[str, float]
    """exact_match, f1 (0-100) and questions_per_second of the PyTorch model."""
    export: dict[str, float]
    """The same for the export."""
    max_f1_drop: float | None = None
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    """The first questions answered differently: id, question, torch and export answers."""

    @property
    def delta_exact_match(self) -> float:
        """EM of the export minus EM of the PyTorch model (points)."""
        return self.export["exact_match"] - self.torch["exact_match"]

    @property
    def delta_f1(self) -> float:
        """F1 of the export minus F1 of the PyTorch model (points)."""
        return self.export["f1"] - self.torch["f1"]

    @property
    def passed(self) -> bool:
        """True unless max_f1_drop is set and F1 dropped by more."""
        return self.max_f1_drop is None or -self.delta_f1 <= self.max_f1_drop + 1e-9

    def describe(self) -> str:
        """One line: agreement, EM/F1 of each, the change, and the speed of each."""
        limit = f" (limit: a drop of {self.max_f1_drop:g})" if self.max_f1_drop is not None else ""
        speed = ""
        if self.torch.get("questions_per_second") and self.export.get("questions_per_second"):
            ratio = self.export["questions_per_second"] / self.torch["questions_per_second"]
            speed = (f"; {self.torch['questions_per_second']:.1f} vs {self.export['questions_per_second']:.1f} "
                     f"questions/s ({ratio:.2f}x)")
        return (f"{self.questions} questions of {self.data}, {self.quantization}: {100 * self.agreement:.1f}% same "
                f"answers; {self.metric} EM {self.torch['exact_match']:.2f} -> {self.export['exact_match']:.2f} "
                f"({self.delta_exact_match:+.2f}), F1 {self.torch['f1']:.2f} -> {self.export['f1']:.2f} "
                f"({self.delta_f1:+.2f}){limit}{speed}")

    def to_dict(self) -> dict[str, Any]:
        """What export_check.json holds (the fields, the deltas and the verdict)."""
        return {**asdict(self), "delta_exact_match": round(self.delta_exact_match, 4),
                "delta_f1": round(self.delta_f1, 4), "passed": self.passed}


def read_check(export_dir: str | os.PathLike) -> ExportCheck | None:
    """The check `t5qa export` wrote into `export_dir`; None where there is none (or it cannot be read)."""
    path = Path(export_dir) / CHECK_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        names = set(ExportCheck.__dataclass_fields__)
        return ExportCheck(**{k: v for k, v in saved.items() if k in names})
    except (OSError, ValueError, TypeError):
        return None


def check_slice(meta: dict[str, Any], tokenizer: Any, check_data: str | os.PathLike | None, data_config: Any,
                limit: int) -> tuple[list[Any], str]:
    """The first `limit` questions to check an export on, and where they come from (or why there are none).

    --check-data is read as evaluation reads data (every question kept); without it, the run's validation set is
    rebuilt from the model's t5qa.json: its --validation file, or the same held-out split of its --train."""
    from t5qa.config import DataConfig, TrainConfig, from_dict
    from t5qa.data import load_for_evaluation

    if check_data is not None:
        examples = load_for_evaluation(str(check_data), data_config or DataConfig(), need_inputs=True)
        return examples[:limit], str(check_data)
    saved = meta.get("train_config")
    if not isinstance(saved, dict) or not saved.get("train"):
        return [], "the model's t5qa.json names no training run"
    try:
        cfg = from_dict(TrainConfig, {**saved, "encode": meta.get("encode") or {}}, source="t5qa.json")
    except ConfigError as exc:
        return [], f"the run's settings in t5qa.json cannot be read ({exc})"
    wanted = cfg.validation or cfg.train
    if not Path(wanted).exists():
        return [], f"the run's data {wanted} is not there"
    if cfg.validation:
        examples = load_for_evaluation(str(cfg.validation), cfg.data, need_inputs=True)
        return examples[:limit], f"the run's validation data {cfg.validation}"
    if cfg.data.val_fraction <= 0:
        return [], "the run had no validation set"
    from t5qa.train import load_run_examples

    _, validation = load_run_examples(cfg, tokenizer)
    return validation[:limit], f"the run's validation split of {cfg.train}"


def check_export(
    source: str | os.PathLike,
    export_dir: str | os.PathLike,
    examples: Sequence[Any],
    data: str,
    *,
    quantization: str = "float32",
    max_f1_drop: float | None = None,
    metric: str | None = None,
    generate: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ExportCheck:
    """Answer `examples` with the PyTorch model in `source` and the CTranslate2 model in `export_dir` (the same
    prompt, windows and decoding settings) and compare: agreement, EM/F1 of each under `metric` (chosen from the
    data when None), and questions/s of each after a short warm-up."""
    from t5qa.evaluate import choose_metric_for
    from t5qa.metrics import check_metric, score_predictions
    from t5qa.predict import Predictor

    if not examples:
        raise DataError(f"{data}: no questions to check the export on")
    metric = check_metric(metric) if metric is not None else choose_metric_for(examples)
    pairs = [(ex.context, ex.question) for ex in examples]
    answers: dict[str, list[str]] = {}
    scores: dict[str, dict[str, float]] = {}
    for name, backend, directory in (("torch", "torch", source), ("export", "ct2", export_dir)):
        predictor = Predictor.from_pretrained(directory, backend=backend, generate=generate,
                                              allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        predictor.answer_many(pairs[:WARM_UP_QUESTIONS])
        started = time.perf_counter()
        texts = [a.text for a in predictor.answer_many(pairs)]
        seconds = time.perf_counter() - started
        # Scored by position, not by id: a check slice may repeat ids, and every question counts.
        result = score_predictions(metric, [(str(i), text, list(ex.answers))
                                            for i, (ex, text) in enumerate(zip(examples, texts))])
        answers[name] = texts
        scores[name] = {"exact_match": round(result["exact_match"], 4), "f1": round(result["f1"], 4),
                        "questions_per_second": round(len(pairs) / seconds, 2) if seconds else 0.0}
    same = [a == b for a, b in zip(answers["torch"], answers["export"])]
    differ = [{"id": ex.id, "question": ex.question, "torch": a, "export": b}
              for ex, a, b, s in zip(examples, answers["torch"], answers["export"], same) if not s]
    return ExportCheck(data=data, questions=len(pairs), metric=metric, quantization=quantization,
                       agreement=round(sum(same) / len(same), 4), torch=scores["torch"], export=scores["export"],
                       max_f1_drop=max_f1_drop, disagreements=differ[:SHOWN_DISAGREEMENTS])
