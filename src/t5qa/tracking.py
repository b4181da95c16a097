"""Experiment trackers (`--report-to tensorboard,wandb,mlflow,comet,none`) through Accelerate's tracker API.

Accelerate owns the trackers (its `log_with`, `init_trackers`, `log` and the trackers' own `log_images`,
`log_artifact` and `finish`); this module only says which ones a run asked for, checks that their packages are
installed before any work starts, hands them the run's config, its metrics rows and, at the end, the report's
plots and files. `metrics.jsonl` (rundir.MetricsLog) is written whatever the trackers are: it is the run's own
record, which the report, `tune` and resume read.

A resumed run continues the same MLflow run (its id is kept in `trackers.json` in the run directory) and
TensorBoard drops the events after the checkpoint's step, as metrics.jsonl does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from t5qa.errors import ConfigError
from t5qa.rundir import BREAKDOWN_PLOT, PLOT_FILES, SUMMARY_FILE, TENSORBOARD_DIR

logger = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"
"""The trackers' run ids ({"mlflow_run_id": ...}), read back on resume."""

# --report-to name -> (Accelerate's tracker name, the package to install, how to set it up)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard", "view with: tensorboard --logdir RUN/tensorboard"),
    "wandb": ("wandb", "wandb", "then `wandb login`, or WANDB_MODE=offline"),
    "mlflow": ("mlflow", "mlflow-skinny", "the store is MLflow's own (MLFLOW_TRACKING_URI; default ./mlflow.db)"),
    "comet": ("comet_ml", "comet-ml", "with COMET_API_KEY set, or COMET_MODE=offline"),
}
NONE = "none"


def check_report_to(names: tuple[str, ...]) -> tuple[str, ...]:
    """The trackers named by --report-to, each once, in the order given; "none" alone means no tracker.

    Raises:
        ConfigError: an unknown name, "none" with others, or a tracker whose package is not installed.
    """
    wanted = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in wanted if name not in TRACKERS and name != NONE]
    if unknown:
        raise ConfigError(f"--report-to: unknown tracker {', '.join(unknown)}; choose from "
                          f"{', '.join((*TRACKERS, NONE))} (comma-separated)")
    if NONE in wanted:
        if len(wanted) > 1:
            raise ConfigError("--report-to none cannot be combined with other trackers; give one or the other")
        return ()
    from accelerate.utils import is_comet_ml_available, is_mlflow_available, is_tensorboard_available, \
        is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "mlflow": is_mlflow_available, "comet": is_comet_ml_available}
    for name in wanted:
        if not available[name]():
            _, package, setup = TRACKERS[name]
            raise ConfigError(f"--report-to {name}: the {package} package is not installed; "
                              f"pip install {package} ({setup}), or leave {name} out of --report-to")
    return wanted


def accelerate_names(names: tuple[str, ...]) -> list[str] | None:
    """Accelerate's `log_with` for the trackers `check_report_to` returned (None: no tracker)."""
    return [TRACKERS[name][0] for name in names] or None


def logging_dir(output_dir: Path) -> Path:
    """Where the trackers that write files keep them (TensorBoard: RUN/tensorboard/PROJECT)."""
    return output_dir / TENSORBOARD_DIR


def flat_config(obj: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config dataclass as one level of scalars ({"encode.max_source_length": 512, ...}), as trackers take it.

    Nested settings are joined with dots, tuples with commas, and None is written "None".
    """
    flat: dict[str, bool | int | float | str] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flat_config(value, prefix=f"{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif isinstance(value, (tuple, list)):
            flat[key] = ",".join(str(v) for v in value)
        else:
            flat[key] = str(value)
    return flat


class Trackers:
    """The trackers of one training run, started on an Accelerator made with `log_with=accelerate_names(...)`."""

    def __init__(self, accelerator: Any, names: tuple[str, ...], output_dir: Path) -> None:
        self.accelerator = accelerator
        self.names = names
        self.output_dir = output_dir
        self.started = False

    def start(self, project: str, config: Any, *, resume_step: int | None) -> None:
        """init_trackers with the run's config; a resumed run continues its MLflow run and TensorBoard log.

        Raises:
            ConfigError: a tracker could not start (not logged in, an unreachable server, ...): one line.
        """
        if not self.names:
            return
        ids = _read_ids(self.output_dir) if resume_step is not None else {}
        init_kwargs: dict[str, dict[str, Any]] = {
            "tensorboard": {} if resume_step is None else {"purge_step": resume_step},
            "mlflow": {"run_name": self.output_dir.name, "run_id": ids.get("mlflow_run_id")},
            "wandb": {"name": self.output_dir.name, "dir": str(self.output_dir)},
        }
        # The config is logged when the run starts; a resumed run's trackers have it already (MLflow refuses a
        # parameter logged twice with another value, such as resume itself).
        values = flat_config(config) if resume_step is None else None
        try:
            self.accelerator.init_trackers(project, config=values, init_kwargs=init_kwargs)
        except ConfigError:
            raise
        except Exception as exc:  # the trackers' own errors are many and library-specific
            self._finish_started()
            raise ConfigError(f"--report-to {','.join(self.names)}: a tracker could not start "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"fix its setup or leave it out of --report-to") from None
        self.started = True
        if self.accelerator.is_main_process and "mlflow" in self.names:
            run = self.accelerator.get_tracker("mlflow", unwrap=True)
            _write_ids(self.output_dir, {"mlflow_run_id": run.info.run_id})

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row ({"step", "epoch", "split", numbers...}) as "split/name" scalars at its step."""
        if not self.started:
            return
        values = {f"{row['split']}/{key}": value for key, value in row.items()
                  if key not in ("step", "epoch", "split") and isinstance(value, (int, float))
                  and not isinstance(value, bool)}
        values[f"{row['split']}/epoch"] = row.get("epoch", 0.0)
        self.accelerator.log(values, step=int(row["step"]))

    def log_files(self, report: Path, step: int) -> None:
        """The report's plots (images in TensorBoard and W&B, artifacts in MLflow and Comet), report and summary.

        A tracker that fails here costs a warning line, not the finished run.
        """
        if not self.started or not self.accelerator.is_main_process:
            return
        plots = [self.output_dir / name for name in (*PLOT_FILES, BREAKDOWN_PLOT)
                 if (self.output_dir / name).is_file()]
        files = plots + [path for path in (report, self.output_dir / SUMMARY_FILE) if path.is_file()]
        for tracker in self.accelerator.trackers:
            try:
                _log_files(tracker, plots, files, step)
            except Exception as exc:  # a tracker's upload failing must not lose the run on disk
                logger.warning("%s: could not log the report's files (%s: %s); they are in %s", tracker.name,
                               type(exc).__name__, exc, self.output_dir)

    def finish(self) -> None:
        """End every tracker's run (Accelerate's end_training would also end the distributed process group)."""
        if self.started:
            self._finish_started()
            self.started = False

    def _finish_started(self) -> None:
        for tracker in list(self.accelerator.trackers):
            try:
                tracker.finish()
            except Exception as exc:  # finishing one must not keep the others open
                logger.warning("%s: could not finish its run (%s)", tracker.name, exc)
        self.accelerator.trackers = []


def _log_files(tracker: Any, plots: list[Path], files: list[Path], step: int) -> None:
    name = tracker.name
    if name in ("tensorboard", "wandb"):
        import matplotlib.image

        images = {f"plots/{path.stem}": matplotlib.image.imread(str(path))[..., :3] for path in plots}
        if name == "tensorboard":
            for key, image in images.items():
                tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
        elif images:
            tracker.log_images({key: [image] for key, image in images.items()}, step=step)
    elif name == "mlflow":
        for path in files:
            tracker.log_artifact(str(path), artifact_path="report")
    elif name == "comet_ml":
        experiment = tracker.tracker
        for path in plots:
            experiment.log_image(str(path), name=path.stem, step=step)
        for path in files:
            if path not in plots:
                experiment.log_asset(str(path))


def _read_ids(output_dir: Path) -> dict[str, Any]:
    try:
        ids = json.loads((output_dir / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _write_ids(output_dir: Path, ids: dict[str, Any]) -> None:
    (output_dir / TRACKERS_FILE).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
