"""Configuration dataclasses: the only place where defaults live.

A config loads from YAML and/or keyword overrides (the CLI passes its flags as overrides, so flags win over
the file). Every problem is collected and reported at once, naming the key or flag.

Vocabulary used across t5qa:
- a *micro-batch* is what goes through the model in one forward/backward pass (`train_batch_size` examples
  per process);
- a *step* is one optimizer step, i.e. `gradient_accumulation_steps` micro-batches on every process.
  Effective batch size = train_batch_size x gradient_accumulation_steps x number of processes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from t5qa.errors import ConfigError

DEFAULT_PROMPT_TEMPLATE = "question: {question} context: {context}"
# Target text for a question with no answer in its context (SQuAD v2 style): the empty string, which the
# official v2 scorer treats as "no answer".
NO_ANSWER_TEXT = ""

SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor")
PRECISIONS = ("fp32", "bf16", "fp16")
METRICS = ("f1", "exact_match", "loss", "token_accuracy")
SCORERS = ("squad", "squad_v2", "cmrc")  # the official EM/F1 definitions t5qa.metrics implements
REPORT_FORMATS = ("md", "html")
ENCODE_CACHE_MODES = ("auto", "always", "never")  # --encode-cache (t5qa.encode_cache)


@dataclass
class DataConfig:
    """How to read and split a user's question-answer data."""

    format: str | None = None
    """File format; None detects it from the content (squad, json, jsonl, csv, tsv, parquet, pubmedqa, qed, hf_disk)."""
    context_column: str | None = None
    """Column holding the context; None recognises `context`."""
    question_column: str | None = None
    """Column holding the question; None recognises `question`."""
    answer_column: str | None = None
    """Column holding the answer text (or a list of answers); None recognises `answer` or `answers`."""
    id_column: str | None = None
    """Column holding an example id; None recognises `id` and otherwise numbers the rows."""
    no_answer_values: tuple[str, ...] = ("ANSWERNOTFOUND",)
    """Answer values that mean "no answer in this context" (SubjQA writes ANSWERNOTFOUND)."""
    hf_split: str | None = None
    """Split to read from a `datasets` DatasetDict; None reads every split."""
    drop_answers_not_in_context: bool = False
    """Drop examples whose answer text does not occur in the context (kept and reported by default)."""
    drop_unanswerable: bool = False
    """Drop questions with no answer (kept and flagged by default)."""
    val_fraction: float = 0.1
    """Fraction of contexts for the validation split."""
    test_fraction: float = 0.1
    """Fraction of contexts for the test split."""
    split_seed: int = 42
    """Seed of the grouped split (which contexts go to validation and test); training has its own --seed."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            problems.append("--val-fraction + --test-fraction must be below 1 to leave training data")
        _raise_all(problems)


@dataclass
class EncodeConfig:
    """How a (context, question) pair becomes model input, and an answer becomes labels."""

    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """Source text; must contain {question} and {context}."""
    max_source_tokens: int = 512
    """Input length limit in tokens; longer contexts are cut into overlapping windows."""
    max_target_tokens: int = 64
    """Answer length limit in tokens (labels are truncated to it)."""
    stride_tokens: int | None = None
    """Overlap, in context tokens, between consecutive windows of a long context; by default a quarter of
    max_source_tokens (128 at 512), so it follows a changed input length."""
    group_by_length: bool = True
    """Batch examples of similar input and answer length together, so dynamic padding wastes little compute."""

    def __post_init__(self) -> None:
        if self.stride_tokens is None:  # derived from the input length, so it follows --max-source-tokens
            self.stride_tokens = max(self.max_source_tokens, 0) // 4
        problems = []
        for key in ("{question}", "{context}"):
            if key not in self.prompt_template:
                problems.append(f"--prompt-template must contain {key}, got {self.prompt_template!r}")
        if self.max_source_tokens < 16:
            problems.append(f"--max-source-tokens must be at least 16, got {self.max_source_tokens}")
        if self.max_target_tokens < 1:
            problems.append(f"--max-target-tokens must be at least 1, got {self.max_target_tokens}")
        if not 0 <= self.stride_tokens < self.max_source_tokens:
            problems.append(
                f"--stride-tokens must be in [0, max-source-tokens), got {self.stride_tokens}"
            )
        _raise_all(problems)


@dataclass
class GenerateConfig:
    """How answers are generated (evaluation, predict, serve)."""

    num_beams: int = 1
    """Beam search width; 1 is greedy decoding."""
    max_new_tokens: int | None = None
    """Longest answer in tokens; None uses the limit saved with the model from its training answers."""
    min_new_tokens: int = 0
    """Shortest answer in tokens."""
    length_penalty: float = 1.0
    """Beam-search length penalty (>1 favours longer answers)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating n-grams of this size (0: off)."""
    batch_size: int | None = None
    """Questions (or windows) per forward pass when answering: in predict, serve, evaluate and training's
    evaluation. None: 64 where the lean greedy loop answers (its encoder runs in chunks of similar length, so the
    larger batch adds little padding while the decoder's steps cost less per question), else 32."""
    fast_answering: bool = True
    """CPU fast paths when answering in fp32 (oneDNN's linear products, proven on the model's first batch;
    freed memory kept between batches): see fastpath/answering.py."""
    no_answer_margin: float | None = None
    """Answer only when the best non-empty answer's score beats the empty answer's by at least this margin
    (log-probability per token; noanswer.py); None uses the threshold calibrated and saved with the model, if any."""
    calibrated_no_answer: bool = True
    """Apply the no-answer threshold saved with the model (--no-calibrated-no-answer: the model's own choice)."""
    grounded: bool = False
    """Constrain each answer to a contiguous span of its context window's tokens, or the empty answer
    (grounding.py); with the ct2 backend, the first of the n-best answers found in the context."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_beams < 1:
            problems.append(f"--num-beams must be at least 1, got {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            problems.append(f"--min-new-tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            problems.append("--min-new-tokens must not exceed --max-new-tokens")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        _raise_all(problems)


@dataclass
class ServeLimits:
    """What one HTTP request to `t5qa serve` may ask for; larger requests get a 4xx answer."""

    max_request_bytes: int = 1_000_000
    """Largest request body in bytes (413 above it)."""
    max_pairs_per_request: int = 64
    """Most (context, question) pairs in one request."""
    max_context_chars: int = 50_000
    """Longest context in characters (long contexts are answered window by window)."""
    max_question_chars: int = 1_000
    """Longest question in characters."""
    max_num_beams: int = 8
    """Largest num_beams a request may ask for."""
    max_new_tokens_cap: int = 256
    """Largest max_new_tokens / min_new_tokens a request may ask for."""

    def __post_init__(self) -> None:
        problems = [
            f"--{_flag(f.name)} must be at least 1, got {getattr(self, f.name)}"
            for f in fields(self) if getattr(self, f.name) < 1
        ]
        _raise_all(problems)


@dataclass
class ServeConfig:
    """How `t5qa serve` listens and batches; `limits` says what one request may ask for."""

    host: str = "127.0.0.1"
    """Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every interface (then set an API key)."""
    port: int = 8000
    """TCP port."""
    max_batch_size: int = 32
    """Most pairs answered in one model call."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its batch, in ms."""
    workers: int = 1
    """Server processes on the one port, each with its own copy of the model (and cores / N threads)."""
    model_name: str | None = None
    """The name /health and the web page give the model; None: its model card's title, or its directory's name."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM or Ctrl-C, how long queued and running requests may take to finish before the server stops."""
    access_log: bool = True
    """One JSON line per request (time, request id, method, path, status, ms, client) in the server's log."""
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.port <= 65535:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        if self.max_batch_size < 1:
            problems.append(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if not self.max_wait_ms >= 0:
            problems.append(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if not self.shutdown_timeout_s > 0:
            problems.append(f"--shutdown-timeout-s must be positive, got {self.shutdown_timeout_s}")
        _raise_all(problems)


@dataclass
class TuneConfig:
    """How `t5qa tune` searches: how many trials, where the study lives, what it optimises."""

    trials: int | None = None
    """Trials to reach in the study (complete + pruned, over every worker); required."""
    output: str | None = None
    """Search directory: study.db, trial-NNNN/ runs, trials.csv, best_config.yaml, plots; required."""
    storage: str | None = None
    """Database URL of the study (default sqlite:///OUTPUT/study.db); e.g. postgresql://user:pass@host/db to
    search from several machines."""
    metric_for_best: str = "f1"
    """Validation metric to optimise (loss is minimised, the others maximised)."""
    study_name: str = "t5qa"
    """Name of the study in the storage."""
    heartbeat_interval_s: int = 20
    """Seconds between a running trial's heartbeats."""
    grace_period_s: int = 60
    """A running trial without a heartbeat for this long was killed: it is failed and retried."""
    pruner_startup_trials: int = 3
    """Trials that finish before the median pruner may prune."""
    pruner_warmup_evaluations: int = 1
    """Evaluations of a trial before it may be pruned."""

    def __post_init__(self) -> None:
        problems = []
        if self.trials is None or self.output is None:
            problems.append("--trials and --output are required (how many trials, and the search directory)")
        elif self.trials < 1:
            problems.append(f"--trials must be at least 1, got {self.trials}")
        if self.metric_for_best not in METRICS:
            problems.append(f"--metric-for-best must be one of {', '.join(METRICS)}, got {self.metric_for_best!r}")
        if self.heartbeat_interval_s < 1 or self.grace_period_s <= self.heartbeat_interval_s:
            problems.append("the grace period must exceed the heartbeat interval (both in whole seconds)")
        if self.storage is not None and "://" not in self.storage:
            problems.append(f"--storage must be a database URL such as sqlite:///path/study.db or "
                            f"postgresql://user@host/db, got {self.storage!r}")
        _raise_all(problems)


@dataclass
class TrainConfig:
    """Everything one training run needs. YAML files use these names as keys; flags use them with dashes."""

    model: str = "t5-small"
    """Hub name or local directory of any AutoModelForSeq2SeqLM."""
    train: str | None = None
    """Training data file or directory (any format the data layer reads)."""
    validation: str | None = None
    """Validation data; None holds out `val_fraction` of the training contexts."""
    output: str = "runs/t5qa"
    """Run directory (checkpoints, best/, last/, metrics, plots, report)."""

    # data
    data: DataConfig = field(default_factory=DataConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    # optimisation
    train_batch_size: int = 8
    """Examples per micro-batch per process."""
    epochs: float = 3.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to train for; overrides epochs."""
    learning_rate: float = 3e-4
    """Peak learning rate (3e-4 suits T5 fine-tuning with AdamW; from scratch 1e-3)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warmup: linear, cosine or constant."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Fraction of total steps used for warmup."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and layer norms)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None disables clipping."""
    optimizer: str = "adamw"
    """adamw or adafactor."""
    precision: str = "fp32"
    """fp32 or bf16 (fp16 is refused for T5, which overflows in fp16)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    fast_dropout: bool = True
    """On CPU, draw dropout masks 8x cheaper than PyTorch does (drop rate kept to within 1/65536, same seeding)."""
    fast_linear: bool = True
    """On CPU in fp32, compute the linear layers' forward products and input gradients with oneDNN instead of MKL
    (faster on AVX-512 CPUs; the same function to within fp32 rounding)."""
    fast_norm: bool = True
    """On CPU in fp32, run the T5 family's layer norm as one autograd function (fewer passes, less memory kept;
    the same function to within fp32 rounding)."""
    keep_freed_memory: bool = True
    """On Linux, let glibc keep freed tensor memory for reuse while training instead of mapping it afresh."""
    freeze_embeddings: bool = False
    """Do not train the shared token embeddings."""
    freeze_encoder: bool = False
    """Do not train the encoder."""
    freeze_layers: int = 0
    """Do not train the first N encoder and decoder blocks."""
    seed: int = 42
    """Seed of model initialisation, data order and dropout."""

    # evaluation, checkpoints, early stopping
    eval_every_steps: int | None = None
    """Evaluate every N optimizer steps; None evaluates at the end of each epoch."""
    max_eval_examples: int | None = None
    """Evaluate on at most this many validation examples during training (None: all)."""
    metric_for_best: str = "f1"
    """Metric that selects best/ and drives early stopping: f1, exact_match, loss or token_accuracy."""
    metric: str | None = None
    """Official scorer of validation EM/F1: squad, squad_v2 or cmrc; None chooses from the validation data
    (cmrc when most contexts are Chinese, squad_v2 when some question has no answer, squad otherwise)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; None never stops early."""
    save_every_steps: int | None = None
    """Write a resumable checkpoint every N steps; None writes one at each evaluation."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept on disk (older ones are deleted)."""
    resume: bool = False
    """Continue from the last complete checkpoint in `output`."""
    log_every_steps: int = 10
    """Log loss and learning rate every N steps."""
    report_format: str = "md"
    """Run report format: md or html."""
    streaming: bool = False
    """Read the training data as a stream (`datasets` streaming: a JSON-lines, CSV, TSV or Parquet file, or a Hub
    dataset), never whole in memory or on disk; needs --max-steps and, for evaluation, --validation."""
    shuffle_buffer: int = 10_000
    """With --streaming: examples mixed by the shuffle buffer, and grouped by length into micro-batches."""
    encode_cache: str = "auto"
    """Keep the tokenised training set on disk (Arrow, through `datasets`), keyed by the data, tokenizer and encode
    settings, so the next run with the same inputs skips tokenising: always, never, or auto (from 20,000 examples)."""
    encode_cache_dir: str | None = None
    """Where the tokenised sets are kept; None: the `datasets` cache (HF_DATASETS_CACHE)/t5qa-encoded."""
    num_proc: int | None = None
    """Processes that tokenise a set being cached (`datasets` map's num_proc); None: one."""
    report_to: tuple[str, ...] = ("tensorboard",)
    """Experiment trackers, through Accelerate: tensorboard, wandb, mlflow, comet (comma-separated), or none.
    Each gets the config, the metrics and, at the end, the report's plots; metrics.jsonl is written whatever."""
    tracker_project: str = "t5qa"
    """Project (W&B, Comet), experiment (MLflow) or folder under tensorboard/ that the run is logged to; the run is
    named after its output directory."""
    push_to_hub: str | None = None
    """After training, upload best/ (with its model card) to this Hugging Face Hub repository (NAME or USER/NAME);
    when the Hub cannot be reached, one line says so and the run stays on disk (push it later with `t5qa push`)."""

    # safety and extras
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run (off unless asked for)."""
    allow_pickle: bool = False
    """Allow loading pickled (.bin) weights; safetensors only by default."""
    lora_rank: int | None = None
    """Train LoRA adapters of this rank instead of the full model; None trains every weight."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA path."""
    lora_target_modules: tuple[str, ...] = ()
    """Module names that get adapters; empty: the model type's attention query and value projections (q,v in
    the T5 family, q_proj,v_proj in BART and its kin)."""

    def __post_init__(self) -> None:
        problems = []
        positive = ("train_batch_size", "gradient_accumulation_steps", "log_every_steps")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every_steps", "save_every_steps", "early_stopping_patience",
                     "max_eval_examples", "lora_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{_flag(name)} must be at least 1 (or unset), got {value}")
        if self.epochs <= 0:
            problems.append(f"--epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            problems.append(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.freeze_layers < 0:
            problems.append("--warmup-steps, --weight-decay and --freeze-layers must not be negative")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"--max-grad-norm must be positive (or unset), got {self.max_grad_norm}")
        if self.keep_checkpoints < 1:
            problems.append(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        for name, allowed in (("lr_scheduler", SCHEDULERS), ("optimizer", OPTIMIZERS),
                              ("precision", PRECISIONS), ("metric_for_best", METRICS),
                              ("report_format", REPORT_FORMATS)):
            if getattr(self, name) not in allowed:
                problems.append(f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.encode_cache not in ENCODE_CACHE_MODES:
            problems.append(f"--encode-cache must be one of {', '.join(ENCODE_CACHE_MODES)}, got {self.encode_cache!r}")
        if self.shuffle_buffer < 1:
            problems.append(f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}")
        if self.streaming and self.max_steps is None:
            problems.append("--streaming needs --max-steps: a stream has no length to count epochs in")
        if self.num_proc is not None and self.num_proc < 1:
            problems.append(f"--num-proc must be at least 1 (or unset), got {self.num_proc}")
        if self.metric is not None and self.metric not in SCORERS:
            problems.append(f"--metric must be one of {', '.join(SCORERS)}, got {self.metric!r}")
        _raise_all(problems)

    @property
    def greater_is_better(self) -> bool:
        """Whether a larger value of `metric_for_best` is better."""
        return self.metric_for_best != "loss"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


T = TypeVar("T")


# Keys of earlier t5qa versions, read under their current names (config.yaml of older run directories resumes).
_RENAMED_KEYS = {"eval_batch_size": "batch_size"}


def from_dict(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Build a config dataclass from a (possibly nested) dict, reporting every unknown key at once.

    Nested dataclass fields (TrainConfig.data, .encode, .generate) accept either a nested mapping or their
    keys at the top level, so `max_source_tokens: 384` and `encode: {max_source_tokens: 384}` both work.

    Args:
        cls: the dataclass to build.
        values: keys and values (from YAML or flags).
        source: where the values came from, for error messages.
    Returns:
        The validated config.
    Raises:
        ConfigError: unknown keys, wrong types or invalid values, all named.
    """
    own = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    nested = {name: f for name, f in own.items() if dataclasses.is_dataclass(_field_type(cls, f))}
    nested_keys = {
        name: {sub.name for sub in fields(_field_type(cls, f))} for name, f in nested.items()  # type: ignore[arg-type]
    }
    kwargs: dict[str, Any] = {}
    sub_values: dict[str, dict[str, Any]] = {name: {} for name in nested}
    unknown = []
    for key, value in values.items():
        key = key.replace("-", "_")
        key = _RENAMED_KEYS.get(key, key)
        if key in nested and isinstance(value, dict):
            sub_values[key].update(value)
        elif key in own and key not in nested:
            kwargs[key] = value
        else:
            owner = next((n for n, keys in nested_keys.items() if key in keys), None)
            if owner is None:
                unknown.append(key)
            else:
                sub_values[owner][key] = value
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; see `t5qa train --help` for the keys")
    for name, sub in sub_values.items():
        kwargs[name] = from_dict(_field_type(cls, own[name]), sub, source=source)
    problems = []
    for key, value in list(kwargs.items()):
        if key in nested:
            continue
        try:
            kwargs[key] = _coerce(value, own[key].type, key)
        except ConfigError as exc:
            problems.append(str(exc))
    _raise_all(problems)
    return cls(**kwargs)


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    import typing

    return typing.get_type_hints(cls)[f.name]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce YAML/CLI values to the annotated type (str annotations come from `from __future__`)."""
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key} must not be empty")
    try:
        if "tuple" in text:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if text.startswith("bool") or text == "<class 'bool'>":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if text.startswith("int") or text == "<class 'int'>":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if text.startswith("float") or text == "<class 'float'>":
            return float(value)
        if text.startswith("str") or text == "<class 'str'>":
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {text.replace(' | None', '')}, got {value!r}") from None
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the --config path")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value, got {type(loaded).__name__}")
    return loaded


def load_train_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Resolve a TrainConfig: defaults, then the YAML file at `path`, then `overrides` (flags), last wins.

    Overrides whose value is None are ignored, so unset CLI flags do not mask the file.
    """
    values: dict[str, Any] = load_yaml(path) if path else {}
    source = str(path) if path else "flags"
    flat = _flatten(values)
    flat.update({k.replace("-", "_"): v for k, v in overrides.items() if v is not None})
    return from_dict(TrainConfig, flat, source=source)


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("data", "encode", "generate") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-serialisable dict of a config dataclass (tuples become lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))


def save_yaml(config: Any, path: str | os.PathLike) -> None:
    """Write a config dataclass as YAML (the format `load_train_config` reads back)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")
