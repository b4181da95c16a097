"""Hyperparameter search over `train.fit` with Optuna.

Each trial is a normal training run in `OUTPUT/trial-NNNN/` (config.yaml, metrics.jsonl, best/, report). The
objective is the best validation metric of the run (F1 of generated answers by default). After every evaluation
the trial reports its metric; the median pruner stops a trial that is worse than the median of earlier trials at
the same evaluation (training ends cleanly through `train.StopTraining`, and the trial is recorded as PRUNED).

Trials live in an Optuna storage: `sqlite:///OUTPUT/study.db` by default, or any SQLAlchemy database URL, so
that running the same command again continues the study, and several machines can work on one study at once.
A search is done when COMPLETE + PRUNED trials reach `trials`; every worker runs trials until then. A trial whose
process was killed stops sending heartbeats; after `grace_period_s` it is marked FAIL and re-queued with the
same parameters.

Results written to OUTPUT: trials.csv, best_config.yaml (ready for `t5qa train --config`), and PNG plots
(optimization_history.png, intermediate_values.png, param_importances.png when it can be computed).

The space is the `search:` section of the config file, one entry per TrainConfig setting:

    search:
      learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}   # a range (log-uniform with log: true)
      train_batch_size: [8, 16, 32]                            # choices
      epochs: {low: 1, high: 5}                                # integer bounds: whole epochs
      model: [models/small, models/base, tiny]                 # model dirs / Hub names, or presets (below)

A `model` choice that names a modeling.PRESETS architecture (and is not a directory) is initialised from scratch in
OUTPUT/models/<preset>/ with the base model's tokenizer, so model size can be searched when training from scratch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from t5qa.config import TrainConfig, TuneConfig, from_dict, load_yaml, to_dict
from t5qa.errors import ConfigError, TrainingError, require
from t5qa.modeling import PRESETS, init_model

logger = logging.getLogger(__name__)

# The default search space: the settings that matter most when fine-tuning T5 for QA.
DEFAULT_SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True},
    "train_batch_size": [8, 16, 32],
    "epochs": {"low": 1, "high": 5},
    "warmup_ratio": {"low": 0.0, "high": 0.1},
    "weight_decay": {"low": 0.0, "high": 0.1},
}

# TrainConfig fields that a trial may not change: the data, the run directory and the objective are the search's.
_NOT_SEARCHABLE = frozenset({"train", "validation", "output", "resume", "metric_for_best"})
_TRIAL_DIR = re.compile(r"^trial-(\d+)$")
_SURPLUS_ATTR = "t5qa_surplus"
# Consecutive failed trials (diverged training) after which the search stops instead of burning more trials.
MAX_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: a list of choices, or a numeric range [low, high] (log-uniform when `log`)."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False


@dataclass
class SearchResult:
    """What a search produced. `best_*` are None when no trial has completed yet."""

    study_name: str
    storage: str
    best_trial: int | None
    best_params: dict[str, Any] | None
    best_value: float | None
    best_config_path: Path | None
    best_run_dir: Path | None
    table_path: Path
    plot_paths: list[Path]
    n_complete: int
    n_pruned: int
    n_failed: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The rows of trials.csv (number, state, value, duration_s, evaluations, params..., error, run_dir)."""


def searchable_fields() -> dict[str, Any]:
    """Name -> annotation of every scalar TrainConfig setting a search may vary (nested configs flattened)."""
    import typing

    def walk(cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out.update(walk(hints[f.name]))
            elif f.name not in _NOT_SEARCHABLE:
                out[f.name] = hints[f.name]
        return out

    return walk(TrainConfig)


def _number(value: Any, where: str, problems: list[str]) -> float | int | None:
    # YAML 1.1 reads 1e-4 (no dot) as a string, so numbers given as text are accepted.
    if isinstance(value, bool):
        problems.append(f"{where} must be a number, got {value!r}")
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        number = float(str(value))
    except ValueError:
        problems.append(f"{where} must be a number, got {value!r}")
        return None
    return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", str(value).strip()) else number


def parse_space(raw: dict[str, Any] | None, *, source: str = "search") -> list[SearchParam]:
    """Check a search space and turn it into SearchParams; every problem is reported at once.

    Each key is a TrainConfig setting. A list is a set of choices (`train_batch_size: [8, 16, 32]`,
    `model: [dir-small, dir-base]`); a mapping is a range `{low, high}` with optional `log: true`, `step` and
    `type: int|float` (integer bounds give an integer range).

    Raises:
        ConfigError: unknown settings, empty choices, bad bounds; each named with `source`.
    """
    if raw is None:
        raw = DEFAULT_SPACE
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: the search space must be a non-empty mapping of setting: choices or range")
    allowed = searchable_fields()
    problems: list[str] = []
    params: list[SearchParam] = []
    for name, spec in raw.items():
        key = str(name).replace("-", "_")
        where = f"{source}.{name}"
        if key not in allowed:
            why = "is fixed by the search" if key in _NOT_SEARCHABLE else "is not a TrainConfig setting"
            problems.append(f"{where} {why}; searchable settings include learning_rate, train_batch_size, epochs, "
                            f"warmup_ratio, weight_decay, model")
            continue
        if isinstance(spec, (list, tuple)):
            if not spec:
                problems.append(f"{where}: the list of choices is empty")
            elif not all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
                problems.append(f"{where}: choices must be numbers, strings or booleans")
            else:
                params.append(SearchParam(key, choices=tuple(spec)))
            continue
        if not isinstance(spec, dict):
            problems.append(f"{where}: give a list of choices or a range {{low: ..., high: ...}}, got {spec!r}; "
                            f"fixed values belong outside the search: section")
            continue
        unknown = sorted(set(spec) - {"low", "high", "log", "step", "type"})
        if unknown or "low" not in spec or "high" not in spec:
            problems.append(f"{where}: a range needs low and high (optional log, step, type), got keys "
                            f"{', '.join(map(str, spec))}")
            continue
        low = _number(spec["low"], f"{where}.low", problems)
        high = _number(spec["high"], f"{where}.high", problems)
        step = _number(spec["step"], f"{where}.step", problems) if spec.get("step") is not None else None
        kind = spec.get("type")
        if kind not in (None, "int", "float"):
            problems.append(f"{where}.type must be int or float, got {kind!r}")
            continue
        if low is None or high is None:
            continue
        # Integer bounds give an integer range for integer settings, and for epochs (whole passes over the
        # data); a float setting such as warmup_ratio {low: 0, high: 1} stays continuous.
        whole_bounds = isinstance(low, int) and isinstance(high, int)
        integer = kind == "int" or (kind is None and whole_bounds
                                    and (str(allowed[key]).startswith("int") or key == "epochs"))
        log = bool(spec.get("log", False))
        if not low < high:
            problems.append(f"{where}: low must be below high, got {low} and {high}")
        elif log and low <= 0:
            problems.append(f"{where}: a log range needs low > 0, got {low}")
        elif log and step is not None:
            problems.append(f"{where}: log and step cannot be combined")
        else:
            params.append(SearchParam(key, low=low, high=high, log=log, step=step, integer=integer))
    if problems:
        raise ConfigError("; ".join(problems))
    return params


def load_search_config(path: str | os.PathLike | None, **overrides: Any) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Read a search YAML: the `search:` section is the space, every other key is the base TrainConfig.

    Overrides (CLI flags) win over the file; None values are ignored.

    Returns:
        (base TrainConfig, the raw space or None when the file has no search section).
    """
    values: dict[str, Any] = load_yaml(path) if path else {}
    space = values.pop("search", None)
    if space is not None:
        parse_space(space, source=f"{path}: search")  # report the space's problems with the file's name
    values.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    return from_dict(TrainConfig, values, source=str(path) if path else "flags"), space


def _suggest(trial: Any, p: SearchParam) -> Any:
    if p.choices is not None:
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.integer:
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)


def _with_preset_model(params: dict[str, Any], base: TrainConfig, output: Path) -> dict[str, Any]:
    """Replace a model preset name (e.g. "tiny", "t5-small" when no such directory exists) by a model of that
    architecture initialised in OUTPUT/models/<preset>/ with the base model's tokenizer, to search model size
    when training from scratch."""
    name = params.get("model")
    if not isinstance(name, str) or name not in PRESETS or os.path.isdir(name):
        return params
    model_dir = output / "models" / name
    if not (model_dir / "model.safetensors").is_file():
        # Workers initialising the same preset at once write identical models (same seed); the write is atomic.
        init_model(name, base.model, model_dir, seed=base.seed)
    return {**params, "model": str(model_dir)}


def _trial_config(base: TrainConfig, params: dict[str, Any], run_dir: Path, metric: str) -> TrainConfig:
    values = to_dict(base)
    values.update(params)
    # A trial is never resumed (a killed trial is re-run from the start), so resumable checkpoints would only
    # cost time and disk; best/ and last/ are still written.
    values.update(output=str(run_dir), metric_for_best=metric, resume=False, save_every_steps=10**9)
    return from_dict(TrainConfig, values, source="search trial")


def _make_storage(optuna: Any, url: str, heartbeat_interval_s: int, grace_period_s: int) -> Any:
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several workers share one SQLite file; wait for the write lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
        import sqlalchemy.exc

        last_error: Exception | None = None
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval_s,
                    grace_period=grace_period_s, heartbeat_stale_trial_callback=retry)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                # Workers opening a new database at once race to create its tables (the loser gets "table
                # exists" or a UNIQUE failure); a second try finds them made. Unreachable servers fail each try.
                last_error = exc
                time.sleep(0.5 + attempt)
            except (ImportError, ValueError) as exc:
                raise ConfigError(f"--storage {url}: cannot open the study database ({exc}); check the URL and "
                                  f"that its database driver is installed") from None
        first_line = str(last_error).splitlines()[0] if last_error else ""
        raise ConfigError(f"--storage {url}: cannot open the study database ({first_line})")


def _check_trial_dirs(output: Path, study: Any) -> None:
    numbers = {t.number for t in study.get_trials(deepcopy=False)}
    strays = sorted(p.name for p in output.glob("trial-*") if (m := _TRIAL_DIR.match(p.name))
                    and int(m.group(1)) not in numbers)
    if strays:
        raise ConfigError(
            f"{output}: holds {', '.join(strays[:3])}{'...' if len(strays) > 3 else ''} from another study "
            f"(not in this study's database); use a new --output, the same --storage/--study-name as before, "
            f"or delete those directories"
        )


def run_search(base: TrainConfig, config: TuneConfig | None = None, *, space: dict[str, Any] | None = None,
               train_fn: Callable[..., Any] | None = None, **settings: Any) -> SearchResult:
    """Run (or continue) a hyperparameter search until `config.trials` trials are COMPLETE or PRUNED.

    Args:
        base: the training config every trial starts from (data, model, max_steps, ...).
        config: how to search (TuneConfig: trials, output, storage, metric_for_best, study name, heartbeat and
            pruner settings); `settings` are TuneConfig fields that build or override it.
        space: raw search space (see parse_space); None uses DEFAULT_SPACE.
        train_fn: the training function, `fit(cfg, on_evaluate=...)`; default t5qa.api.train.
    Returns:
        SearchResult (the files it names are written to the output directory).
    Raises:
        ConfigError: bad metric, trial count, space or storage; TrainingError from a trial.
    """
    config = dataclasses.replace(config, **settings) if config is not None else TuneConfig(**settings)
    trials, metric, study_name = config.trials, config.metric_for_best, config.study_name
    heartbeat_interval_s, grace_period_s = config.heartbeat_interval_s, config.grace_period_s
    pruner_startup_trials, pruner_warmup_evaluations = config.pruner_startup_trials, config.pruner_warmup_evaluations
    optuna = require("optuna", "tune", "Hyperparameter search")
    from optuna.trial import TrialState

    params_space = parse_space(_space_for(base, space))
    output = Path(str(config.output))
    output.mkdir(parents=True, exist_ok=True)
    url = config.storage or f"sqlite:///{output.resolve() / 'study.db'}"
    if train_fn is None:
        from t5qa.api import train as train_fn
    from t5qa.train import StopTraining, TrainingInterrupted

    rdb = _make_storage(optuna, url, heartbeat_interval_s, grace_period_s)
    direction = "minimize" if metric == "loss" else "maximize"
    study = optuna.create_study(storage=rdb, study_name=study_name, direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study '{study_name}' in {url} was created to {study.direction.name.lower()} its "
                          f"metric; --metric-for-best {metric} needs {direction}: use another --study-name")
    _check_trial_dirs(output, study)
    # A seed per (base seed, study size) keeps a single-worker search reproducible and makes a resumed search
    # draw new points instead of repeating the first ones.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                               n_warmup_steps=pruner_warmup_evaluations + 1)
    counted = (TrialState.COMPLETE, TrialState.PRUNED)

    class _Surplus(Exception):
        """Another worker's trial already fills the last slot; this one is dropped before training."""

    class _TrialFailed(Exception):
        """The trial's training failed (TrainingError); the search goes on."""

    def objective(trial: Any) -> float:
        earlier = [t for t in study.get_trials(deepcopy=False, states=counted + (TrialState.RUNNING,))
                   if t.number < trial.number and not t.user_attrs.get(_SURPLUS_ATTR)]
        if len(earlier) >= trials:
            trial.set_user_attr(_SURPLUS_ATTR, True)
            raise _Surplus()
        params = {p.name: _suggest(trial, p) for p in params_space}
        run_dir = output / f"trial-{trial.number:04d}"
        cfg = _trial_config(base, _with_preset_model(params, base, output), run_dir, metric)
        trial.set_user_attr("run_dir", str(run_dir))
        # What best_config.yaml will hold: the trial's settings with the user's own checkpoint cadence.
        trial.set_user_attr("config", to_dict(dataclasses.replace(cfg, save_every_steps=base.save_every_steps)))
        evaluations = 0
        pruned_at: int | None = None

        def on_evaluate(step: int, metrics: dict[str, Any]) -> None:
            nonlocal evaluations, pruned_at
            evaluations += 1
            value = metrics.get(metric)
            if value is None or not math.isfinite(float(value)):
                raise ConfigError(f"trial {trial.number}: the evaluation at step {step} gave no finite "
                                  f"'{metric}' (got keys {', '.join(sorted(metrics))}); check --metric-for-best")
            # The evaluation index, not the optimizer step, is the pruning step: trials with different batch
            # sizes reach different step counts, but their k-th evaluations are comparable points in training.
            trial.report(float(value), evaluations)
            if trial.should_prune():
                pruned_at = step
                raise StopTraining(f"pruned by the median rule at evaluation {evaluations} (step {step})")

        logger.info("trial %d: %s", trial.number, ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        try:
            result = train_fn(cfg, on_evaluate=on_evaluate)
        except TrainingInterrupted:
            raise TrainingInterrupted(
                f"search interrupted during trial {trial.number} (recorded as failed); run the same t5qa tune "
                f"command again to continue the study") from None
        except TrainingError as exc:
            # A diverging trial (non-finite loss, e.g. from too high a learning rate) is a result of the search,
            # not a reason to stop it: record it as failed and go on.
            message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
            trial.set_user_attr("error", message)
            last_failure.append(message)
            raise _TrialFailed(message) from exc
        trial.set_user_attr("steps", int(getattr(result, "steps", 0) or 0))
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned_at}")
        best = getattr(result, "best_metric", None)
        if best is None or not math.isfinite(float(best)):
            raise ConfigError(f"trial {trial.number} ({run_dir}) finished without a validation '{metric}'; "
                              f"the search needs validation data and at least one evaluation")
        return float(best)

    failures_in_a_row = 0
    last_failure: list[str] = []  # the objective's failure message in the current optimize call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            current = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(_SURPLUS_ATTR)]
            done = sum(t.state in counted for t in current)
            running = sum(t.state == TrialState.RUNNING for t in current)
            if done >= trials:
                break
            if done + running >= trials:
                # The remaining slots belong to trials running elsewhere (or to a killed run's trials, which
                # are failed and re-queued once their heartbeat is grace_period_s old): wait for them.
                logger.info("waiting for %d running trial(s) to finish", running)
                time.sleep(min(heartbeat_interval_s, 5))
                optuna.storages.fail_stale_trials(study)
                continue
            last_failure.clear()
            study.optimize(objective, n_trials=1, catch=(_Surplus, _TrialFailed))
            failures_in_a_row = failures_in_a_row + 1 if last_failure else 0
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise TrainingError(
                    f"{failures_in_a_row} trials in a row failed, the last with: {last_failure[0]}; narrow the "
                    f"search space (e.g. lower learning_rate.high) and run the command again")
    return summarize(study, output, metric=metric, storage=url)


def _space_for(base: TrainConfig, space: dict[str, Any] | None) -> dict[str, Any]:
    if space is not None:
        if base.max_steps is not None and "epochs" in space:
            logger.warning("search.epochs has no effect: max_steps=%d fixes the length of every trial",
                           base.max_steps)
        return space
    if base.max_steps is not None:
        # max_steps overrides epochs, so searching epochs would only add noise to the importances.
        return {k: v for k, v in DEFAULT_SPACE.items() if k != "epochs"}
    return DEFAULT_SPACE


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _atomic_write(path: Path, data: bytes) -> None:
    # Workers finishing together may write the results at once; readers never see half a file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summarize(study: Any, output: str | os.PathLike, *, metric: str = "f1", storage: str = "") -> SearchResult:
    """Write trials.csv, best_config.yaml and the plots for a study; return the SearchResult."""
    from optuna.trial import TrialState

    output = Path(output)
    shown = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(_SURPLUS_ATTR)]
    param_names = sorted({name for t in shown for name in t.params})
    rows = []
    for t in shown:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state == TrialState.COMPLETE else (
                t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
            "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
            "evaluations": len(t.intermediate_values),
        }
        row.update({name: t.params.get(name) for name in param_names})
        row["error"] = t.user_attrs.get("error", "") if t.state == TrialState.FAIL else ""
        row["run_dir"] = t.user_attrs.get("run_dir", "")
        rows.append(row)
    table_path = output / "trials.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["number", "state", "value", "duration_s", "evaluations",
                                                *param_names, "error", "run_dir"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(table_path, buffer.getvalue().encode("utf-8"))

    complete = [t for t in shown if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        best = study.best_trial
    best_config_path = None
    if best is not None:
        best_config_path = output / "best_config.yaml"
        _write_best_config(best, best_config_path, output, metric, study.study_name)
    plots = make_plots(study, output, metric=metric)
    return SearchResult(
        study_name=study.study_name,
        storage=storage,
        best_trial=best.number if best else None,
        best_params=dict(best.params) if best else None,
        best_value=best.value if best else None,
        best_config_path=best_config_path,
        best_run_dir=Path(best.user_attrs["run_dir"]) if best and "run_dir" in best.user_attrs else None,
        table_path=table_path,
        plot_paths=plots,
        n_complete=len(complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in shown),
        n_failed=sum(t.state == TrialState.FAIL for t in shown),
        rows=rows,
    )


def _write_best_config(best: Any, path: Path, output: Path, metric: str, study_name: str) -> None:
    import yaml

    # The trial's resolved config already holds its parameters (and a preset's model directory).
    values = dict(best.user_attrs.get("config") or best.params)
    # A fresh run directory, so `t5qa train --config best_config.yaml` never overwrites the trial's run.
    values["output"] = str(output / "best-run")
    cfg = from_dict(TrainConfig, values, source=f"trial {best.number}")
    header = (f"# Best configuration of study '{study_name}': trial {best.number}, validation {metric} = "
              f"{best.value:.4f}\n# Train with: t5qa train --config {path}\n")
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    _atomic_write(path, (header + text).encode("utf-8"))


def make_plots(study: Any, output: str | os.PathLike, *, metric: str = "f1") -> list[Path]:
    """optimization_history.png, intermediate_values.png and, with enough trials, param_importances.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    output = Path(output)
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(_SURPLUS_ATTR)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    maximize = study.direction.name == "MAXIMIZE"
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = output / name
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        _atomic_write(path, buffer.getvalue())
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="C0")
        best_so_far, best = [], None
        for t in sorted(complete, key=lambda t: t.number):
            best = t.value if best is None else (max(best, t.value) if maximize else min(best, t.value))
            best_so_far.append((t.number, best))
        ax.step(*zip(*best_so_far), where="post", color="C1", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", color="C3", label="pruned (last evaluation)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Optimisation history")
    if complete or pruned:
        ax.legend()
    save(fig, "optimization_history.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], marker="o",
                    linestyle="--" if t.state == TrialState.PRUNED else "-", label=f"trial {t.number}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("evaluation")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Validation metric per evaluation (dashed: pruned)")
    if len(trials) <= 12 and any(t.intermediate_values for t in trials):
        ax.legend(fontsize="small")
    save(fig, "intermediate_values.png")

    importances = param_importances(study)
    if importances:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="C2")
        ax.set_xlabel(f"importance for validation {metric}")
        ax.set_title("Hyperparameter importances")
        save(fig, "param_importances.png")
    return paths


def param_importances(study: Any) -> dict[str, float]:
    """Parameter importances (Optuna's default evaluator).

    Returns {} when fewer than 2 trials completed, when they all have the same value, or when the evaluator fails.
    """
    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(complete) < 2:
        logger.info("parameter importances need at least 2 completed trials (have %d); skipped", len(complete))
        return {}
    if len({t.value for t in complete}) < 2:
        # Every trial scored the same: any split of "importance" would be an artefact of the evaluator.
        logger.info("parameter importances skipped: every completed trial has the same value")
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError, IndexError) as exc:
        logger.info("parameter importances could not be computed (%s); skipped", exc)
        return {}
