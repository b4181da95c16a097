"""Decoding search (`t5qa tune --decoding`): the F1-best generation settings of a trained model, written into it and
then used by predict."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import synthetic_copy_examples
from t5qa.config import GenerateConfig
from t5qa.predict import Predictor

pytest.importorskip("optuna", reason="the tune extra (optuna) is not installed")


@pytest.fixture()
def model_and_data(chatty_model_dir: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A model copy and validation data whose references are the model's own answers at two tokens (the model's
    default is four), so the F1-best setting is known."""
    from t5qa.data import write_jsonl

    model_dir = tmp_path / "model"
    shutil.copytree(chatty_model_dir, model_dir)
    examples = synthetic_copy_examples(10, seed=41)
    short = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=2)).answer_many(
        [(ex.context, ex.question) for ex in examples])
    assert Predictor.from_pretrained(model_dir).max_new_tokens() == 4
    write_jsonl([dataclasses.replace(ex, answers=(a.text,), answer_starts=(-1,)) for ex, a in zip(examples, short)],
                tmp_path / "validation.jsonl")
    return model_dir, tmp_path / "validation.jsonl", [a.text for a in short]


def test_the_search_writes_the_best_settings_and_predict_uses_them(model_and_data) -> None:
    from t5qa.tune_decoding import search_decoding

    model_dir, validation, references = model_and_data
    result = search_decoding(model_dir, validation, trials=4, space={"max_new_tokens": [2, 4], "num_beams": [1]})
    assert result.best["max_new_tokens"] == 2 and result.f1_after == 100.0 and result.f1_before < 100.0
    assert result.written and {r["max_new_tokens"] for r in result.trials} == {2, 4}  # every combination tried
    assert json.loads((model_dir / "generation_config.json").read_text())["max_new_tokens"] == 2
    saved = json.loads((model_dir / "t5qa.json").read_text())["decoding"]
    assert saved["settings"]["max_new_tokens"] == 2 and saved["f1_after"] == 100.0

    tuned = Predictor.from_pretrained(model_dir)
    assert tuned.max_new_tokens() == 2
    examples = [json.loads(line) for line in validation.read_text().splitlines()]
    assert [a.text for a in tuned.answer_many([(e["context"], e["question"]) for e in examples])] == references
    # A setting the caller gives is kept.
    assert Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4)).max_new_tokens() == 4
    # ...also where it equals the default, when the caller names it (as the commands do with every flag given).
    assert Predictor.from_pretrained(model_dir, chosen=("max_new_tokens",)).max_new_tokens() == 4

    again = search_decoding(model_dir, validation, trials=4, space={"max_new_tokens": [2, 4], "num_beams": [1]})
    assert again.f1_before == 100.0 and not again.written  # nothing better to write


def test_tune_decoding_from_the_command_line(model_and_data, capsys) -> None:
    from t5qa.cli import main

    model_dir, validation, _ = model_and_data
    assert main(["tune", "--decoding", "--model", str(model_dir), "--validation", str(validation),
                 "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "current" in out and "num_beams" in out and " F1 " in out and "after 4 trials" in out
    assert main(["tune", "--decoding", "--model", str(model_dir)]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_a_bad_space_is_one_clear_error(model_and_data) -> None:
    from t5qa.errors import ConfigError
    from t5qa.tune_decoding import search_decoding

    model_dir, validation, _ = model_and_data
    with pytest.raises(ConfigError, match="unknown setting.*temperature"):
        search_decoding(model_dir, validation, space={"temperature": [0.5]})
    with pytest.raises(ConfigError, match="num_beams=0"):
        search_decoding(model_dir, validation, space={"num_beams": [0, 1]})


def test_grounding_is_searched_and_applied(chatty_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.data import write_jsonl
    from t5qa.tune_decoding import search_decoding

    model_dir = tmp_path / "model"
    shutil.copytree(chatty_model_dir, model_dir)
    examples = synthetic_copy_examples(10, seed=43)
    pairs = [(ex.context, ex.question) for ex in examples]
    grounded = Predictor.from_pretrained(model_dir, generate=GenerateConfig(grounded=True)).answer_many(pairs)
    free = Predictor.from_pretrained(model_dir).answer_many(pairs)
    assert [a.text for a in grounded] != [a.text for a in free]  # the untrained model answers outside its context
    write_jsonl([dataclasses.replace(ex, answers=(a.text,), answer_starts=(-1,)) for ex, a in zip(examples, grounded)],
                tmp_path / "validation.jsonl")
    result = search_decoding(model_dir, tmp_path / "validation.jsonl", trials=2,
                             space={"grounded": [False, True], "num_beams": [1]})
    assert result.best["grounded"] is True and result.f1_after == 100.0 and result.written
    assert "grounded" not in json.loads((model_dir / "generation_config.json").read_text())  # t5qa's own setting
    tuned = Predictor.from_pretrained(model_dir)
    assert tuned.generate_config.grounded
    assert [a.text for a in tuned.answer_many(pairs)] == [a.text for a in grounded]
