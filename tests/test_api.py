"""The Python API (`from t5qa import api`): the whole job from a notebook, and the same results
as the command line, which wraps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t5qa import api
from t5qa.cli import main
from t5qa.errors import ConfigError, DataError
from test_train import make_data


def test_the_whole_job_from_python_matches_the_cli(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = make_data(tmp_path)
    result = api.train(model=str(tiny_model_dir), train=str(data["train"]), validation=str(data["validation"]),
                        output=str(tmp_path / "run"), max_steps=3, train_batch_size=4, max_source_tokens=128,
                        learning_rate=1e-3, seed=5)
    assert result.steps == 3 and (result.best_dir / "t5qa.json").is_file()

    evaluated = api.evaluate(result.best_dir, data["validation"])
    assert evaluated.metric == "squad" and len(evaluated.predictions) == 6  # every question scored
    assert main(["evaluate", "--model", str(result.best_dir), "--data", str(data["validation"]), "--json"]) == 0
    cli_metrics = json.loads(capsys.readouterr().out)
    assert cli_metrics["exact_match"] == evaluated.metrics["exact_match"]
    assert cli_metrics["f1"] == evaluated.metrics["f1"]

    written = api.predict_file(result.best_dir, data["validation"], tmp_path / "answers.jsonl")
    rows = [json.loads(line) for line in written.output.read_text().splitlines()]
    assert written.questions == len(rows) == 6 and written.backend == "torch"
    predictor = api.load_predictor(result.best_dir)
    first = json.loads(data["validation"].read_text().splitlines()[0])
    assert predictor.answer(first["context"], first["question"]).text == rows[0]["prediction"]
    assert [r["prediction"] for r in rows] == [e["prediction"] for e in evaluated.predictions]

    official = api.predict_file(predictor, data["validation"], tmp_path / "answers.json")  # SQuAD's id -> answer
    assert json.loads(official.output.read_text()) == {r["id"]: r["prediction"] for r in rows}
    scored = api.score_predictions(official.output, data["validation"])
    assert scored.metrics["exact_match"] == evaluated.metrics["exact_match"]


def test_data_inspection_and_preparation(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_data(tmp_path)
    inspection = api.inspect_data(data["train"], model=str(tiny_model_dir))
    assert inspection.loaded["questions"] == 24 and inspection.stats is not None
    assert json.loads(json.dumps(inspection.to_dict()))["kept"]["questions"] == len(inspection.examples)
    inspection, report = api.prepare_data(data["train"], tmp_path / "splits")
    assert sum(info["questions"] for info in report["splits"].values()) == inspection.kept["questions"]
    assert json.loads((tmp_path / "splits" / "report.json").read_text())["splits"] == report["splits"]


def test_bad_input_is_one_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_data(tmp_path)
    with pytest.raises(ConfigError, match="unknown extension"):
        api.predict_file(tiny_model_dir, data["train"], tmp_path / "answers.xlsx")
    with pytest.raises(ConfigError, match="--max-examples"):
        api.evaluate(tiny_model_dir, data["train"], max_examples=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        api.inspect_data(empty)
