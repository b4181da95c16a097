"""Every model family the README names, end to end: train (long contexts in windows, CPU fast paths on),
evaluate, predict with windows, serve, and export to CTranslate2 where it supports the architecture; and the
CPU fast paths change nothing outside training and keep the training function for each family."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_same_training_step, synthetic_copy_examples
from families import CT2_FAMILIES, FAMILIES, build, byte_tokenizer
from t5qa.fastpath import dropout as fast_dropout
from t5qa.fastpath import linear as fast_linear
from t5qa.fastpath import norm as fast_norm
from t5qa.cli import main
from t5qa.data import QAExample, write_jsonl
from t5qa.modeling import save_model

ZH_CONTEXT = ("异常检测（anomaly detection）是机器学习的一个分支，用于发现与大多数数据显著不同的样本。"
              "异常检测的示例是信用卡欺诈检测：银行根据交易记录找出可疑的交易。") * 12  # > 2,000 bytes
ZH_QUESTION = "异常检测的示例是什么？"


def _tokenizer_for(family: str, tiny_tokenizer):
    return byte_tokenizer() if family == "byt5" else tiny_tokenizer


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["question: what is the code? context: the code is kilo . the city is oslo .",
                     "question: what city? context: the city is oslo ."], return_tensors="pt", padding=True)
    labels = tokenizer(text_target=["kilo", "oslo"], return_tensors="pt", padding=True).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    return {**enc, "labels": labels}


def _fast(model: nn.Module) -> nn.Module:
    fast = copy.deepcopy(model)
    fast_dropout.enable(fast)
    fast_linear.enable(fast)
    fast_norm.enable(fast)
    return fast


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_paths_keep_eval_logits_identical_and_the_training_function(family, tiny_tokenizer, monkeypatch):
    tokenizer = _tokenizer_for(family, tiny_tokenizer)
    plain = build(family, tokenizer)
    fast = _fast(plain)
    batch = _batch(tokenizer)
    plain.eval()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, fast(**batch).logits)  # bit for bit outside training
    # Training: with every dropout at 0 (so both draw nothing random) and the fast attention forced on, the
    # loss and every gradient agree with the stock code.
    monkeypatch.setattr(fast_dropout, "_runs_fast", lambda module, p, query: module.training)
    for module in list(plain.modules()) + list(fast.modules()):
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    assert_same_training_step(plain, fast, batch)


def test_t5gemma_keeps_its_soft_capped_attention(tiny_tokenizer):
    model = build("t5gemma", tiny_tokenizer)
    before = model.config._attn_implementation
    fast_dropout.enable(model)
    assert model.config._attn_implementation == before  # not verified: its own attention function stays
    assert model.config.encoder.attn_logit_softcapping is not None


def _train_data(family: str, tmp_path: Path) -> tuple[Path, list[QAExample]]:
    if family == "byt5":
        answer = "信用卡欺诈检测"
        start = ZH_CONTEXT.index(answer, len(ZH_CONTEXT) // 2)
        questions = [ZH_QUESTION, "哪种检测是异常检测的例子？", "银行找出什么？", "异常检测的一个示例？"]
        examples = [QAExample(f"zh-{k}", ZH_CONTEXT, q, (answer,), (start,)) for k, q in enumerate(questions)]
    else:
        examples = synthetic_copy_examples(8, seed=5, filler_words=40)  # longer than 64 tokens: windows
    path = tmp_path / "train.jsonl"
    write_jsonl(examples, path)
    return path, examples


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_evaluates_predicts_serves_and_exports(family, tiny_tokenizer, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from t5qa.serve import create_app_from_dir

    tokenizer = _tokenizer_for(family, tiny_tokenizer)
    model_dir = tmp_path / "model"
    save_model(build(family, tokenizer), tokenizer, model_dir, {})
    data, examples = _train_data(family, tmp_path)
    source_tokens = "256" if family == "byt5" else "64"
    assert main(["train", "--model", str(model_dir), "--train", str(data), "--validation", str(data),
                 "--output", str(tmp_path / "run"), "--max-steps", "2", "--train-batch-size", "4",
                 "--max-source-tokens", source_tokens, "--stride-tokens", str(int(source_tokens) // 4),
                 "--max-target-tokens", "24", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["examples_needing_window"] == len(examples)  # every context was longer than the input
    assert summary["metric"] == ("cmrc" if family == "byt5" else "squad")
    best = tmp_path / "run" / "best"
    capsys.readouterr()

    assert main(["evaluate", "--model", str(best), "--data", str(data), "--json", "--max-new-tokens", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == len(examples) and metrics["metric"] == summary["metric"]

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"context": ex.context, "question": ex.question}, ensure_ascii=False)
                                 + "\n" for ex in examples), encoding="utf-8")
    answers_file = tmp_path / "answers.jsonl"
    assert main(["predict", "--model", str(best), "--data", str(questions), "--output", str(answers_file),
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    answers = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines()]
    assert len(answers) == len(examples) and all(a["num_windows"] > 1 for a in answers)

    with TestClient(create_app_from_dir(best)) as client:
        response = client.post("/v1/answer", json={"context": examples[0].context, "question": examples[0].question,
                                                   "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["answers"][0]["text"] == answers[0]["prediction"]
    capsys.readouterr()

    pytest.importorskip("ctranslate2")
    code = main(["export", "--model", str(best), "--output", str(tmp_path / "ct2")])
    if family in CT2_FAMILIES:
        assert code == 0 and (tmp_path / "ct2" / "model.bin").is_file()
        assert main(["predict", "--model", str(tmp_path / "ct2"), "--backend", "ct2", "--data", str(questions),
                     "--output", str(tmp_path / "ct2.jsonl"), "--max-new-tokens", "4", "--no-progress"]) == 0
    else:
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "CTranslate2 cannot convert" in err[0], err


def test_a_model_that_is_not_seq2seq_is_refused_in_one_line(tiny_tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer),
                               bos_token_id=1, eos_token_id=1)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data, _ = _train_data("t5-v1.0", tmp_path)
    for argv in (["train", "--model", str(model_dir), "--train", str(data), "--output", str(tmp_path / "run")],
                 ["predict", "--model", str(model_dir), "--context", "the code is kilo .", "--question", "code?"]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "not a sequence-to-sequence model" in err[0], err
