"""The Python API: what the CLI, the server, `tune` and `demo` call, and what a notebook imports.

    from t5qa import api
    result = api.train(model="t5-small", train="train.json", output="runs/qa")
    metrics = api.evaluate(result.best_dir, "dev.json").metrics
    api.predict_file(result.best_dir, "questions.csv", "answers.jsonl")
    answer = api.load_predictor(result.best_dir).answer(context, question)

Each function takes the same settings as its command's flags (the fields of the config dataclasses in
config.py), loads what it needs and raises a T5QAError subclass with a one-line message for bad input.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from t5qa.config import DataConfig, EncodeConfig, GenerateConfig, TrainConfig, load_train_config, to_dict
from t5qa.errors import ConfigError, DataError, ModelError

# The answer file formats `predict_file` writes, by file extension.
OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".csv": "csv", ".tsv": "tsv",
                  ".json": "json"}


@dataclass
class DataInspection:
    """What `inspect_data` found: counts before and after cleaning, the cleaning report and, with a tokenizer,
    token statistics (`stats.DatasetStats`)."""

    source: str
    format: str
    load_seconds: float
    loaded: dict[str, int]
    kept: dict[str, int]
    cleaning: Any            # data.CleaningReport
    stats: Any               # stats.DatasetStats, or None without a tokenizer
    examples: list[Any]      # the kept examples
    model: str | None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the examples, as JSON-ready values."""
        return {"source": self.source, "format": self.format, "load_seconds": self.load_seconds,
                "loaded": self.loaded, "kept": self.kept, "model": self.model, "cleaning": self.cleaning.to_dict(),
                "stats": self.stats.to_dict() if self.stats is not None else None}


def _counts(examples: list[Any]) -> dict[str, int]:
    return {"questions": len(examples), "unanswerable": sum(not ex.is_answerable for ex in examples),
            "contexts": len({ex.context for ex in examples})}


def inspect_data(path: str | Path, data_config: DataConfig | None = None, encode_config: EncodeConfig | None = None,
                 *, model: str | None = None) -> DataInspection:
    """Load and clean a dataset and, with `model` (a tokenizer or model directory or Hub name), measure its
    token lengths, answers lost to truncation and unknown-token rate. Writes nothing."""
    from t5qa.data import clean_examples, detect_format, load_examples

    data, encode = data_config or DataConfig(), encode_config or EncodeConfig()
    path = str(path)
    fmt = data.format or (detect_format(path) if Path(path).exists() else "hf")
    started = time.perf_counter()
    loaded = load_examples(path, data)
    load_seconds = time.perf_counter() - started
    if not loaded:
        raise DataError(f"{path}: the dataset is empty (no questions found); check the file and --format")
    tokenizer = None
    if model is not None:
        from t5qa.modeling import load_tokenizer

        tokenizer = load_tokenizer(model)
    kept, report = clean_examples(loaded, data, tokenizer=tokenizer,
                                  max_answer_tokens=encode.max_target_tokens if tokenizer is not None else None)
    if not kept:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(report.dropped.items()))
        raise DataError(f"{path}: all {len(loaded)} examples were dropped by cleaning ({reasons}); check "
                        "the column mapping (--context-column, --question-column, --answer-column)")
    stats = None
    if tokenizer is not None:
        from t5qa.stats import compute_stats

        stats = compute_stats(kept, tokenizer, encode)
    return DataInspection(source=path, format=fmt, load_seconds=round(load_seconds, 3), loaded=_counts(loaded),
                          kept=_counts(kept), cleaning=report, stats=stats, examples=kept, model=model)


def prepare_data(path: str | Path, output: str | Path, data_config: DataConfig | None = None,
                 encode_config: EncodeConfig | None = None, *, model: str | None = None
                 ) -> tuple[DataInspection, dict[str, Any]]:
    """Clean a dataset and split it by context (no context in two splits) into OUTPUT/train.jsonl,
    validation.jsonl, test.jsonl and report.json; returns the inspection and the report written."""
    from t5qa.data import split_examples, write_jsonl

    data = data_config or DataConfig()
    inspection = inspect_data(path, data, encode_config, model=model)
    splits = split_examples(inspection.examples, data.val_fraction, data.test_fraction, data.split_seed)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output}: exists and is not a directory; choose another path")
    output.mkdir(parents=True, exist_ok=True)
    split_info = {}
    for name, examples in splits.items():
        split_path = output / f"{name}.jsonl"
        write_jsonl(examples, split_path)
        split_info[name] = {"path": str(split_path), **_counts(examples)}
    report = inspection.to_dict()
    report["data_config"] = to_dict(data)
    report["encode_config"] = to_dict(encode_config or EncodeConfig()) if model else None
    report["splits"] = split_info
    (output / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return inspection, report


def train(config: TrainConfig | str | Path | None = None, *, on_evaluate: Callable[[int, dict], None] | None = None,
          progress: bool | None = None, **settings: Any) -> Any:
    """Fine-tune a model; returns `train.TrainResult` (best_dir, last_dir, final metrics).

    Args:
        config: a TrainConfig, or a YAML file of its fields; None starts from the defaults.
        on_evaluate, progress: as `train.fit`.
        settings: TrainConfig fields (nested ones by their own names: max_source_tokens, num_beams, ...), which
            override `config`.
    """
    from t5qa.train import fit

    if isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **settings) if settings else config
    else:
        cfg = load_train_config(config, **settings)
    return fit(cfg, on_evaluate=on_evaluate, progress=progress)


def load_predictor(model_dir: str | Path, *, backend: str = "torch", generate: GenerateConfig | None = None,
                   stride_tokens: int | None = None, max_source_tokens: int | None = None,
                   allow_pickle: bool = False, trust_remote_code: bool = False, chosen: Sequence[str] = (),
                   device: Any = None) -> Any:
    """The `predict.Predictor` of a saved model (its prompt, input length and answer length come with it).
    `chosen` names the `generate` fields the caller set, kept over the decoding settings tuned for the model;
    `device` None answers on the GPU when there is one."""
    from t5qa.predict import Predictor

    return Predictor.from_pretrained(str(model_dir), backend=backend, generate=generate,
                                     stride_tokens=stride_tokens, max_source_tokens=max_source_tokens,
                                     allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, chosen=chosen,
                                     device=None if device is None else str(device))


def evaluate(model_dir: str | Path, data: str | Path, *, data_config: DataConfig | None = None,
             generate: GenerateConfig | None = None, metric: str | None = None, stride_tokens: int | None = None,
             max_examples: int | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
             calibrate_no_answer: bool = False, chosen: Sequence[str] = (), shards: str | Path | None = None,
             shard_size: int | None = None) -> Any:
    """Score a saved model on every question of `data` (nothing dropped); returns `evaluate.EvalResult`.

    The input settings come from the model directory; `generate` fields left at None take the model's defaults
    (its answer length from training, its calibrated no-answer threshold). With `calibrate_no_answer`, the F1-best
    no-answer threshold is chosen on `data` (validation data with unanswerable questions, never the test set) and
    saved into the model directory's t5qa.json, where predict, evaluate and serve find it.

    With `shards` (a directory; the CLI uses OUTPUT.shards/ next to --output), the questions are answered and
    scored in shards of `shard_size` (t5qa.shards): shared by the processes of `accelerate launch`, and after a
    crash only the shards not done are answered again. The main process combines them and returns the result;
    the other processes return None."""
    from t5qa.evaluate import evaluate_model, evaluate_rows, plan_evaluation, score_rows
    from t5qa.predict import Predictor
    from t5qa.shards import DEFAULT_SHARD_SIZE, ShardedJob, processes, run_shards

    examples = _evaluation_examples(data, data_config, max_examples, need_inputs=True)
    if calibrate_no_answer and all(ex.answers for ex in examples):
        raise ConfigError(f"--calibrate-no-answer: every question in {data} has an answer; calibrate on validation "
                          "data with unanswerable questions (SQuAD v2.0 style)")
    procs = processes()
    if shards is None and procs.world > 1:
        raise ConfigError("evaluate under accelerate launch needs --output: the processes keep their shards next "
                          "to it (OUTPUT.shards/), which also lets a crashed run resume")
    predictor = load_predictor(model_dir, generate=generate, stride_tokens=stride_tokens,
                               allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, chosen=chosen,
                               device=procs.device if procs.world > 1 else None)
    settings = predictor.generate_settings()
    if shards is None:
        result = evaluate_model(predictor.model, predictor.tokenizer, examples, predictor.encode_config, settings,
                                batch_size=settings.batch_size, metric=metric,
                                calibrate_no_answer=calibrate_no_answer)
    else:
        started = time.perf_counter()
        metric, calibrate, measured = plan_evaluation(examples, metric, settings, calibrate_no_answer)
        scorer = Predictor(predictor.model, predictor.tokenizer, predictor.encode_config, measured)
        job = ShardedJob(Path(shards), total=len(examples), shard_size=shard_size or DEFAULT_SHARD_SIZE,
                         procs=procs, fingerprint={**_answering_job(predictor, model_dir, data), "task": "evaluate",
                                                   "metric": metric, "calibrate": calibrate,
                                                   "max_examples": max_examples})

        def score(start: int, end: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
            return evaluate_rows(scorer, examples[start:end], batch_size=measured.batch_size, metric=metric,
                                 measure_no_answer=calibrate)

        run_shards(job, score)
        if not procs.is_main:
            procs.wait_for_everyone()
            return None
        result = score_rows(list(job.rows()), job.totals(), metric, calibrate=calibrate)
        result.metrics["eval_seconds"] = time.perf_counter() - started
        job.remove()
        procs.wait_for_everyone()
    if result.no_answer is not None:
        _save_no_answer(Path(model_dir), {**result.no_answer.to_dict(), "chosen_on": f"{data} "
                                          f"({result.no_answer.chosen_on})"})
    return result


def _save_no_answer(model_dir: Path, calibration: dict[str, Any]) -> None:
    """Write the calibration into the model's t5qa.json (replaced whole, so a crash leaves the old file)."""
    from t5qa.modeling import update_meta
    from t5qa.noanswer import META_KEY

    if not model_dir.is_dir():
        raise ConfigError(f"--calibrate-no-answer saves the threshold with the model; {model_dir} is not a local "
                          "model directory")
    try:
        update_meta(model_dir, META_KEY, calibration)
    except OSError as exc:
        raise ModelError(f"{model_dir}: cannot save the no-answer threshold ({exc.strerror or exc}); check that "
                         "the model directory is writable") from None


def score_predictions(predictions: str | Path, data: str | Path, *, data_config: DataConfig | None = None,
                      metric: str | None = None, no_answer_probs: str | Path | None = None,
                      no_answer_threshold: float = 1.0, max_examples: int | None = None) -> Any:
    """Score a predictions file (id -> answer, or t5qa's rows) against `data` with an official scorer; returns
    `evaluate.EvalResult`. `no_answer_probs` (the SQuAD v2.0 script's --na-prob-file) implies squad_v2."""
    from t5qa.evaluate import evaluate_predictions, read_no_answer_probs, read_predictions

    if no_answer_probs is not None and metric not in (None, "squad_v2"):
        raise ConfigError("--no-answer-probs goes with the squad_v2 metric")
    examples = _evaluation_examples(data, data_config, max_examples, need_inputs=False)
    probs = read_no_answer_probs(no_answer_probs) if no_answer_probs is not None else None
    return evaluate_predictions(read_predictions(predictions), examples,
                                metric="squad_v2" if probs is not None else metric, no_answer_probs=probs,
                                no_answer_threshold=no_answer_threshold)


def _evaluation_examples(data: str | Path, data_config: DataConfig | None, max_examples: int | None,
                         *, need_inputs: bool) -> list[Any]:
    from t5qa.data import load_for_evaluation

    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"--max-examples must be at least 1, got {max_examples}")
    examples = load_for_evaluation(str(data), data_config or DataConfig(), need_inputs=need_inputs)
    return examples[:max_examples] if max_examples else examples


@dataclass
class PredictFileResult:
    """What `predict_file` wrote."""

    output: Path
    questions: int
    seconds: float
    windows: int
    padding_fraction: float
    backend: str

    @property
    def questions_per_second(self) -> float | None:
        return round(self.questions / self.seconds, 2) if self.seconds else None


def predict_file(model_dir: str | Path | Any, data: str | Path, output: str | Path, *,
                 data_config: DataConfig | None = None, progress: bool = False,
                 shard_size: int | None = None, model_identity: str | Path | None = None,
                 **predictor_settings: Any) -> PredictFileResult:
    """Answer every question of `data`, in input order, into `output` (.jsonl or .csv/.tsv rows with id, question,
    prediction, score and window; .json as the SQuAD predictions format id -> answer).

    The questions are answered in shards of `shard_size` (t5qa.shards), kept in OUTPUT.shards/ until the output
    is written: under `accelerate launch` (or torchrun) the processes share them, and after a crash the same call
    answers only the shards that are not done. `model_dir` is a model directory or a loaded Predictor (then
    `model_identity`, its directory, makes the shards of another model's job refuse to mix in);
    `predictor_settings` go to `load_predictor`. Every process returns the same counts of questions; windows,
    padding and seconds are this process's."""
    from t5qa.data import load_examples, require_inputs
    from t5qa.shards import DEFAULT_SHARD_SIZE, ShardedJob, processes, run_shards, shards_dir

    output = Path(output)
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {output}: unknown extension; use one of {', '.join(OUTPUT_FORMATS)}")
    # No cleaning: every input row gets an answer, in input order. Answers are not needed to answer.
    examples = load_examples(str(data), data_config or DataConfig(), require_answers=False)
    if not examples:
        raise DataError(f"{data}: no questions found; check the file and --format")
    require_inputs(examples)
    procs = processes()
    if hasattr(model_dir, "answer_many"):
        predictor = model_dir
    else:
        predictor = load_predictor(model_dir, device=procs.device if procs.world > 1 else None,
                                   **predictor_settings)
    job = ShardedJob(shards_dir(output), total=len(examples), shard_size=shard_size or DEFAULT_SHARD_SIZE,
                     procs=procs, fingerprint=_answering_job(predictor, model_identity or model_dir, data))
    single = job.count == 1 and procs.world == 1  # one shard: the Predictor's own progress bar
    bar = _shard_bar(len(examples), enabled=progress and procs.is_main and not single)

    def answer(start: int, end: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        part = examples[start:end]
        answers = predictor.answer_many([(ex.context, ex.question) for ex in part], progress=progress and single)
        return [{"id": _valid_text(ex.id), "question": _valid_text(ex.question), "prediction": a.text,
                 "score": round(a.score, 6), "window": a.window_index, "num_windows": a.num_windows}
                for ex, a in zip(part, answers)], {}

    started = time.perf_counter()
    try:
        run_shards(job, answer, on_shard=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    if procs.is_main:
        write_answer_rows(list(job.rows()), output)
        job.remove()
    procs.wait_for_everyone()
    stats = predictor.stats
    return PredictFileResult(output=output, questions=len(examples), seconds=round(seconds, 3),
                             windows=stats.windows, padding_fraction=round(stats.padding_fraction, 4),
                             backend=predictor.backend)


def _answering_job(predictor: Any, model: Any, data: str | Path) -> dict[str, Any]:
    """What makes the shards of one answering job the same job: the data's content, the model's files, and the
    settings answers depend on (compared with the manifest when a job resumes)."""
    from t5qa.shards import file_sha256

    data_path = Path(str(data))
    data_id = file_sha256(data_path) if data_path.is_file() else _listing(data_path)
    settings = getattr(predictor, "generate_settings", None)
    encode = getattr(predictor, "encode_config", None)
    return {
        "data": str(data_path.resolve()) if data_path.exists() else str(data),
        "data_sha256": data_id,
        "model": _listing(Path(model)) if isinstance(model, (str, Path)) else type(model).__name__,
        "backend": getattr(predictor, "backend", None),
        "generate": dataclasses.asdict(settings()) if callable(settings) else None,
        "encode": dataclasses.asdict(encode) if dataclasses.is_dataclass(encode) else None,
    }


def _listing(path: Path) -> Any:
    """A directory as its files' names, sizes and modification times (a model's weights are not hashed whole)."""
    if not path.is_dir():
        return str(path)
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*") if p.is_file())


def _shard_bar(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="q", desc="answering", dynamic_ncols=True)


def write_answer_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write answer rows in the format of `path`'s extension (OUTPUT_FORMATS)."""
    fmt = OUTPUT_FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("w", encoding="utf-8", newline="") as handle:
            if fmt == "jsonl":
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            elif fmt == "json":  # the official SQuAD predictions format: id -> answer
                json.dump({row["id"]: row["prediction"] for row in rows}, handle, ensure_ascii=False, indent=1)
            else:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
                writer.writeheader()
                writer.writerows(rows)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the answers ({exc.strerror}); check --output") from None


def _valid_text(text: str) -> str:
    """Lone UTF-16 surrogates (from JSON escapes) replaced with U+FFFD, so the row can be written as UTF-8."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)
