"""The request and response models of `t5qa serve`'s JSON API (pydantic; imported only when serving).

They check shapes and types (unknown fields and wrong types are refused); the server's limits (`ServeLimits`),
which a request cannot see here, are checked by the app, and /health reports them.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_STRICT = ConfigDict(extra="forbid", strict=True)


class Pair(BaseModel):
    model_config = _STRICT
    context: str = Field(description="The text that holds the answer.")
    question: str = Field(description="The question about the context.")


class AnswerRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [
            {"context": "The Eiffel Tower is in Paris.", "question": "Where is the Eiffel Tower?"},
            {"pairs": [{"context": "Ada wrote the first program.", "question": "Who wrote it?"}],
             "num_beams": 4, "max_new_tokens": 16},
        ]},
    )
    context: str | None = Field(None, description="One context (with `question`).")
    question: str | None = Field(None, description="One question (with `context`).")
    pairs: list[Pair] | None = Field(
        None, description="Several pairs instead of one (at most the server's max_pairs_per_request; see "
                          "/health).")
    num_beams: int | None = Field(None, description="Beam width, 1 to the server's max_num_beams.")
    max_new_tokens: int | None = Field(None, description="Longest answer in tokens, 1 to the server's "
                                                         "max_new_tokens_cap.")
    min_new_tokens: int | None = Field(None, description="Shortest answer in tokens.")
    length_penalty: float | None = Field(None, ge=-10.0, le=10.0, description="Beam-search length penalty.")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=20, description="Forbid repeated n-grams.")
    grounded: bool | None = Field(None, description="Constrain the answer to a span of the context (or empty).")
    no_answer_margin: float | None = Field(
        None, ge=-1000.0, le=1000.0, description="Answer only when the answer's score beats the empty answer's by "
                                               "this margin (default: the threshold calibrated with the model, if any).")

    @model_validator(mode="after")
    def one_form(self) -> "AnswerRequest":
        single = self.context is not None or self.question is not None
        if single and self.pairs is not None:
            raise ValueError("send either context + question, or pairs, not both")
        if self.pairs is None and (self.context is None or self.question is None):
            missing = [n for n in ("context", "question") if getattr(self, n) is None]
            raise ValueError(f"missing {' and '.join(missing)}; send {{\"context\": \"...\", "
                             f"\"question\": \"...\"}} or {{\"pairs\": [...]}}")
        if self.pairs is not None and not self.pairs:
            raise ValueError("pairs is empty; send at least one {\"context\", \"question\"} pair")
        return self

    def pairs_list(self) -> list[tuple[str, str]]:
        if self.pairs is None:
            return [(self.context or "", self.question or "")]
        return [(p.context, p.question) for p in self.pairs]


class AnswerOut(BaseModel):
    text: str = Field(description="The answer.")
    score: float | None = Field(description="Mean log-probability per answer token (higher is surer).")
    window_index: int = Field(description="Which window of a long context the answer came from (0-based).")
    num_windows: int = Field(description="How many windows the context was cut into.")
    window_char_start: int = Field(0, description="Where the answering window starts in the context "
                                                  "(character offset).")
    window_char_end: int = Field(0, description="Where the answering window ends (exclusive).")
    seconds: float | None = Field(None, description="This pair's share of the model time.")
    in_context: bool | None = Field(None, description="Whether the answer is in the context (null when empty).")
    answer_char_start: int | None = Field(None, description="Where the answer starts in the context, when it is "
                                                            "there (character offset).")
    answer_char_end: int | None = Field(None, description="Where it ends (exclusive).")
    margin: float | None = Field(None, description="Where a no-answer threshold applies: the best non-empty "
                                                   "answer's score minus the empty answer's.")
    candidate: str | None = Field(None, description="Where a no-answer threshold applies: the best non-empty "
                                                    "answer, also when the empty one was returned.")

    @classmethod
    def from_answer(cls, answer: Any) -> "AnswerOut":
        score = float(answer.score) if answer.score is not None else None
        return cls(text=answer.text, score=score if score is not None and math.isfinite(score) else None,
                   window_index=answer.window_index, num_windows=answer.num_windows,
                   window_char_start=getattr(answer, "window_char_start", 0),
                   window_char_end=getattr(answer, "window_char_end", 0),
                   seconds=getattr(answer, "seconds", None), margin=_finite(getattr(answer, "margin", None)),
                   candidate=getattr(answer, "candidate", None), in_context=getattr(answer, "in_context", None),
                   answer_char_start=getattr(answer, "answer_char_start", None),
                   answer_char_end=getattr(answer, "answer_char_end", None))


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


class AnswerResponse(BaseModel):
    answer: AnswerOut | None = Field(None, description="The answer of a single-question request.")
    answers: list[AnswerOut] = Field(description="One answer per pair, in request order.")
    model_seconds: float = Field(description="Wall time of the model call that answered this request "
                                             "(shared with the requests batched with it).")
    server_seconds: float = Field(description="Time from request arrival to response: queue wait + model.")
    batch_pairs: int = Field(description="Pairs in that model call (this request's and others').")


class HealthResponse(BaseModel):
    status: str
    model: str = Field(description="The model's name (its model card's title, or --model-name); never a path on "
                                   "the server's disk.")
    base_model: str | None = Field(None, description="The model it was fine-tuned from, when t5qa trained it.")
    backend: str | None
    uptime_seconds: float
    queue_size: int = Field(description="Pairs waiting for the model.")
    requests_served: int
    batches_run: int
    max_batch_size: int
    max_wait_ms: float
    api_key_required: bool
    limits: dict[str, int]


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong and how to fix it.")
