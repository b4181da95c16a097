"""Uploading to the Hub (hub.py, `t5qa push`, `train --push-to-hub`): huggingface_hub's own calls with the model
directory, its card and the repository settings; one line when the Hub cannot be reached, the run kept."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from test_train import tiny_config
from t5qa.errors import ConfigError, ModelError
from t5qa.hub import push_model


class FakeApi:
    """Records huggingface_hub.HfApi's calls (the upload itself is the library's; the Hub is not reachable)."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        assert (Path(kwargs["folder_path"]) / "README.md").is_file(), "the model card goes up with the model"


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_training_pushes_best_with_its_card(tiny_model_dir: Path, tmp_path: Path, fake_hub) -> None:
    from t5qa.train import fit

    result = fit(tiny_config(tiny_model_dir, tmp_path, push_to_hub="me/qa-model"))
    create = next(kw for name, kw in fake_hub if name == "create_repo")
    upload = next(kw for name, kw in fake_hub if name == "upload_folder")
    assert create == {"repo_id": "me/qa-model", "private": False, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/qa-model" and Path(upload["folder_path"]) == result.best_dir


def test_push_from_the_command_line(tiny_model_dir: Path, tmp_path: Path, fake_hub, capsys) -> None:
    import shutil

    from t5qa.cli import main

    model = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model)
    (model / "README.md").write_text("card", encoding="utf-8")
    assert main(["push", str(model), "--repo", "qa", "--private", "--token", "hf_x"]) == 0
    assert "pushed" in capsys.readouterr().out and ("init", {"token": "hf_x"}) in fake_hub
    assert next(kw for name, kw in fake_hub if name == "create_repo")["private"] is True


def test_an_unreachable_hub_is_one_line_and_training_still_finishes(tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch, caplog) -> None:
    from t5qa.train import fit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING, logger="t5qa.train"):
        result = fit(tiny_config(tiny_model_dir, tmp_path, push_to_hub="me/qa-model"))
    assert (result.best_dir / "model.safetensors").is_file()
    lines = [r.getMessage() for r in caplog.records if "Hugging Face Hub" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "t5qa push" in lines[0]


def test_bad_input_is_one_clear_error(tmp_path: Path, fake_hub) -> None:
    with pytest.raises(ModelError, match="not a saved model"):
        push_model(tmp_path, "me/x")


def test_a_bad_repo_name_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises((ConfigError, ModelError)):
        push_model(tiny_model_dir, "not a/valid/repo name")
