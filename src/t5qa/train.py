"""Training: `setup()` loads everything and encodes once, then `fit()` runs one explicit Accelerate loop.

Vocabulary (see config.py): a *micro-batch* is one forward/backward pass of `train_batch_size` examples on
one process; a *step* is one optimizer step, i.e. `gradient_accumulation_steps` micro-batches on every
process. Effective batch size = train_batch_size x gradient_accumulation_steps x processes.

The same code runs on one CPU, one GPU, or under `accelerate launch -m t5qa train ...` (DDP, FSDP, DeepSpeed):
Accelerate owns devices, precision, gradient accumulation and gradient synchronisation; the loop below is ours.

The run directory's files are named in `t5qa.rundir`; checkpoints are written by `t5qa.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from t5qa.checkpoint import (check_output_dir, complete_checkpoints, latest_good_checkpoint, load_checkpoint,
                             save_checkpoint, write_error)
from t5qa.config import GenerateConfig, TrainConfig, save_yaml, to_dict
from t5qa.data import QAExample, load_dataset, split_examples
from t5qa.evaluate import choose_metric_for
from t5qa.encode import (EncodeStats, LengthGroupedSampler, answer_length_p99, encode_for_training, feature_lengths,
                         make_collator)
from t5qa.encode_cache import encode_cached, prepared_key, read_prepared, should_cache, write_prepared
from t5qa.stream import StreamedBatches
from t5qa.errors import ConfigError, ModelError, TrainingError
from t5qa import fastpath
from t5qa.lora import apply_lora, is_lora_model, save_adapter
from t5qa.modeling import check_precision, count_parameters, freeze, load_model, save_model
from t5qa.optim import make_optimizer, make_scheduler
from t5qa.modelcard import write_model_card
from t5qa.tracking import Trackers, accelerate_names, check_report_to, logging_dir
from t5qa.rundir import (BEST_DIR, CONFIG_FILE, LAST_DIR, PREDICTIONS_FILE, RUN_SUMMARY_FILE, SUMMARY_FILE, MetricsLog,
                         write_json)

logger = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by an `on_evaluate` callback to end the run cleanly (e.g. an Optuna pruner)."""


class TrainingInterrupted(TrainingError):
    """The run was stopped by Ctrl-C or SIGTERM after writing a checkpoint; the message says how to resume."""

    exit_code = 130


@dataclass
class TrainResult:
    """What `fit` produced."""

    output_dir: Path
    best_dir: Path
    last_dir: Path
    best_metric: float | None
    final_metrics: dict[str, Any]
    steps: int
    stopped_early: bool


@dataclass
class TrainerState:
    """Everything besides model/optimizer/scheduler/RNG that an exact resume needs (saved as JSON)."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based); the sampler's order depends on it."""
    micro_batches_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed on each process (skipped on resume)."""
    samples_seen: int = 0
    """Training examples seen, summed over processes."""
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_eval_step: int | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    """Wall seconds in training steps (evaluation and checkpoint saving not counted)."""
    eval_seconds: float = 0.0
    """Wall seconds in evaluation (answering the validation questions included)."""
    stopped_early: bool = False


@dataclass
class TrainingRun:
    """Everything `setup` prepared: the model, data and optimisation objects, ready for the loop."""

    cfg: TrainConfig
    accelerator: Any
    model: Any                      # prepared by Accelerate (possibly DDP/FSDP-wrapped)
    tokenizer: Any
    optimizer: Any
    scheduler: Any                  # stepped once per optimizer step, by us
    train_loader: Any
    sampler: LengthGroupedSampler | None  # None: a stream, which groups its own batches
    train_examples: int | None
    """How many training examples (None: a stream). The examples themselves are not kept: their features are."""
    validation_examples: list[QAExample]
    encode_stats: EncodeStats
    generate: GenerateConfig        # cfg.generate with max_new_tokens filled in from the training answers
    fast: fastpath.FastPaths        # the CPU fast paths in use
    output_dir: Path
    micro_batches_per_epoch: int    # per process
    steps_per_epoch: int
    total_steps: int
    answer_tokens_p99: int
    metric: str | None              # the scorer validation uses (cfg.metric, or chosen from the data)
    summary: dict[str, Any]         # what run_summary.json records; nothing reads it back
    trackers: Trackers              # --report-to, started by fit
    no_answer: dict[str, Any] = field(default_factory=dict)  # the latest evaluation's calibration, with its step


# ------------------------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig) -> TrainingRun:
    """Load the model and data, encode once, build optimizer/scheduler/loader and the Accelerator.

    Writes `config.yaml` and `run_summary.json` into the run directory and logs the run summary.

    Raises:
        ConfigError: invalid combinations (fp16 with T5, --resume without a checkpoint, ...).
        DataError, ModelError: unreadable data or model.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    if not cfg.train:
        raise ConfigError("--train is required: the training data file (or `train:` in the --config file)")
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate keeps its settings in process-wide singletons, which refuse a second run with another
    # precision or accumulation in the same process (tests, hyperparameter search). Reset them; the
    # distributed process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    mixed_precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    output_dir = Path(cfg.output)
    trackers = check_report_to(cfg.report_to)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=mixed_precision, log_with=accelerate_names(trackers),
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(logging_dir(output_dir))))
    if not accelerator.is_main_process:
        # Every process runs the same code; only the main one talks to the user.
        logging.getLogger("t5qa").setLevel(logging.ERROR)
    set_seed(cfg.seed)
    check_output_dir(output_dir, resume=cfg.resume)

    model, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    check_precision(model, cfg.precision)
    model = _prepare_model_for_training(model, cfg)
    cleaning: dict[str, Any] = {}
    stream = None
    if cfg.streaming:
        stream, validation_examples = _open_stream(cfg, tokenizer, cleaning, accelerator.num_processes)
        train_count = None  # the stream's examples are read as training goes
        features, encode_stats = stream.peek_features()  # its first buffer: the answer length, the proof batch
        encode_cache = "streaming"
    else:
        # The main process reads, cleans and caches first; the others then read its cache rather than race it.
        with accelerator.main_process_first():
            features, encode_stats, encode_cache, train_count, validation_examples = _prepare_data(
                cfg, tokenizer, cleaning, write=accelerator.is_main_process)
    answer_tokens_p99 = answer_length_p99(features)
    generate = cfg.generate
    if generate.max_new_tokens is None:
        generate = dataclasses.replace(generate, max_new_tokens=max(answer_tokens_p99, generate.min_new_tokens, 1))

    # The sampler groups lengths per *global* micro-batch (all processes), which Accelerate then splits into
    # consecutive per-process chunks: N processes x batch B see the same examples as 1 process x batch N*B.
    # Without length grouping, each sorted group is a single micro-batch: a plain shuffle.
    # Grouped by target length too (bench/RESULTS.md: targets are otherwise padded to 2.8x their length).
    grouped = cfg.encode.group_by_length
    sampler: LengthGroupedSampler | None = None
    if stream is not None:  # the stream makes its own length-grouped micro-batches
        train_loader = torch.utils.data.DataLoader(stream, batch_size=None, collate_fn=make_collator(tokenizer))
    else:
        source_lengths, target_lengths = feature_lengths(features)
        sampler = LengthGroupedSampler(source_lengths, cfg.train_batch_size * accelerator.num_processes,
                                       seed=cfg.seed, group_batches=100 if grouped else 1,
                                       target_lengths=target_lengths if grouped else None)
        # The loader gets its own generator: each new iterator draws a seed from it, which must not consume the
        # global torch RNG that dropout uses (a resumed run creates one iterator more than an uninterrupted one).
        train_loader = torch.utils.data.DataLoader(features, batch_size=cfg.train_batch_size, sampler=sampler,
                                                   collate_fn=make_collator(tokenizer),
                                                   generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = make_optimizer(model, cfg)
    # The one place fast paths are decided: each proves itself on the first micro-batch or is not used.
    fast = fastpath.enable(model, optimizer, cfg, accelerator=accelerator, batch=_first_micro_batch(
        features, tokenizer, cfg.train_batch_size))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    # A stream has no length: its "epoch" is counted as the whole run (one pass may end sooner, or not at all).
    micro_batches_per_epoch = (cfg.max_steps * cfg.gradient_accumulation_steps if stream is not None
                               else len(train_loader))
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, cfg, total_steps)

    metric = (cfg.metric or choose_metric_for(validation_examples[: cfg.max_eval_examples])) \
        if validation_examples else cfg.metric
    summary = {
        "model": cfg.model,
        "examples": train_count,
        "streaming": stream is not None,
        "validation_examples": len(validation_examples),
        "metric": metric,
        "examples_needing_window": encode_stats.needed_window,
        "answers_outside_every_window": encode_stats.answer_outside_every_window,
        "truncated_targets": encode_stats.truncated_targets,
        "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "processes": accelerator.num_processes,
        "effective_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
        "micro_batches_per_epoch": micro_batches_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "epochs": round(total_steps / steps_per_epoch, 3),
        "parameters": count_parameters(model),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "precision": cfg.precision,
        "optimizer": cfg.optimizer,
        "device": str(accelerator.device),
        "fast_paths": fast.summary(),
        "answer_tokens_p99": answer_tokens_p99,
        "encode_cache": encode_cache,
        "cleaning": cleaning,
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(dataclasses.replace(cfg, resume=False), output_dir / CONFIG_FILE)
        write_json(output_dir / RUN_SUMMARY_FILE, summary)
        _log_summary(summary)
    return TrainingRun(cfg=cfg, accelerator=accelerator, model=model, tokenizer=tokenizer, optimizer=optimizer,
                       scheduler=scheduler, train_loader=train_loader, sampler=sampler,
                       train_examples=train_count, validation_examples=validation_examples,
                       encode_stats=encode_stats, generate=generate, fast=fast, output_dir=output_dir,
                       micro_batches_per_epoch=micro_batches_per_epoch, steps_per_epoch=steps_per_epoch,
                       total_steps=total_steps, answer_tokens_p99=answer_tokens_p99, metric=metric, summary=summary,
                       trackers=Trackers(accelerator, trackers, output_dir))


def _open_stream(cfg: TrainConfig, tokenizer: Any, cleaning: dict[str, Any], processes: int
                 ) -> tuple[StreamedBatches, list[QAExample]]:
    """--streaming: the training stream, and the validation examples (a file of their own: a stream cannot be
    split without reading it whole)."""
    # Under several processes the main one reads the stream and Accelerate's dispatcher hands out the shares.
    stream = StreamedBatches(cfg.train, cfg.data, tokenizer, cfg.encode, batch_size=cfg.train_batch_size,
                             buffer_size=cfg.shuffle_buffer, seed=cfg.seed, processes=processes)
    validation: list[QAExample] = []
    if cfg.validation:
        validation, report = load_dataset(cfg.validation, cfg.data, tokenizer=tokenizer,
                                          max_answer_tokens=cfg.encode.max_target_tokens)
        cleaning["validation"] = {k: v for k, v in report.to_dict().items() if k != "examples"}
    else:
        logger.info("--streaming without --validation: no evaluation during training (a stream cannot be split); "
                    "best/ is the last model")
    cleaning["training"] = {"streamed": True, "note": "cleaned per chunk of rows as it is read"}
    return stream, validation


def _prepare_data(cfg: TrainConfig, tokenizer: Any, cleaning: dict[str, Any], *, write: bool = True
                  ) -> tuple[Any, EncodeStats, str, int, list[QAExample]]:
    """(training features, their EncodeStats, how the encode cache served them, the number of training examples,
    the validation examples). The features come from the on-disk cache (or go into it) per --encode-cache, else
    are encoded in memory; "read", "written" or "off" says which. When a run with the same data files and
    settings cached its features, what it made of the files is read back and the files are not read again
    (`write`: keep this run's for the next one)."""
    key = None
    if cfg.encode_cache != "never":
        key = prepared_key(cfg.train, cfg.validation, cfg.data, cfg.encode, tokenizer)
        prepared = read_prepared(key, cfg.encode_cache_dir) if key else None
        if prepared is not None:
            cleaning.update(prepared.cleaning)
            logger.info("%s: unchanged since a run that cached it; %d training examples (%d held for validation) "
                        "and their tokenised features read from the cache, the file itself not read again",
                        cfg.train, prepared.train_examples, len(prepared.validation))
            return prepared.features, prepared.stats, "read", prepared.train_examples, prepared.validation
    examples, validation = load_run_examples(cfg, tokenizer, cleaning)
    if not should_cache(cfg.encode_cache, len(examples)):
        features, stats = encode_for_training(examples, tokenizer, cfg.encode)
        return features, stats, "off", len(examples), validation
    features, stats, hit = encode_cached(examples, tokenizer, cfg.encode, cache_dir=cfg.encode_cache_dir,
                                         num_proc=cfg.num_proc)
    if key is not None and write:
        write_prepared(key, features, len(examples), validation, cleaning, cfg.encode_cache_dir)
    return features, stats, "read" if hit else "written", len(examples), validation


def _first_micro_batch(features: list[dict[str, Any]], tokenizer: Any, size: int) -> dict[str, torch.Tensor]:
    batch = make_collator(tokenizer)(features[:size])
    batch.pop("example_index", None)
    return batch


def _prepare_model_for_training(model: Any, cfg: TrainConfig) -> Any:
    if cfg.gradient_checkpointing:
        # transformers 5.x renamed it (the old name warns, and goes in v6)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the decoder cache is useless in training and clashes with recompute
    if cfg.lora_rank is not None:
        if cfg.freeze_embeddings or cfg.freeze_encoder or cfg.freeze_layers:
            logger.warning("--freeze-* flags have no effect with LoRA: every base weight is frozen already")
        model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules,
                           gradient_checkpointing=cfg.gradient_checkpointing)  # freezes every base weight
    else:
        frozen = freeze(model, embeddings=cfg.freeze_embeddings, encoder=cfg.freeze_encoder,
                        first_layers=cfg.freeze_layers)
        if frozen:
            logger.info("froze %s parameters", f"{frozen:,}")
    if count_parameters(model, trainable_only=True) == 0:
        raise ConfigError("--freeze-*: every parameter is frozen, nothing would train; freeze less")
    model.train()
    return model


def load_run_examples(cfg: TrainConfig, tokenizer: Any,
                      cleaning: dict[str, Any] | None = None) -> tuple[list[QAExample], list[QAExample]]:
    """The run's training and validation examples: --validation's, or the held-out contexts of --train (the same
    split for the same data and --split-seed, so `t5qa export` can check an export on the run's validation).
    `cleaning`, when given, receives each file's cleaning report (without its sample sources) by split."""
    examples, report = load_dataset(cfg.train, cfg.data, tokenizer=tokenizer,
                                    max_answer_tokens=cfg.encode.max_target_tokens)
    reports = {"training": report}
    validation: list[QAExample] = []
    if cfg.validation:
        validation, reports["validation"] = load_dataset(cfg.validation, cfg.data, tokenizer=tokenizer,
                                                         max_answer_tokens=cfg.encode.max_target_tokens)
    if cleaning is not None:
        cleaning.update({split: {k: v for k, v in r.to_dict().items() if k != "examples"}
                         for split, r in reports.items()})
    if cfg.validation:
        return examples, validation
    if cfg.data.val_fraction <= 0:
        return examples, []
    # Grouped by context, so no validation question is about a context seen in training.
    splits = split_examples(examples, cfg.data.val_fraction, 0.0, cfg.data.split_seed)
    logger.info("no --validation: held out %d of %d examples (%.0f%% of the contexts) for validation",
                len(splits["validation"]), len(examples), 100 * cfg.data.val_fraction)
    return splits["train"], splits["validation"]


def _log_summary(summary: dict[str, Any]) -> None:
    logger.info(
        "training %s on %s examples (validation %d); effective batch %d = %d per micro-batch x %d accumulation "
        "x %d process(es); %d steps per epoch, %d steps (%.2f epochs); %s parameters (%s trainable); "
        "precision %s on %s",
        summary["model"], "streamed" if summary["examples"] is None else summary["examples"],
        summary["validation_examples"], summary["effective_batch_size"],
        summary["train_batch_size"], summary["gradient_accumulation_steps"], summary["processes"],
        summary["steps_per_epoch"], summary["total_steps"], summary["epochs"], f"{summary['parameters']:,}",
        f"{summary['trainable_parameters']:,}", summary["precision"], summary["device"],
    )
    if summary["examples_needing_window"]:
        logger.info("%d training examples were longer than max_source_tokens and use the window holding the "
                    "answer (%d answers lie in no window)", summary["examples_needing_window"],
                    summary["answers_outside_every_window"])


# --------------------------------------------------------------------------------------------------- fit


def fit(cfg: TrainConfig, *, on_evaluate: Callable[[int, dict], None] | None = None,
        progress: bool | None = None) -> TrainResult:
    """Train, evaluating and checkpointing on the way; resume when `cfg.resume`.

    Args:
        cfg: the resolved training config.
        on_evaluate: called as on_evaluate(step, metrics) after each evaluation on the main process;
            raising StopTraining from it ends the run cleanly.
        progress: show a progress bar; None shows it when stderr is a terminal.
    Returns:
        TrainResult with the run directory, best/ and last/ and the final metrics.
    Raises:
        TrainingError: non-finite loss (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C or SIGTERM, after writing a checkpoint.
        ConfigError, DataError, ModelError, CheckpointError: bad input.
    """
    run = setup(cfg)
    with run.fast.in_effect():
        return _fit(run, on_evaluate, progress)


def _fit(run: TrainingRun, on_evaluate: Callable[[int, dict], None] | None, progress: bool | None) -> TrainResult:
    cfg = run.cfg
    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, run.scheduler
    is_main = accelerator.is_main_process
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = TrainerState()
    if cfg.resume:
        state = _resume(run)
    resume_step = state.step if cfg.resume else None
    run.trackers.start(cfg.tracker_project, cfg, resume_step=resume_step)
    metrics_log = MetricsLog(run.output_dir, resume_step=resume_step, enabled=is_main, also=run.trackers.log)
    stop_request = _StopRequest()
    bar = _progress_bar(run, state.step, progress, enabled=is_main)

    stop_reason = ""
    started = time.perf_counter()
    interval_start, interval_samples, interval_loss, interval_steps = time.perf_counter(), 0, 0.0, 0
    model.train()
    try:
        stop_request.install()
        while state.step < run.total_steps and not stop_reason:
            loader = run.train_loader
            if state.micro_batches_in_epoch:  # resuming mid-epoch: skip what the interrupted run consumed
                loader = accelerator.skip_first_batches(run.train_loader, state.micro_batches_in_epoch)
            # The order depends only on (seed, epoch). Accelerate's loaders re-seed the sampler from their own
            # epoch counter when iterated, so they get ours too (a fresh skip loader would start at 0).
            if run.sampler is not None:
                run.sampler.set_epoch(state.epoch)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)
            step_loss = torch.zeros((), device=accelerator.device)  # sum of micro-batch losses in this step
            step_micro_batches = step_samples = 0
            for batch in loader:
                batch.pop("example_index", None)
                with accelerator.accumulate(model):
                    loss = model(**batch).loss  # mean token cross-entropy of the micro-batch
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        grad_norm = run.fast.limit_gradient_norm(accelerator, model, trainable,
                                                                 cfg.max_grad_norm)
                        if not math.isfinite(float(grad_norm)):  # stop before the update spoils the weights
                            raise _non_finite_error(run, state.step + 1, state.epoch, f"gradient norm {grad_norm}")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro_batches_in_epoch += 1
                step_loss += loss.detach().float()
                step_micro_batches += 1
                step_samples += batch["input_ids"].shape[0]
                if not accelerator.sync_gradients:
                    continue  # mid-accumulation: no optimizer step happened

                # ---- one optimizer step done
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                end_of_epoch = accelerator.gradient_state.end_of_dataloader
                # One all-reduce per step: mean loss, samples, and whether any process was asked to stop.
                totals = accelerator.reduce(torch.tensor(
                    [step_loss.item() / step_micro_batches, float(step_samples), float(stop_request.flag)],
                    device=accelerator.device), reduction="sum")
                mean_loss = totals[0].item() / accelerator.num_processes
                state.step += 1
                state.samples_seen += int(totals[1].item())
                interval_samples += int(totals[1].item())
                step_loss = torch.zeros((), device=accelerator.device)
                step_micro_batches = step_samples = 0
                if not math.isfinite(mean_loss):
                    raise _non_finite_error(run, state.step, state.epoch, f"training loss {mean_loss}")
                interval_loss += mean_loss
                interval_steps += 1
                epoch_float = state.epoch + state.micro_batches_in_epoch / run.micro_batches_per_epoch
                if bar is not None:
                    bar.update(1)
                    rate = interval_samples / max(time.perf_counter() - interval_start, 1e-9)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    samples_s=f"{rate:.1f}")

                if state.step % cfg.log_every_steps == 0 or state.step == run.total_steps:
                    elapsed = max(time.perf_counter() - interval_start, 1e-9)
                    metrics_log.write({"step": state.step, "epoch": round(epoch_float, 4), "split": "train",
                                       "loss": interval_loss / interval_steps,
                                       "learning_rate": scheduler.get_last_lr()[0],
                                       "samples_per_second": interval_samples / elapsed})
                    interval_start, interval_samples, interval_loss, interval_steps = time.perf_counter(), 0, 0.0, 0

                eval_due = (state.step == run.total_steps
                            or (cfg.eval_every_steps is not None and state.step % cfg.eval_every_steps == 0)
                            or (cfg.eval_every_steps is None and end_of_epoch))
                callback_stop = False
                if eval_due and run.validation_examples:
                    state.train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    metrics, improved = _evaluate_and_track(run, state, epoch_float, metrics_log)
                    state.eval_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                        stop_reason = (f"early stopping: {cfg.metric_for_best} did not improve for "
                                       f"{state.evals_without_improvement} evaluations")
                        state.stopped_early = True
                    if is_main and on_evaluate is not None:
                        try:
                            on_evaluate(state.step, metrics)
                        except StopTraining as exc:
                            callback_stop = True
                            stop_reason = f"stopped by the on_evaluate callback at step {state.step} ({exc})"
                    callback_stop = _any_process(accelerator, callback_stop)
                    if callback_stop and not stop_reason:
                        stop_reason = f"stopped by the on_evaluate callback at step {state.step}"
                    model.train()

                interrupted = totals[2].item() > 0
                save_due = (interrupted or (cfg.save_every_steps is not None and state.step % cfg.save_every_steps == 0)
                            or (cfg.save_every_steps is None and eval_due))
                if end_of_epoch:
                    state.epoch += 1
                    state.micro_batches_in_epoch = 0
                if (save_due and state.step < run.total_steps) or interrupted:
                    state.train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoint = _save_checkpoint(run, state)
                    if interrupted:
                        raise TrainingInterrupted(
                            f"training interrupted at step {state.step} of {run.total_steps}; a checkpoint was "
                            f"saved in {checkpoint}. Resume with: t5qa train --config "
                            f"{run.output_dir / CONFIG_FILE} --resume")
                if state.step >= run.total_steps or stop_reason:
                    break
        state.train_seconds += time.perf_counter() - started
        if stop_reason:
            logger.info("%s", stop_reason)
        return _finish(run, state, metrics_log)
    finally:
        stop_request.uninstall()
        if bar is not None:
            bar.close()
        metrics_log.close()
        run.trackers.finish()


def _any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def _non_finite_error(run: TrainingRun, step: int, epoch: int, what: str) -> TrainingError:
    good = complete_checkpoints(run.output_dir)
    kept = f"the last good checkpoint {good[0]} is kept" if good else "no checkpoint had been written yet"
    return TrainingError(
        f"non-finite {what} at step {step} (epoch {epoch + 1}); training stopped and "
        f"{kept}. Lower --learning-rate (now {run.cfg.learning_rate:g}), keep --max-grad-norm set, add warmup "
        f"(--warmup-ratio 0.1), and train T5 in --precision fp32 or bf16, never fp16"
    )


# ---------------------------------------------------------------------------------------------- evaluation


def _evaluate_and_track(run: TrainingRun, state: TrainerState, epoch: float,
                        metrics_log: MetricsLog) -> tuple[dict[str, Any], bool]:
    """Evaluate on the validation set, log, keep best/ and update the early-stopping counter."""
    from t5qa.evaluate import evaluate_model, write_predictions

    cfg, accelerator = run.cfg, run.accelerator
    model = accelerator.unwrap_model(run.model)
    model.eval()
    with torch.no_grad():
        result = evaluate_model(model, run.tokenizer, run.validation_examples, cfg.encode, run.generate,
                                batch_size=cfg.generate.batch_size, metric=run.metric,
                                accelerator=accelerator, max_examples=cfg.max_eval_examples,
                                calibrate_no_answer=True)
    if result.no_answer is not None:  # saved with a model of this step (noanswer.py)
        run.no_answer = {"step": state.step, **result.no_answer.to_dict()}
        logger.info("step %d: %s", state.step, result.no_answer.describe())
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    value = metrics.get(cfg.metric_for_best)
    improved = value is not None and math.isfinite(value) and (
        state.best_metric is None
        or (value > state.best_metric if cfg.greater_is_better else value < state.best_metric))
    state.last_eval_step = state.step
    state.last_metrics = metrics
    state.eval_history.append({"step": state.step, **metrics})
    if improved:
        state.best_metric, state.best_step, state.evals_without_improvement = float(value), state.step, 0
    else:
        state.evals_without_improvement += 1
    metrics_log.write({"step": state.step, "epoch": round(epoch, 4), "split": "validation", **metrics})
    logger.info("step %d: %s%s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                " (best so far)" if improved else "")
    if improved:
        _save_model_dir(run, run.output_dir / BEST_DIR, state)
        if accelerator.is_main_process:
            write_predictions(result, run.output_dir / PREDICTIONS_FILE)
    return metrics, improved


def _model_meta(run: TrainingRun, state: TrainerState) -> dict[str, Any]:
    cfg = run.cfg
    # Each setting once: `encode` is what predict, evaluate and serve rebuild inputs with; `train_config` is the
    # rest of the run's TrainConfig.
    train_config = to_dict(dataclasses.replace(cfg, resume=False))
    meta = {
        "encode": train_config.pop("encode"),
        "answer_tokens_p99": run.answer_tokens_p99,
        "step": state.step,
        "train_config": train_config,
    }
    if run.no_answer.get("step") == state.step:  # a threshold chosen for these very weights
        meta["no_answer"] = dict(run.no_answer)
    return meta


def _save_model_dir(run: TrainingRun, directory: Path, state: TrainerState) -> None:
    accelerator = run.accelerator
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model)
        # A LoRA run saves its adapter (which names the base model); `t5qa` tools load it onto the base.
        save = save_adapter if is_lora_model(model) else save_model
        try:
            save(model, run.tokenizer, directory, _model_meta(run, state))
        except OSError as exc:
            raise write_error(run.output_dir, exc, f"the model to {directory}") from None
    accelerator.wait_for_everyone()


def _finish(run: TrainingRun, state: TrainerState, metrics_log: MetricsLog) -> TrainResult:
    """Write last/, best/ (when no validation chose one), summary.json, plots and the report."""
    accelerator, output_dir = run.accelerator, run.output_dir
    last_dir, best_dir = output_dir / LAST_DIR, output_dir / BEST_DIR
    _save_model_dir(run, last_dir, state)
    if not run.validation_examples:
        _save_model_dir(run, best_dir, state)
    summary = {
        "final_metrics": state.last_metrics,
        "best_step": state.best_step if run.validation_examples else state.step,
        "best_metric": state.best_metric,
        "metric_for_best": run.cfg.metric_for_best,
        "steps": state.step,
        "total_steps": run.total_steps,
        "epochs": round(state.step / run.steps_per_epoch, 4),
        "samples_seen": state.samples_seen,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 2),
        "eval_seconds": round(state.eval_seconds, 2),
        "eval_history": state.eval_history,
    }
    if accelerator.is_main_process:
        write_json(output_dir / SUMMARY_FILE, summary)
        metrics_log.close()
        for directory in (best_dir, last_dir):
            if directory.is_dir():
                try:
                    write_model_card(directory, output_dir, last=directory == last_dir)
                except OSError as exc:
                    raise write_error(output_dir, exc, f"the model card to {directory}") from None
        if run.cfg.push_to_hub:
            from t5qa.hub import push_model

            try:
                push_model(best_dir, run.cfg.push_to_hub)
            except (ModelError, ConfigError) as exc:  # the run is saved: say so, and finish
                logger.warning("%s", exc)
        from t5qa.report import write_report

        report = write_report(output_dir, run.cfg.report_format)
        run.trackers.log_files(report, state.step)
        logger.info("finished %d steps in %.1f s of training and %.1f s of evaluation; best %s %s at step %s; "
                    "report: %s", state.step, state.train_seconds, state.eval_seconds, run.cfg.metric_for_best, state.best_metric, summary["best_step"], report)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=output_dir, best_dir=best_dir, last_dir=last_dir, best_metric=state.best_metric,
                       final_metrics=state.last_metrics, steps=state.step, stopped_early=state.stopped_early)


# -------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(run: TrainingRun, state: TrainerState) -> Path:
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        raise _non_finite_error(run, state.step, state.epoch, "model weights")  # never save them over a good one
    return save_checkpoint(run.accelerator, run.output_dir, state.step, scheduler=run.scheduler,
                           trainer_state=dataclasses.asdict(state), config=run.cfg, keep=run.cfg.keep_checkpoints)


def _resume(run: TrainingRun) -> TrainerState:
    path = latest_good_checkpoint(run.output_dir)
    state = TrainerState(**load_checkpoint(run.accelerator, path, scheduler=run.scheduler, config=run.cfg))
    logger.info("resumed from %s: step %d, epoch %d, %d micro-batches into the epoch", path, state.step,
                state.epoch + 1, state.micro_batches_in_epoch)
    return state


# ------------------------------------------------------------------------------------------------ helpers


class _StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag checked after each step; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        logger.warning("%s received: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)",
                       signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not inside a server)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _progress_bar(run: TrainingRun, initial: int, progress: bool | None, *, enabled: bool) -> Any:
    if not enabled:
        return None
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)
