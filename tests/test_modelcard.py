"""The model card training writes into best/ and last/ (modelcard.py): Hugging Face's metadata, the scores with the
scorer that made them, the data and its cleaning, the settings, time and hardware, how to load it, its limits;
and no path of the training machine in it."""

from __future__ import annotations

import json
from pathlib import Path

from test_train import tiny_config
from t5qa.modelcard import CARD_FILE, model_card


def test_training_writes_a_card_with_the_runs_facts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.train import fit

    result = fit(tiny_config(tiny_model_dir, tmp_path, max_steps=4, eval_every_steps=2))
    summary = json.loads((result.output_dir / "summary.json").read_text())
    best = next(e for e in summary["eval_history"] if e["step"] == summary["best_step"])
    last = summary["final_metrics"]
    for directory, scores, step in ((result.best_dir, best, summary["best_step"]), (result.last_dir, last, 4)):
        card = (directory / CARD_FILE).read_text(encoding="utf-8")
        assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text2text-generation\n")
        assert f"| f1 | {scores['f1']:.2f} |" in card and f"| exact_match | {scores['exact_match']:.2f} |" in card
        assert "official SQuAD v1.1" in card and f"at step {step} " in card
        assert "`train.jsonl`, 24 examples after cleaning" in card and "- validation: `validation.jsonl`" in card
        assert "cleaning of the training data: 24 read, 24 kept" in card
        assert "| learning_rate | 0.001 |" in card and "| max_source_tokens | 128 |" in card
        assert "s in training steps and" in card and "s in evaluation, on cpu" in card
        assert "'question: {question} context: {context}'.format(question=question, context=context)" in card
        assert "t5qa predict --model MODEL" in card and "## Intended use and limits" in card
        assert str(tmp_path) not in card  # no local path: the card is meant to be published
        assert "base_model:" not in card  # the base is a local directory, not a Hub model


def _meta(model: str) -> dict:
    return {"train_config": {"model": model, "train": "/data/squad/train.json", "learning_rate": 3e-4},
            "encode": {"prompt_template": "q: {question} c: {context}", "max_source_tokens": 512},
            "answer_tokens_p99": 12}


def test_a_hub_base_is_named_and_a_chinese_run_names_its_scorer() -> None:
    card = model_card(_meta("google/mt5-small"), {"metric": "cmrc2018", "validation_examples": 50, "examples": 900},
                      {"best_step": 10, "eval_history": [{"step": 10, "f1": 61.5, "exact_match": 40.0}],
                       "steps": 10, "train_seconds": 12.0}, name="cmrc-run")
    assert "base_model: google/mt5-small" in card and "# cmrc-run" in card
    assert "official CMRC 2018" in card and "| f1 | 61.50 |" in card and "(50 questions)" in card
    assert "`train.json`" in card and "/data/squad" not in card
    assert "max_new_tokens=12" in card


def test_a_run_without_validation_says_it_was_not_evaluated() -> None:
    card = model_card(_meta("t5-small"), {"examples": 10}, {"steps": 3}, name="r")
    assert "not evaluated during training" in card and "base_model: t5-small" in card
