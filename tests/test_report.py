"""Plots and run reports from a synthetic run directory (tests/fixtures/report/run + a config saved by config.py)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from t5qa import report, rundir
from t5qa.config import EncodeConfig, TrainConfig, save_yaml
from t5qa.errors import ConfigError, DataError

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "report" / "run"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must follow the signature in a valid PNG."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """The fixture run plus a config.yaml written the way train.py writes it."""
    directory = tmp_path / "my-run"
    shutil.copytree(FIXTURE_RUN, directory)
    config = TrainConfig(model="models/tiny-model-dir", train="data/train-file.jsonl", validation="data/val.jsonl",
                         output=str(directory), learning_rate=5e-4, max_steps=100, train_batch_size=4,
                         lr_scheduler="cosine", precision="bf16", seed=7, encode=EncodeConfig(max_source_tokens=384))
    save_yaml(config, directory / "config.yaml")
    return directory


def _train_only_run(directory: Path) -> Path:
    directory.mkdir()
    lines = [{"step": s, "epoch": s / 40, "split": "train", "loss": 3.0 - s / 100, "learning_rate": 1e-3}
             for s in (10, 20, 30, 40)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")
    save_yaml(TrainConfig(model="t5-small"), directory / "config.yaml")
    return directory


def test_make_plots_writes_three_valid_pngs(run_dir: Path) -> None:
    paths = report.make_plots(run_dir)
    assert [p.name for p in paths] == ["loss.png", "learning_rate.png", "em_f1.png"]
    for path in paths:
        assert path.parent == run_dir
        assert _png_size(path.read_bytes()) == (640, 400)


def test_loss_plot_has_train_and_validation_and_em_f1_has_both_metrics(run_dir: Path, monkeypatch) -> None:
    drawn: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    monkeypatch.setattr(report, "_plot", lambda path, title, ylabel, lines: drawn.update({path.name: dict(lines)}))
    report.make_plots(run_dir)
    assert drawn["loss.png"]["train"][0] == [10.0 * i for i in range(1, 11)]
    assert drawn["loss.png"]["validation"] == ([50.0, 100.0], [1.5, 1.234])
    assert drawn["learning_rate.png"]["learning rate"][1][0] == pytest.approx(0.00045)
    assert drawn["em_f1.png"] == {"exact match": ([50.0, 100.0], [45.0, 42.5]), "F1": ([50.0, 100.0], [56.5, 55.25])}


def test_markdown_report_has_config_metrics_plots_and_samples(run_dir: Path) -> None:
    path = report.write_report(run_dir, fmt="md")
    assert path == run_dir / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# t5qa run report: my-run")
    # config values, key settings first
    for row in ("| model | models/tiny-model-dir |", "| train | data/train-file.jsonl |", "| max_steps | 100 |",
                "| learning_rate | 0.0005 |", "| lr_scheduler | cosine |", "| precision | bf16 |", "| seed | 7 |",
                "| encode.max_source_tokens | 384 |", "| train_batch_size | 4 |"):
        assert row in text, row
    assert text.index("| model |") < text.index("| seed |") < text.index("| data.val_fraction |")
    # final metrics from summary.json, best from the step-50 evaluation
    assert "| f1 | 55.25 | 56.5 |" in text
    assert "| exact_match | 42.5 | 45 |" in text
    assert "| token_accuracy | 0.615 | 0.6 |" in text
    assert "Best checkpoint: step 50 by f1." in text
    assert "| optimizer steps | 100 |" in text and "| seconds in training steps | 1,234.5 |" in text
    assert "| seconds in evaluation | 98.7 |" in text
    assert "| mean samples per second | 45.5 |" in text
    # plots linked relatively
    for name in ("loss.png", "learning_rate.png", "em_f1.png"):
        assert f"]({name})" in text and (run_dir / name).is_file()
    # five right answers of six; five wrong answers with the lowest F1 (w6, F1 0.9, is left out)
    right, wrong = text.split("## Sample right answers")[1].split("## Sample wrong answers")
    assert [f"Right question {i}?" in right for i in range(1, 7)] == [True] * 5 + [False]
    assert "right answer 3 | right answer 3; another |" in right
    assert re.findall(r"^\| (w\d) \|", wrong, flags=re.M) == ["w1", "w4", "w3", "w2", "w5"]
    assert "| w4 | Unanswerable question four? | Paris | (no answer) | 0 | no |" in wrong
    assert "Wrong question six" not in text
    # user text is escaped in Markdown too, so a renderer shows it instead of running it
    assert "<script>" not in text and "&lt;script&gt;alert('x')&lt;/script&gt;" in text


def test_html_report_is_self_contained_and_escapes_user_text(run_dir: Path) -> None:
    path = report.write_report(run_dir, fmt="html")
    assert path == run_dir / "report.html"
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text
    assert "What does &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; print?" in text
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', text)
    assert len(images) == 4  # loss, learning rate, EM/F1, and the error-analysis chart
    for data in images[:3]:
        assert _png_size(base64.b64decode(data)) == (640, 400)
    assert _png_size(base64.b64decode(images[3]))[0] == 1100  # seven small charts, two per row
    assert 'src="loss.png"' not in text
    assert "<td>models/tiny-model-dir</td>" in text and "<td>55.25</td>" in text


def test_run_without_validation_has_no_em_f1_plot_and_says_so(tmp_path: Path) -> None:
    directory = _train_only_run(tmp_path / "train-only")
    paths = report.make_plots(directory)
    assert [p.name for p in paths] == ["loss.png", "learning_rate.png"]
    assert not (directory / "em_f1.png").exists()
    text = report.write_report(directory).read_text(encoding="utf-8")
    assert "No evaluation was run" in text
    assert "](loss.png)" in text and "em_f1.png" not in text
    assert f"No {rundir.PREDICTIONS_FILE} in the run directory." in text


def test_missing_or_empty_metrics_give_no_plots_and_a_report(tmp_path: Path) -> None:
    assert report.make_plots(tmp_path) == []
    text = report.write_report(tmp_path).read_text(encoding="utf-8")
    assert "No plots: metrics.jsonl not found." in text and "No config.yaml in the run directory." in text
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    assert report.make_plots(tmp_path) == []
    assert "No plots: metrics.jsonl has no values to draw." in report.write_report(tmp_path).read_text("utf-8")


def test_resumed_steps_keep_last_record_and_cut_lines_are_skipped(tmp_path: Path) -> None:
    lines = [
        '{"step": 10, "split": "train", "loss": 3.0}',
        '{"step": 20, "split": "train", "loss": 9.9}',        # logged before a crash, repeated after resume
        '{"step": 20, "split": "train", "loss": 2.0}',
        '{"step": 20, "split": "validation", "loss": 2.5, "f1": 10.0}',
        '{"step": 30, "split": "train", "lo',                  # cut off mid-write
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
    splits = rundir.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in splits["train"]] == [(10, 3.0), (20, 2.0)]
    assert [r["f1"] for r in splits["validation"]] == [10.0]
    text = report.write_report(tmp_path).read_text(encoding="utf-8")
    assert "metrics.jsonl line 5: not a JSON object, skipped" in text


def test_best_is_computed_from_metrics_when_there_is_no_summary(run_dir: Path) -> None:
    (run_dir / "summary.json").unlink()
    text = report.write_report(run_dir).read_text(encoding="utf-8")
    assert "Best checkpoint: step 50 by f1." in text
    assert "| f1 | 55.25 | 56.5 |" in text  # final = the last evaluation line


def test_bad_format_and_missing_directory_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--report-format must be one of md, html"):
        report.write_report(tmp_path, fmt="pdf")
    with pytest.raises(DataError, match="nowhere: run directory not found"):
        report.write_report(tmp_path / "nowhere")
