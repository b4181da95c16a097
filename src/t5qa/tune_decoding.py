"""Decoding search (`t5qa tune --decoding`): the generation settings that maximise validation F1 of a trained model.

Beams, length penalty, answer length, the no-repeat n-gram size and grounding (answers held to spans of the
context, grounding.py) move F1 as much as training settings do, and
searching them costs no training: each trial answers the validation questions with one setting. Optuna samples
the space (every combination in turn when there are no more of them than trials; TPE otherwise). The first trial
is the model's current setting, so the search reports the F1 it gains over it.

The best setting is written into the model directory: `generation_config.json` (so `model.generate` in plain
transformers uses it too; grounding is t5qa's own and is not written there) and t5qa.json `decoding` (the setting, the F1 before and after, and the data), which
`Predictor.from_pretrained` applies to every setting the caller leaves at its default.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from t5qa.config import DataConfig, GenerateConfig
from t5qa.errors import ConfigError, ModelError, require
from t5qa.predict import DECODING_META_KEY, SEARCHED_DECODING as SEARCHED

logger = logging.getLogger(__name__)
# The searched settings that are transformers' own, written into generation_config.json too.
GENERATION_CONFIG_FIELDS = ("num_beams", "length_penalty", "max_new_tokens", "no_repeat_ngram_size")


def default_space(answer_tokens: int) -> dict[str, list[Any]]:
    """The settings searched, around the model's answer length (its training answers' 99th percentile)."""
    lengths = sorted({max(1, answer_tokens // 2), answer_tokens, answer_tokens * 2})
    return {"num_beams": [1, 2, 4], "length_penalty": [0.6, 1.0, 1.5], "max_new_tokens": lengths,
            "no_repeat_ngram_size": [0, 2, 3], "grounded": [False, True]}


@dataclass
class DecodingSearchResult:
    """What `search_decoding` found and wrote."""

    best: dict[str, Any]
    """The best setting (the searched fields)."""
    f1_before: float
    f1_after: float
    metric: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    """Each trial's setting, f1, exact_match and seconds, in the order run."""
    written: bool = False
    """Whether the model directory was updated (only when the best beats the current setting)."""

    def describe(self) -> str:
        setting = ", ".join(f"{k}={v}" for k, v in self.best.items())
        where = "written to the model" if self.written else "the current setting is already the best; nothing written"
        return (f"{self.metric} F1 {self.f1_before:.2f} -> {self.f1_after:.2f} ({self.f1_after - self.f1_before:+.2f}) "
                f"with {setting} after {len(self.trials)} trials; {where}")


def search_decoding(
    model_dir: str | os.PathLike,
    validation: str | os.PathLike,
    *,
    trials: int = 20,
    space: dict[str, Sequence[Any]] | None = None,
    data_config: DataConfig | None = None,
    max_examples: int | None = None,
    metric: str | None = None,
    seed: int = 0,
    write: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> DecodingSearchResult:
    """Search the generation settings of the model in `model_dir` on `validation`; write the best into it.

    Args:
        model_dir: a trained model directory (RUN/best).
        validation: labelled data (any format `t5qa data` reads); every question is answered in each trial.
        trials: settings to try, the model's current one first.
        space: field -> choices, for the fields in SEARCHED (default: `default_space`).
        data_config, max_examples: how to read `validation`, and how many of its questions to use.
        metric: the scorer (default: chosen from the data).
        seed: the sampler's seed.
        write: write the best setting into the model directory when it beats the current one.
    Returns:
        DecodingSearchResult.
    Raises:
        ConfigError: a bad space or trial count; ModelError, DataError: the model or data cannot be read.
    """
    optuna = require("optuna", "tune", "Decoding search")
    from t5qa.data import load_for_evaluation
    from t5qa.evaluate import choose_metric_for
    from t5qa.metrics import check_metric, score_predictions
    from t5qa.predict import Predictor

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    model_path = Path(model_dir)
    if not model_path.is_dir():
        raise ModelError(f"{model_path}: no such model directory; pass a trained model (RUN/best) with --model")
    examples = load_for_evaluation(str(validation), data_config or DataConfig(), need_inputs=True)
    examples = examples[:max_examples] if max_examples else examples
    if not examples:
        raise ConfigError(f"{validation}: no questions to search decoding settings on")
    metric = check_metric(metric) if metric is not None else choose_metric_for(examples)
    predictor = Predictor.from_pretrained(model_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    current = predictor.generate_settings()
    choices = _check_space(space if space is not None else default_space(predictor.max_new_tokens()))
    pairs = [(ex.context, ex.question) for ex in examples]

    def score(setting: dict[str, Any]) -> dict[str, float]:
        import time

        started = time.perf_counter()
        answers = predictor.answer_many(pairs, **setting)
        result = score_predictions(metric, [(str(i), a.text, list(ex.answers))
                                            for i, (ex, a) in enumerate(zip(examples, answers))])
        return {"f1": result["f1"], "exact_match": result["exact_match"],
                "seconds": round(time.perf_counter() - started, 3)}

    baseline = {name: getattr(current, name) for name in SEARCHED}
    combinations = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
    sampler = (optuna.samplers.GridSampler({k: list(v) for k, v in choices.items()}, seed=seed)
               if len(combinations) <= trials else optuna.samplers.TPESampler(seed=seed))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    records: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, float]] = {}  # a setting tried before is not answered again
    before = score(baseline)
    records.append({**baseline, **before, "trial": "current"})

    def objective(trial: Any) -> float:
        setting = {**baseline, **{name: trial.suggest_categorical(name, list(values))
                                  for name, values in choices.items()}}
        if setting["num_beams"] == 1:  # no effect in greedy search: keep the searched values comparable
            setting["length_penalty"] = baseline["length_penalty"]
        key = tuple(setting[name] for name in SEARCHED)
        outcome = seen.get(key) or score(setting)
        seen[key] = outcome
        records.append({**setting, **outcome, "trial": trial.number})
        return outcome["f1"]

    study.optimize(objective, n_trials=min(trials, len(combinations)))
    # Ties go to the current setting, then to the fastest.
    best = max(records, key=lambda r: (r["f1"], r["exact_match"], r["trial"] == "current", -r["seconds"]))
    best_setting = {name: best[name] for name in SEARCHED}
    result = DecodingSearchResult(best=best_setting, f1_before=before["f1"], f1_after=best["f1"], metric=metric,
                                  trials=records)
    if write and best["f1"] > before["f1"]:
        _write(model_path, best_setting, {"f1_before": round(before["f1"], 4), "f1_after": round(best["f1"], 4),
                                          "metric": metric, "chosen_on": f"{validation} ({len(examples)} questions)",
                                          "trials": len(records)})
        result.written = True
    return result


def _check_space(space: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
    unknown = sorted(set(space) - set(SEARCHED))
    if unknown:
        raise ConfigError(f"decoding search: unknown setting(s) {', '.join(unknown)}; use {', '.join(SEARCHED)}")
    checked = {}
    for name, values in space.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ConfigError(f"decoding search: {name} has no choices")
        for value in values:  # each choice must be a valid GenerateConfig value
            try:
                GenerateConfig(**{name: value})
            except ConfigError as exc:
                raise ConfigError(f"decoding search: {name}={value!r}: {exc}") from None
        checked[name] = values
    return checked


def _write(model_dir: Path, setting: dict[str, Any], record: dict[str, Any]) -> None:
    """The setting into generation_config.json and t5qa.json (each replaced whole)."""
    from transformers import GenerationConfig

    from t5qa.modeling import update_meta

    try:
        generation = GenerationConfig.from_pretrained(model_dir) if (model_dir / "generation_config.json").is_file() \
            else GenerationConfig()
        for name, value in setting.items():
            if name in GENERATION_CONFIG_FIELDS:
                setattr(generation, name, value)
        generation.save_pretrained(model_dir)
        update_meta(model_dir, DECODING_META_KEY, {"settings": setting, **record})
    except OSError as exc:
        raise ModelError(f"{model_dir}: cannot write the decoding settings ({exc.strerror or exc}); check that the "
                         "model directory is writable") from None
