"""`t5qa train` on the command line: config precedence, saved config, one-line errors, and that it learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from conftest import FILLER, KEYS, VALUES
from t5qa.cli import main
from t5qa.data import QAExample, write_jsonl
from test_train import make_data


def base_args(model_dir: Path, root: Path) -> list[str]:
    data = make_data(root)
    return ["train", "--model", str(model_dir), "--train", str(data["train"]), "--validation",
            str(data["validation"]), "--output", str(root / "run"), "--max-source-tokens", "128",
            "--stride-tokens", "32", "--max-target-tokens", "16", "--no-progress"]


def test_flags_override_the_yaml_file_and_the_resolved_config_is_saved(tiny_model_dir: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.001\ntrain_batch_size: 3\nmax_steps: 2\nencode:\n  max_target_tokens: 8\n"
                      "lr_scheduler: cosine\n", encoding="utf-8")
    args = base_args(tiny_model_dir, tmp_path)
    args.remove("--max-target-tokens")
    args.remove("16")
    code = main([*args, "--config", str(config), "--learning-rate", "0.002"])
    assert code == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["learning_rate"] == 0.002          # the flag beat the file
    assert saved["train_batch_size"] == 3            # the file beat the default
    assert saved["lr_scheduler"] == "cosine"
    assert saved["encode"]["max_target_tokens"] == 8
    assert saved["encode"]["max_source_tokens"] == 128
    assert saved["resume"] is False
    meta = json.loads((tmp_path / "run" / "last" / "t5qa.json").read_text())
    assert meta["train_config"]["learning_rate"] == 0.002 and meta["encode"]["max_target_tokens"] == 8
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and str(tmp_path / "run" / "best") in out and "report:" in out


def test_fp16_with_t5_is_one_error_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main([*base_args(tiny_model_dir, tmp_path), "--precision", "fp16", "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: --precision fp16 is refused for T5") and "bf16" in errors[0]


def test_missing_train_file_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run")])
    assert code == 2
    assert "--train is required" in capsys.readouterr().err


def test_unknown_yaml_key_is_named(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.001\n", encoding="utf-8")
    code = main([*base_args(tiny_model_dir, tmp_path), "--config", str(config)])
    assert code == 2
    assert "learning_rat" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ learning


def fact_examples(n: int, seed: int) -> list[QAExample]:
    """One "the <key> is <value>" fact among filler phrases; the question asks for the key's value."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        key, value = rng.choice(KEYS), rng.choice(VALUES)
        parts = [f"the {key} is {value}"] + [f"{rng.choice(FILLER)} {rng.choice(FILLER)}" for _ in range(3)]
        rng.shuffle(parts)
        context = " . ".join(parts) + " ."
        examples.append(QAExample(id=f"fact-{seed}-{i}", context=context, question=f"what is the {key}?",
                                  answers=(value,), answer_starts=(context.index(f"is {value}") + 3,)))
    return examples


def word_tokenizer(texts: list[str], directory: Path):
    """A word-level tokenizer (one token per word, T5 special ids) so a tiny model copies one token per answer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def test_a_tiny_model_learns_the_copy_task_from_scratch(tmp_path: Path) -> None:
    from t5qa.modeling import init_model

    train, held_out = fact_examples(1200, seed=0), fact_examples(100, seed=1)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(held_out, tmp_path / "validation.jsonl")
    texts = [e.context for e in train] + [e.question for e in train] + ["question: context:"]
    word_tokenizer(texts, tmp_path / "tokenizer")
    init_model("tiny", str(tmp_path / "tokenizer"), tmp_path / "model", seed=0)

    code = main(["train", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"),
                 "--validation", str(tmp_path / "validation.jsonl"), "--output", str(tmp_path / "run"),
                 "--learning-rate", "3e-3", "--max-steps", "200", "--warmup-steps", "10", "--train-batch-size", "16",
                 "--eval-every-steps", "100", "--max-source-tokens", "64", "--stride-tokens", "16",
                 "--max-target-tokens", "8", "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in rows if r["split"] == "validation"]
    assert validation[-1]["step"] == 200
    # Held-out contexts (another seed), EM on the 0-100 scale of the SQuAD scorer.
    assert validation[-1]["exact_match"] >= 90, validation
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_metric"] >= 90
