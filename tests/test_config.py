"""Config resolution: defaults < YAML < flags, and every problem reported at once."""

from __future__ import annotations

import dataclasses

import pytest

from t5qa.config import TrainConfig, load_train_config, save_yaml
from t5qa.errors import ConfigError


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-3\nepochs: 5\nencode:\n  max_source_tokens: 384\n", encoding="utf-8")
    cfg = load_train_config(path, epochs=2, train_batch_size=None)
    assert cfg.learning_rate == 1e-3 and cfg.epochs == 2.0
    assert cfg.encode.max_source_tokens == 384 and cfg.train_batch_size == TrainConfig().train_batch_size


def test_saved_yaml_round_trips(tmp_path):
    cfg = load_train_config(None, max_target_tokens=30, lora_target_modules="q,k,v", val_fraction=0.2)
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_train_config(tmp_path / "c.yaml") == cfg


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_train_config(None, epochs=-1, optimizer="sgd", learning_rate=0)
    message = str(info.value)
    assert "--epochs" in message and "--optimizer" in message and "--learning-rate" in message


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learnin_rate: 1e-3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml.*learnin_rate"):
        load_train_config(path)


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line"):
        load_train_config(path)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="epochs"):
        load_train_config(None, epochs="three")


def test_the_split_seed_and_the_training_seed_are_separate_flags(tmp_path):
    from t5qa.cli import build_parser
    from t5qa.cli.common import config_overrides

    args = build_parser().parse_args(["train", "--train", "t.jsonl", "--output", str(tmp_path / "run"),
                                      "--seed", "5", "--split-seed", "3"])
    cfg = load_train_config(None, **config_overrides(args, TrainConfig))
    assert (cfg.seed, cfg.data.split_seed) == (5, 3)
    default = load_train_config(None, **config_overrides(build_parser().parse_args(
        ["train", "--train", "t.jsonl", "--output", str(tmp_path / "run"), "--seed", "5"]), TrainConfig))
    assert default.data.split_seed == TrainConfig().data.split_seed


def test_the_window_overlap_follows_a_changed_input_length_unless_set():
    assert load_train_config(None).encode.stride_tokens == 128
    assert load_train_config(None, max_source_tokens=64).encode.stride_tokens == 16
    assert load_train_config(None, max_source_tokens=64, stride_tokens=8).encode.stride_tokens == 8
    with pytest.raises(ConfigError, match="--stride-tokens"):
        load_train_config(None, max_source_tokens=64, stride_tokens=64)


def test_evaluation_batch_is_the_answering_batch_and_old_configs_still_load(tmp_path) -> None:
    from t5qa.config import TrainConfig

    assert "eval_batch_size" not in {f.name for f in dataclasses.fields(TrainConfig)}
    old = tmp_path / "config.yaml"  # a run directory's config.yaml from before the rename
    old.write_text("model: m\ntrain: t.json\neval_batch_size: 12\n", encoding="utf-8")
    assert load_train_config(old).generate.batch_size == 12
