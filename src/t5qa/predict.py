"""Answer questions about contexts with a trained model: batched, length-sorted, long contexts in windows.

One `Predictor` serves every caller (the `t5qa predict` command, evaluation during training, the HTTP
server), so what evaluation measures is what users get.

How a batch of questions is answered:
1. each (context, question) pair becomes one model input, or several overlapping windows when the prompt is
   longer than the model's input (`encode.encode_windows`);
2. all inputs are sorted by length and cut into batches of `GenerateConfig.batch_size`, so each batch pads
   to nearly the same length (padding is compute thrown away);
3. each batch is decoded under `torch.inference_mode()` with the key/value cache on;
4. each window's answer gets a score, the mean log-probability per generated token; for a pair with several
   windows the best-scoring non-empty answer wins (an empty answer means "not in this window"), and the
   answers come back in input order.
5. with a no-answer threshold (noanswer.py: calibrated on validation data with unanswerable questions and saved
   with the model, or --no-answer-margin), each window also gets the log-probability of the empty answer and
   its best non-empty answer (decoded again with one token at least where the model chose the empty one); the
   window with the largest margin between the two answers, and only when the margin reaches the threshold.

Backends: "torch" (any AutoModelForSeq2SeqLM) or "ct2" (a CTranslate2 model written by `t5qa export`,
faster on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.encode import Window, encode_windows, format_source, pad_batch
from t5qa.errors import ConfigError, DataError, ModelError
from t5qa.grounding import SpanConstraint, find_in_context
from t5qa.noanswer import apply_threshold, read_threshold

logger = logging.getLogger(__name__)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

BACKENDS = ("torch", "ct2")
# Grounded answering with CTranslate2: the n-best list that is searched for an answer in the context.
GROUNDED_CT2_BEAMS = 4
# Windows per batch where GenerateConfig.batch_size is None. The lean greedy loop encodes a batch in chunks of
# similar length (fastpath/decoding.py), so its larger batch adds little padding and its decoder steps cost less
# per question: 14.1 against 13.4 questions/s over 440 questions, 4 paired rounds, 2 cores
# (bench/ANSWERING_RESULTS.md). Batches of 128 were slower again (their cross-attention grows with the padding).
DEFAULT_BATCH_SIZE = 32
LEAN_BATCH_SIZE = 64
# Answer length limit when the model directory says nothing about its training answers.
FALLBACK_ANSWER_TOKENS = 32
# What `t5qa tune --decoding` searches and saves in t5qa.json (tune_decoding.py); applied where the caller keeps
# the default.
DECODING_META_KEY = "decoding"
SEARCHED_DECODING = ("num_beams", "length_penalty", "max_new_tokens", "no_repeat_ngram_size", "grounded")
# Files that mark a directory written by `t5qa export --format ct2`.
CT2_MODEL_FILE = "model.bin"
CT2_META_KEY = "ct2"


@dataclass
class Answer:
    """The answer to one question."""

    text: str
    score: float
    """Mean log-probability per generated token (<= 0; closer to 0 is more confident)."""
    window_index: int
    """Which window of the context the answer came from (0 when the context fit in one input)."""
    num_windows: int
    """How many windows the context was cut into (1 when it fit)."""
    seconds: float | None = None
    """Compute time spent on this question: its share of each batch that held one of its windows."""
    window_char_start: int = 0
    """Character offset in the context where the answering window starts."""
    window_char_end: int = 0
    """Character offset in the context where the answering window ends (exclusive)."""
    margin: float | None = None
    """Score of the best non-empty answer minus that of the empty answer (where measured: with a no-answer
    threshold, or when evaluation calibrates one)."""
    candidate: str | None = None
    """The best non-empty answer (where measured), also when the threshold or the model chose the empty one."""
    no_answer_score: float | None = None
    """Log-probability of the empty answer (</s> first) in that window (where measured)."""
    in_context: bool | None = None
    """Whether the answer is in its context (grounding.find_in_context); None for the empty answer."""
    answer_char_start: int | None = None
    """Where the answer starts in the context (character offset), when it is there."""
    answer_char_end: int | None = None
    """Where it ends (exclusive)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)


@dataclass
class InferenceStats:
    """Counters over every call of a Predictor, to see where time and padding go."""

    questions: int = 0
    windows: int = 0
    """Model inputs (a long context counts once per window)."""
    batches: int = 0
    real_tokens: int = 0
    """Source tokens that carry text."""
    padded_tokens: int = 0
    """Source positions in the padded batches (real + padding)."""
    seconds: float = 0.0
    """Wall time in tokenisation, generation and decoding."""

    @property
    def padding_fraction(self) -> float:
        """Share of source positions that were padding (0 is perfect)."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def questions_per_second(self) -> float:
        """Throughput over all calls so far."""
        return self.questions / self.seconds if self.seconds else 0.0


@dataclass
class _Item:
    """One model input: a window of one pair."""

    pair_index: int
    window: Window
    context: str = ""
    """The window's part of the context."""
    text: str = ""
    score: float = float("-inf")
    seconds: float = 0.0
    no_answer_score: float | None = None
    candidate: str = ""
    candidate_score: float = float("-inf")

    @property
    def margin(self) -> float | None:
        if self.no_answer_score is None or not self.candidate:
            return None
        return self.candidate_score - self.no_answer_score


class Predictor:
    """Batched question answering with a seq2seq model (PyTorch) or its CTranslate2 export.

    Args:
        model: an AutoModelForSeq2SeqLM (None for the "ct2" backend).
        tokenizer: the model's tokenizer.
        encode: prompt template, max_source_tokens and stride_tokens used to build inputs.
        generate: decoding settings; `max_new_tokens=None` uses `default_max_new_tokens`.
        backend: "torch" or "ct2".
        ct2_dir: the CTranslate2 model directory (backend "ct2").
        default_max_new_tokens: the answer length limit when `generate.max_new_tokens` is None; None uses
            `encode.max_target_tokens`.
        ct2_compute_type: CTranslate2 compute type ("default" keeps the export's quantization).
        saved_no_answer_threshold: the no-answer threshold calibrated for the model (noanswer.py), if any.
    Raises:
        ConfigError: an unknown backend, or "ct2" without a directory.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        encode: EncodeConfig,
        generate: GenerateConfig,
        backend: str = "torch",
        ct2_dir: str | os.PathLike | None = None,
        *,
        default_max_new_tokens: int | None = None,
        ct2_compute_type: str = "default",
        saved_no_answer_threshold: float | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "torch" and model is None:
            raise ConfigError("the torch backend needs a model; pass one, or use backend='ct2' with ct2_dir")
        if backend == "ct2" and ct2_dir is None:
            raise ConfigError("the ct2 backend needs ct2_dir, a directory written by `t5qa export --format ct2`")
        self.model = model
        self.tokenizer = tokenizer
        self.encode_config = encode
        self.generate_config = generate
        self.backend = backend
        self.default_max_new_tokens = int(default_max_new_tokens or encode.max_target_tokens)
        self.stats = InferenceStats()
        self.saved_no_answer_threshold = saved_no_answer_threshold
        """The no-answer threshold calibrated for this model (t5qa.json `no_answer`), if any."""
        self._runner: TorchBackend | CT2Backend = (
            CT2Backend(Path(ct2_dir), tokenizer, ct2_compute_type) if backend == "ct2"  # type: ignore[arg-type]
            else TorchBackend(model, tokenizer))

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        backend: str = "torch",
        generate: GenerateConfig | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        stride_tokens: int | None = None,
        max_source_tokens: int | None = None,
        chosen: Sequence[str] = (),
        device: str | None = None,
    ) -> "Predictor":
        """Load a model directory (saved by t5qa or transformers) or a CTranslate2 export.

        The prompt template, input length, stride and default answer length come from the directory's
        t5qa.json; `stride_tokens` / `max_source_tokens` override them.

        Args:
            directory: model directory (torch) or `t5qa export` output (ct2); a Hub name also works for torch.
            backend: "torch" or "ct2".
            generate: decoding settings (defaults from config.py).
            allow_pickle, trust_remote_code: safety switches passed to `modeling.load_model`.
            stride_tokens, max_source_tokens: override the window settings saved with the model.
            chosen: the `generate` fields the caller set (the flags given): kept even where they equal the default,
                over the decoding settings that `t5qa tune --decoding` saved with the model.
            device: where the torch backend answers ("cpu", "cuda", "cuda:1", ...); None: the GPU when there is one.
        Returns:
            A ready Predictor.
        Raises:
            ModelError: the directory is missing, unsafe or of the wrong kind.
            ConfigError: an unknown backend or invalid overrides.
        """
        from t5qa.modeling import load_model, load_tokenizer, read_meta

        if backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = Path(directory)
        is_ct2 = (path / CT2_MODEL_FILE).is_file()
        meta = read_meta(path) if path.is_dir() else {}
        generate = with_tuned_decoding(generate or GenerateConfig(), meta, chosen)
        encode = encode_config_from_meta(meta, stride_tokens=stride_tokens, max_source_tokens=max_source_tokens)
        if backend == "ct2":
            if not path.is_dir():
                raise ModelError(f"{path}: no such directory; pass the output of `t5qa export --format ct2`")
            if not is_ct2:
                raise ModelError(
                    f"{path}: not a CTranslate2 model (no {CT2_MODEL_FILE}); convert it first with "
                    f"`t5qa export --model {path} --format ct2 --output DIR`, then pass --model DIR"
                )
            tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
            compute_type = str(meta.get(CT2_META_KEY, {}).get("quantization") or "default")
            return cls(None, tokenizer, encode, generate, backend="ct2", ct2_dir=path,
                       default_max_new_tokens=default_max_new_tokens(meta), ct2_compute_type=compute_type,
                       saved_no_answer_threshold=read_threshold(meta))
        if is_ct2:
            raise ModelError(f"{path}: this is a CTranslate2 export; answer with it using --backend ct2")
        model, tokenizer = load_model(str(directory), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        model = model.to(_answering_device(device))
        return cls(model, tokenizer, encode, generate, default_max_new_tokens=default_max_new_tokens(meta),
                   saved_no_answer_threshold=read_threshold(meta))

    # ---------------------------------------------------------------------------------------- answering

    def answer(self, context: str, question: str, **generate_overrides: Any) -> Answer:
        """Answer one question about one context (see `answer_many`)."""
        return self.answer_many([(context, question)], **generate_overrides)[0]

    def answer_many(
        self, pairs: Sequence[tuple[str, str]], *, progress: bool = False, measure_no_answer: bool = False,
        **generate_overrides: Any
    ) -> list[Answer]:
        """Answer many (context, question) pairs, in batches of similar length.

        Args:
            pairs: (context, question) tuples.
            progress: show a tqdm progress bar over model inputs.
            measure_no_answer: give every answer its margin and candidate (noanswer.py) even without a threshold.
            generate_overrides: GenerateConfig fields for this call only (e.g. num_beams=4).
        Returns:
            One Answer per pair, in input order. A context longer than the model's input is answered window
            by window; the best-scoring non-empty answer wins.
        Raises:
            DataError: a pair that is not two strings, or whose context or question is empty.
            ConfigError: an unknown or invalid generation override.
        """
        started = time.perf_counter()
        gen = self._generate_config(generate_overrides)
        threshold = self.no_answer_threshold(gen)
        measure = measure_no_answer or threshold is not None
        items = self._encode(pairs)
        # Longest first: similar lengths share a batch, and an out-of-memory batch shows up at once.
        order = sorted(range(len(items)), key=lambda i: -len(items[i].window.input_ids))
        size = self.batch_size(gen)
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        bar = _progress_bar(len(items)) if progress else None
        try:
            with self._runner.in_effect(gen):
                self._answer_batches(items, batches, gen, bar, measure)
        finally:
            if bar is not None:
                bar.close()
        answers = _best_per_pair(items, len(pairs), threshold)
        for answer, (context, _) in zip(answers, pairs):
            span = find_in_context(answer.text, context)
            answer.in_context = None if not answer.text else span is not None
            if span is not None:
                answer.answer_char_start, answer.answer_char_end = span
        self.stats.questions += len(pairs)
        self.stats.windows += len(items)
        self.stats.batches += len(batches)
        self.stats.seconds += time.perf_counter() - started
        return answers

    def _answer_batches(self, items: list[_Item], batches: list[list[int]], gen: GenerateConfig, bar: Any,
                        measure: bool) -> None:
        extra = {"measure_no_answer": True} if measure else {}
        for batch_indices in batches:
            batch = [items[i] for i in batch_indices]
            t0 = time.perf_counter()
            results = self._runner.run(batch, gen, self.max_new_tokens(gen), self.stats, **extra)
            share = (time.perf_counter() - t0) / len(batch)
            for item, result in zip(batch, results):
                item.text, item.score, item.seconds = result[0], result[1], share
                if len(result) > 2:  # measured: (text, score, no-answer score, candidate, candidate score)
                    item.no_answer_score, item.candidate, item.candidate_score = result[2:5]
            if bar is not None:
                bar.update(len(batch))

    def batch_size(self, gen: GenerateConfig | None = None) -> int:
        """Windows per batch that answering uses (GenerateConfig.batch_size, else the backend's choice)."""
        gen = gen or self.generate_config
        return gen.batch_size if gen.batch_size is not None else self._runner.batch_size(gen)

    def max_new_tokens(self, gen: GenerateConfig | None = None) -> int:
        """The answer length limit in tokens that decoding uses."""
        gen = gen or self.generate_config
        return int(gen.max_new_tokens or max(self.default_max_new_tokens, gen.min_new_tokens, 1))

    def no_answer_threshold(self, gen: GenerateConfig | None = None) -> float | None:
        """The no-answer threshold in effect: --no-answer-margin, else the model's calibrated one (unless
        --no-calibrated-no-answer), else None (the model's own choice)."""
        gen = gen or self.generate_config
        if gen.no_answer_margin is not None:
            return float(gen.no_answer_margin)
        return self.saved_no_answer_threshold if gen.calibrated_no_answer else None

    def generate_settings(self) -> GenerateConfig:
        """`generate_config` with max_new_tokens and no_answer_margin filled in: the one place the model's default
        answer length and calibrated no-answer threshold are applied (evaluate and the server use it too)."""
        return dataclasses.replace(self.generate_config, max_new_tokens=self.max_new_tokens(),
                                   no_answer_margin=self.no_answer_threshold())

    def _generate_config(self, overrides: dict[str, Any]) -> GenerateConfig:
        if not overrides:
            return self.generate_config
        known = {f.name for f in dataclasses.fields(GenerateConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        return dataclasses.replace(self.generate_config, **{k: v for k, v in overrides.items() if v is not None})

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[_Item]:
        """Tokenise all prompts in one call; only the prompts that are too long are cut into windows."""
        for index, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise DataError(f"pair {index}: expected (context, question) as two strings, got {pair!r:.80}")
            for name, text in (("context", pair[0]), ("question", pair[1])):
                if not text.strip():
                    raise DataError(f"pair {index}: empty {name}; every question needs a non-empty context and "
                                    "question")
        # Lone UTF-16 surrogates (JSON escapes such as "\ud800") cannot be tokenised; U+FFFD keeps every offset.
        pairs = [(_LONE_SURROGATE.sub("\ufffd", c), _LONE_SURROGATE.sub("\ufffd", q)) for c, q in pairs]
        cfg = self.encode_config
        sources = [format_source(cfg.prompt_template, question, context) for context, question in pairs]
        ids = self.tokenizer(sources)["input_ids"] if sources else []
        items: list[_Item] = []
        for index, ((context, question), input_ids) in enumerate(zip(pairs, ids)):
            if len(input_ids) <= cfg.max_source_tokens:
                items.append(_Item(index, Window(list(input_ids), 0, len(context), 0, 1), context))
            else:
                items.extend(_Item(index, w, context[w.context_char_start:w.context_char_end])
                             for w in encode_windows(self.tokenizer, question, context, cfg))
        return items


# ------------------------------------------------------------------------------------------------ backends
# What runs one batch of windows: (text, mean log-probability per token) for each.


class TorchBackend:
    """transformers' `generate` on the model (greedy or beam search), in eval mode and inference mode, with the
    CPU fast paths for answering (fastpath/answering.py) where they prove themselves: among them, for greedy
    search on the T5 family, a lean decoding loop in place of `generate` (fastpath/decoding.py)."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from t5qa.fastpath.answering import FastAnswering

        self.model, self.tokenizer = model, tokenizer
        self.fast = FastAnswering(model)

    def in_effect(self, gen: GenerateConfig) -> Any:
        """The block the batches of one call run in."""
        return self.fast.in_effect(gen.fast_answering)

    def batch_size(self, gen: GenerateConfig) -> int:
        """Windows per batch where `gen` names none: LEAN_BATCH_SIZE where the lean loop will answer (or has not
        been tried yet), else DEFAULT_BATCH_SIZE."""
        lean = self.fast.lean
        lean_answers = (gen.fast_answering and gen.num_beams == 1 and not gen.no_repeat_ngram_size
                        and lean is not None and (not lean.proven or lean.ready))
        return LEAN_BATCH_SIZE if lean_answers else DEFAULT_BATCH_SIZE

    def run(self, batch: list[_Item], gen: GenerateConfig, max_new_tokens: int, stats: InferenceStats,
            measure_no_answer: bool = False) -> list[tuple]:
        """(text, score) per window; with measure_no_answer, also the empty answer's log-probability and the best
        non-empty answer with its score."""
        import torch

        model = self.model
        device = _model_device(model)
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention_mask = pad_batch([item.window.input_ids for item in batch], pad_id)  # (batch, len)
        stats.real_tokens += int(attention_mask.sum())
        stats.padded_tokens += input_ids.numel()

        greedy = gen.num_beams == 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, num_beams=gen.num_beams, do_sample=False, use_cache=True,
            return_dict_in_generate=True, output_logits=greedy or measure_no_answer, output_scores=False,
        )
        # Given even at 0, so that a value in the model's generation_config.json does not replace the caller's.
        kwargs["min_new_tokens"] = gen.min_new_tokens
        kwargs["no_repeat_ngram_size"] = gen.no_repeat_ngram_size
        if not greedy:
            kwargs["length_penalty"] = gen.length_penalty
            kwargs["output_scores"] = True  # needed for sequences_scores
        constraint = None
        if gen.grounded:
            tokenizer = self.tokenizer
            contexts = tokenizer([item.context for item in batch], add_special_tokens=False)["input_ids"]
            never = [t for t in (tokenizer.unk_token_id, pad_id) if t is not None]
            constraint = SpanConstraint(contexts, tokenizer.eos_token_id, never)
        was_training = model.training
        model.eval()
        try:
            if gen.fast_answering:
                self.fast.prove(input_ids, attention_mask)
            # Greedy search without n-gram bans runs the lean loop (fastpath/decoding.py) where it has proven itself.
            lean = (self.fast.lean_decoding(input_ids, attention_mask, gen.fast_answering)
                    if greedy and not gen.no_repeat_ngram_size else None)
            with torch.inference_mode(), self.fast.linear(gen.fast_answering):
                if lean is not None:
                    allowed = constraint.allowed if constraint is not None else None
                    decoded = lean.decode(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                          min_new_tokens=gen.min_new_tokens, allowed=allowed)
                else:
                    if constraint is not None:
                        kwargs["prefix_allowed_tokens_fn"] = constraint.for_generate()
                    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                         **kwargs)
        finally:
            model.train(was_training)
        if lean is not None:
            generated, scores, first = decoded.tokens, decoded.scores, decoded.first_logits
        else:
            generated = out.sequences[:, 1:]  # (batch, new_tokens): drop the decoder start token
            if greedy:
                scores = _mean_log_prob(generated, out.logits, self.tokenizer.eos_token_id, pad_id)
            else:
                # Beam search already scores each sequence as sum(log p) / length ** length_penalty, which with
                # the default length_penalty=1 is the mean log-probability per token.
                scores = out.sequences_scores.float().tolist()
            # The first step's raw logits: one row per input (beam search repeats each input num_beams times,
            # and at the first step every beam of an input sees the same thing).
            first = out.logits[0].float()[::gen.num_beams] if measure_no_answer else None
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        results = [(text.strip(), float(score)) for text, score in zip(texts, scores)]
        if not measure_no_answer:
            return results
        empty_scores = torch.log_softmax(first, dim=-1)[:, self.tokenizer.eos_token_id].tolist()
        return _with_candidates(self, batch, gen, max_new_tokens, stats, results, empty_scores)


class CT2Backend:
    """A CTranslate2 Translator over a `t5qa export --format ct2` directory (fast CPU inference, int8 or fp32)."""

    name = "ct2"

    def __init__(self, directory: Path, tokenizer: Any, compute_type: str) -> None:
        self.tokenizer = tokenizer
        self.translator = _load_translator(directory, compute_type)

    def in_effect(self, gen: GenerateConfig) -> Any:
        """The block the batches of one call run in (CTranslate2 manages its own memory)."""
        return contextlib.nullcontext()

    def batch_size(self, gen: GenerateConfig) -> int:
        """Windows per batch where `gen` names none: DEFAULT_BATCH_SIZE (int8 on 2 cores: 28.5 questions/s in
        batches of 32 against 25.9 in batches of 64, each in a process of its own)."""
        return DEFAULT_BATCH_SIZE

    def run(self, batch: list[_Item], gen: GenerateConfig, max_new_tokens: int, stats: InferenceStats,
            measure_no_answer: bool = False) -> list[tuple]:
        """As TorchBackend.run; the empty answer's log-probability comes from CTranslate2's scoring of an empty
        target (one more pass over the batch)."""
        tokenizer = self.tokenizer
        sources = [tokenizer.convert_ids_to_tokens(item.window.input_ids) for item in batch]
        longest = max(len(s) for s in sources)
        # CTranslate2 takes no constraint function: grounded, it returns the first of its n-best hypotheses that
        # is in the context (beam search with at least GROUNDED_CT2_BEAMS beams), else the empty answer.
        beams = max(gen.num_beams, GROUNDED_CT2_BEAMS) if gen.grounded else gen.num_beams
        stats.real_tokens += sum(len(s) for s in sources)
        stats.padded_tokens += longest * len(sources)
        share = -(-len(sources) // max(1, self.translator.num_translators))  # one sub-batch per worker thread
        results = self.translator.translate_batch(
            sources,
            max_batch_size=share,
            beam_size=beams,
            num_hypotheses=beams if gen.grounded else 1,
            max_decoding_length=max_new_tokens,
            min_decoding_length=gen.min_new_tokens,
            length_penalty=gen.length_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            return_scores=True,
            return_end_token=True,
            max_input_length=0,  # windows already fit the model's input
        )
        out = []
        for item, result in zip(batch, results):
            texts = [tokenizer.decode(tokenizer.convert_tokens_to_ids(h), skip_special_tokens=True).strip()
                     for h in result.hypotheses]
            choice = 0
            if gen.grounded:
                choice = next((k for k, t in enumerate(texts) if not t or find_in_context(t, item.context)), -1)
                if choice < 0:
                    out.append(("", float(result.scores[-1]) if result.scores else float("-inf")))
                    continue
            tokens, text = result.hypotheses[choice], texts[choice]
            # CTranslate2's score is sum(log p) / length ** length_penalty over the tokens including </s>
            # (greedy search uses the same normalisation): with length_penalty=1, the mean per token.
            score = float(result.scores[choice]) if result.scores else float("-inf")
            if beams == 1 and gen.length_penalty != 1.0 and tokens:
                score = score * len(tokens) ** gen.length_penalty / len(tokens)
            out.append((text, score))
        if not measure_no_answer:
            return out
        scored = self.translator.score_batch(sources, [[] for _ in sources], max_input_length=0, max_batch_size=share)
        empty_scores = [float(r.log_probs[-1]) if r.log_probs else float("-inf") for r in scored]
        return _with_candidates(self, batch, gen, max_new_tokens, stats, out, empty_scores)


# ------------------------------------------------------------------------------------------------ helpers


def encode_config_from_meta(
    meta: dict[str, Any], *, stride_tokens: int | None = None, max_source_tokens: int | None = None
) -> EncodeConfig:
    """The EncodeConfig a saved model was trained with (t5qa.json's `encode`), with optional overrides.

    Directories written before t5qa kept `encode` in one place hold the settings at the top level or inside
    `train_config`; those are read the same way."""
    names = {f.name for f in dataclasses.fields(EncodeConfig)}
    saved = meta.get("encode")
    if not isinstance(saved, dict):
        older = meta.get("train_config", {}).get("encode") if isinstance(meta.get("train_config"), dict) else None
        saved = {**(older if isinstance(older, dict) else {}), **meta}
    values = {k: v for k, v in saved.items() if k in names and v is not None}
    if max_source_tokens is not None:
        values["max_source_tokens"] = max_source_tokens
        # The overlap follows the input length, as in training (EncodeConfig derives it), unless given too.
        values.pop("stride_tokens", None)
    if stride_tokens is not None:
        values["stride_tokens"] = stride_tokens
    return EncodeConfig(**values)


def with_tuned_decoding(generate: GenerateConfig, meta: dict[str, Any], chosen: Sequence[str] = ()) -> GenerateConfig:
    """`generate` with the setting `t5qa tune --decoding` saved (t5qa.json `decoding`) in every searched field the
    caller left at its default and did not name in `chosen`."""
    saved = meta.get(DECODING_META_KEY)
    settings = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(settings, dict):
        return generate
    defaults = GenerateConfig()
    tuned = {k: v for k, v in settings.items()
             if k in SEARCHED_DECODING and k not in chosen and getattr(generate, k) == getattr(defaults, k)}
    try:
        return dataclasses.replace(generate, **tuned) if tuned else generate
    except ConfigError as exc:
        logger.warning("the decoding settings saved with the model are not used (%s)", exc)
        return generate


def default_max_new_tokens(meta: dict[str, Any]) -> int:
    """The answer length limit for a saved model: its training answers' 99th percentile length, else its
    max_target_tokens, else FALLBACK_ANSWER_TOKENS (with a logged note)."""
    for key in ("answer_tokens_p99", "max_target_tokens"):
        value = meta.get(key)
        if isinstance(value, (int, float)) and value >= 1:
            return int(value)
    logger.info("the model directory records no answer length (t5qa.json answer_tokens_p99); answers are limited "
                "to %d tokens, change it with --max-new-tokens", FALLBACK_ANSWER_TOKENS)
    return FALLBACK_ANSWER_TOKENS


def _mean_log_prob(generated: Any, logits: Sequence[Any], eos_id: int, pad_id: int) -> list[float]:
    """Mean log-probability per generated token, up to and including the first </s>.

    Args:
        generated: (batch, steps) token ids chosen by greedy decoding.
        logits: one (batch, vocab) tensor of raw model logits per step.
    """
    import torch

    steps = min(generated.shape[1], len(logits))
    if steps == 0:
        return [0.0] * generated.shape[0]
    chosen = generated[:, :steps]
    per_step = torch.stack([
        torch.log_softmax(logits[t].float(), dim=-1).gather(1, chosen[:, t:t + 1]).squeeze(1) for t in range(steps)
    ], dim=1)  # (batch, steps)
    is_eos = chosen == eos_id
    # Positions after the first </s> are padding that finished sequences get while others still decode.
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    valid = ~after_eos
    total = (per_step * valid).sum(dim=1)
    counts = valid.sum(dim=1).clamp(min=1)
    return (total / counts).tolist()


def _with_candidates(backend: Any, batch: list[_Item], gen: GenerateConfig, max_new_tokens: int,
                     stats: InferenceStats, results: list[tuple[str, float]], empty_scores: list[float]) -> list[tuple]:
    """Add to each (text, score) the empty answer's score and the best non-empty answer: the answer itself, or,
    where the model chose the empty one, the same inputs decoded again with at least one token."""
    empty = [i for i, (text, _) in enumerate(results) if not text]
    again: dict[int, tuple[str, float]] = {}
    if empty and gen.min_new_tokens == 0:
        forced = dataclasses.replace(gen, min_new_tokens=1)
        again = dict(zip(empty, backend.run([batch[i] for i in empty], forced, max_new_tokens, stats)))
    return [(text, score, no_answer, *(again.get(i, ("", float("-inf"))) if not text else (text, score)))
            for i, ((text, score), no_answer) in enumerate(zip(results, empty_scores))]


def _best_per_pair(items: list[_Item], num_pairs: int, threshold: float | None = None) -> list[Answer]:
    """Pick, for each pair, the best window: non-empty answers beat empty ones, then the higher score. Where
    margins were measured, the window with the largest margin gives `margin` and `candidate`, and with a
    threshold it answers, with its candidate where the margin reaches the threshold and "" where it does not."""
    best: list[_Item | None] = [None] * num_pairs
    widest: list[_Item | None] = [None] * num_pairs
    seconds = [0.0] * num_pairs
    for item in items:
        seconds[item.pair_index] += item.seconds
        current = best[item.pair_index]
        if current is None or (bool(item.text), item.score) > (bool(current.text), current.score):
            best[item.pair_index] = item
        margin, leader = item.margin, widest[item.pair_index]
        if margin is not None and (leader is None or margin > leader.margin):  # type: ignore[operator]
            widest[item.pair_index] = item
    answers = []
    for index, (item, measured) in enumerate(zip(best, widest)):
        assert item is not None, "every pair has at least one window"
        text, score = item.text, item.score
        if measured is not None and threshold is not None:
            item = measured
            text = apply_threshold(item.candidate, item.margin, threshold)
            score = item.candidate_score if text else item.no_answer_score  # type: ignore[assignment]
        w = item.window
        answers.append(Answer(text, score, w.window_index, w.num_windows, seconds[index],
                              w.context_char_start, w.context_char_end,
                              margin=measured.margin if measured is not None else None,
                              candidate=measured.candidate if measured is not None else None,
                              no_answer_score=measured.no_answer_score if measured is not None else None))
    return answers


def _answering_device(device: str | None) -> str:
    import torch

    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_device(model: Any) -> Any:
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="input", desc="answering", dynamic_ncols=True)


def _load_translator(directory: Path, compute_type: str) -> Any:
    import torch

    from t5qa.errors import require

    ctranslate2 = require("ctranslate2", "ct2", "The CTranslate2 backend")
    if not (directory / CT2_MODEL_FILE).is_file():
        raise ModelError(f"{directory}: not a CTranslate2 model (no {CT2_MODEL_FILE}); create one with `t5qa export`")
    try:
        # The threads torch would use, each running its own share of a batch on one core (CT2Backend.run splits
        # every batch into that many): on 2 cores 1.5x the questions/s of one batch on two threads, whose
        # small products keep the second core waiting (bench/ANSWERING_RESULTS.md).
        return ctranslate2.Translator(str(directory), device="cpu", compute_type=compute_type,
                                      inter_threads=torch.get_num_threads(), intra_threads=1)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{directory}: cannot load the CTranslate2 model ({exc})") from None
