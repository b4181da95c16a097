"""evaluate_model / evaluate_predictions: metrics, per-example rows, sharding over processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT, synthetic_copy_examples
from t5qa.config import EncodeConfig, GenerateConfig
from t5qa.data import QAExample
from t5qa.encode import encode_for_training, make_collator
from t5qa.errors import DataError
from t5qa.evaluate import (EvalResult, evaluate_model, evaluate_predictions, read_predictions,
                           write_predictions)
from t5qa.metrics import score_predictions
from t5qa.predict import Answer, Predictor, TorchBackend

ENCODE = EncodeConfig(max_source_tokens=128, stride_tokens=32, max_target_tokens=8)
GENERATE = GenerateConfig(max_new_tokens=4)
ROW_KEYS = {"id", "question", "prediction", "references", "exact_match", "f1", "answer_in_input", "window"}


@pytest.fixture(scope="module")
def examples():
    rows = synthetic_copy_examples(5, seed=11)
    # One unanswerable question, so the SQuAD v2 groups appear.
    rows.append(QAExample(id="none-1", context=rows[0].context, question="what is the moon?", answers=(),
                          answer_starts=()))
    return rows


def test_metrics_and_rows(tiny_model, examples):
    model, tokenizer = tiny_model
    result = evaluate_model(model, tokenizer, examples, ENCODE, GENERATE, batch_size=4)
    assert isinstance(result, EvalResult)
    for key in ("loss", "token_accuracy", "exact_match", "f1", "count", "HasAns_f1", "NoAns_f1"):
        assert key in result.metrics
    assert result.metrics["count"] == len(examples)
    assert [row["id"] for row in result.predictions] == [ex.id for ex in examples]
    for row, ex in zip(result.predictions, examples):
        assert ROW_KEYS <= set(row)
        assert row["references"] == list(ex.answers) and row["question"] == ex.question
        assert row["window"] == 0
    assert [row["answer_in_input"] for row in result.predictions] == [True] * 5 + [None]
    # EM/F1 are exactly the official scorer's over the same predictions.
    assert result.metric == "squad_v2"  # chosen from the data: one question has no answer
    expected = score_predictions("squad_v2", [(r["id"], r["prediction"], r["references"])
                                              for r in result.predictions])
    assert result.metrics["exact_match"] == expected["exact_match"]
    assert result.metrics["f1"] == expected["f1"]


def test_loss_is_mean_over_target_tokens(tiny_model, examples):
    model, tokenizer = tiny_model
    result = evaluate_model(model, tokenizer, examples, ENCODE, GENERATE, batch_size=3)
    features, _ = encode_for_training(examples, tokenizer, ENCODE)
    collate = make_collator(tokenizer)
    total, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for f in features:  # one at a time: no padding at all
            batch = collate([f])
            batch.pop("example_index")
            out = model(**batch)
            n = len(f["labels"])
            total += float(out.loss) * n  # HF loss is the mean over this example's n target tokens
            tokens += n
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    assert result.metrics["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result.metrics["token_accuracy"] == pytest.approx(correct / tokens)


def test_perfect_answers_score_100(tiny_model, examples, monkeypatch):
    model, tokenizer = tiny_model
    gold = {(ex.context, ex.question): (ex.answers[0] if ex.answers else "") for ex in examples}

    def perfect(self, pairs, **kwargs):
        return [Answer(gold[p], -0.1, 0, 1, 0.0, 0, len(p[0])) for p in pairs]

    monkeypatch.setattr(Predictor, "answer_many", perfect)
    result = evaluate_model(model, tokenizer, examples, ENCODE, GENERATE, batch_size=4, max_examples=4)
    assert result.metrics["exact_match"] == 100.0 and result.metrics["f1"] == 100.0
    assert result.metrics["count"] == 4 and len(result.predictions) == 4
    assert all(row["exact_match"] == 1.0 and row["f1"] == 1.0 for row in result.predictions)


def test_answer_in_input_follows_the_answering_window(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    filler = " ".join(["alpha bravo charlie echo foxtrot golf hotel"] * 12)
    context = f"{filler} . the code is kilo ."
    example = QAExample(id="far", context=context, question="what is the code?", answers=("kilo",),
                        answer_starts=(context.index("kilo"),))
    encode = EncodeConfig(max_source_tokens=40, stride_tokens=8, max_target_tokens=8)
    chosen = {}

    def run(self, batch, gen, max_new_tokens, stats):
        # Only the window chosen by the test answers; the others say "no answer here".
        return [("kilo" if item.window.window_index == chosen["k"] else "", -0.5) for item in batch]

    monkeypatch.setattr(TorchBackend, "run", run)
    chosen["k"] = 0
    row = evaluate_model(model, tokenizer, [example], encode, GENERATE, batch_size=4).predictions[0]
    assert row["window"] == 0 and row["num_windows"] > 2
    assert row["answer_in_input"] is False  # the model answered from a window that does not hold the answer
    chosen["k"] = row["num_windows"] - 1
    row = evaluate_model(model, tokenizer, [example], encode, GENERATE, batch_size=4).predictions[0]
    assert row["window"] == row["num_windows"] - 1 and row["answer_in_input"] is True


def test_model_mode_is_restored(tiny_model, examples):
    model, tokenizer = tiny_model
    model.train()
    evaluate_model(model, tokenizer, examples[:2], ENCODE, GENERATE, batch_size=2)
    assert model.training


def test_evaluate_predictions_equals_squad_scores(examples):
    predictions = {examples[0].id: examples[0].answers[0], examples[1].id: "the " + examples[1].answers[0] + "!",
                   examples[2].id: "wrong", "none-1": ""}
    result = evaluate_predictions(predictions, examples, metric="squad_v2")
    expected = score_predictions("squad_v2", [(ex.id, predictions.get(ex.id), list(ex.answers)) for ex in examples])
    assert result.metrics == {**expected, "unmatched_predictions": 0}
    assert result.metrics["missing"] == 2
    assert [row["exact_match"] for row in result.predictions] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert all(ROW_KEYS <= set(row) for row in result.predictions)


def test_prediction_files_round_trip(tmp_path, examples):
    result = evaluate_predictions({ex.id: "x" for ex in examples}, examples)
    path = tmp_path / "out" / "predictions.jsonl"
    write_predictions(result, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [ex.id for ex in examples]
    assert read_predictions(path) == {ex.id: "x" for ex in examples}

    official = tmp_path / "official.json"
    official.write_text(json.dumps({"a": "one", "b": "two"}), encoding="utf-8")
    assert read_predictions(official) == {"a": "one", "b": "two"}
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": "a", "answer": "one"}\n\n{"id": 7, "answer": "two"}\n', encoding="utf-8")
    assert read_predictions(answers) == {"a": "one", "7": "two"}


@pytest.mark.parametrize("content, match", [
    ('{"id": "a", "prediction": "x"}\nnot json\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"id": "a"}\n', r"bad\.jsonl:1: no \"prediction\""),
    ('{"prediction": "x"}\n', r"bad\.jsonl:1: each line needs an \"id\""),
    ("", "empty"),
])
def test_bad_prediction_files_name_the_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        read_predictions(path)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from accelerate import Accelerator
    from conftest import synthetic_copy_examples
    from t5qa.config import EncodeConfig, GenerateConfig
    from t5qa.evaluate import evaluate_model
    from t5qa.modeling import load_model

    accelerator = Accelerator(cpu=True)
    model, tokenizer = load_model({model!r})
    model = accelerator.prepare(model)
    examples = synthetic_copy_examples(7, seed=11)
    result = evaluate_model(model, tokenizer, examples, EncodeConfig(max_source_tokens=128, stride_tokens=32,
                            max_target_tokens=8), GenerateConfig(max_new_tokens=4), batch_size=2,
                            accelerator=accelerator)
    result.metrics.pop("eval_seconds")
    with open({out!r} + f"/rank{{accelerator.process_index}}.json", "w") as handle:
        json.dump({{"metrics": result.metrics, "predictions": result.predictions,
                   "processes": accelerator.num_processes}}, handle)
    accelerator.wait_for_everyone()
    # As t5qa's CLI does in a distributed run (cli._end_distributed): gloo's threads can abort the
    # interpreter's shutdown, so leave without it.
    import os, torch.distributed
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.slow
def test_two_processes_gather_every_example_once(tmp_path, tiny_model_dir, tiny_model):
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED_SCRIPT.format(tests=str(REPO_ROOT / "tests"), model=str(tiny_model_dir),
                                             out=str(tmp_path)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:  # torchrun's static rendezvous needs a concrete free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)]
    # A session of its own, so a hang can be ended with every worker, not just the launcher.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("two-process evaluation did not finish in 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert all(r["processes"] == 2 for r in ranks)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["predictions"] == ranks[1]["predictions"]

    model, tokenizer = tiny_model
    examples = synthetic_copy_examples(7, seed=11)
    single = evaluate_model(model, tokenizer, examples, ENCODE, GENERATE, batch_size=2)
    assert [r["id"] for r in ranks[0]["predictions"]] == [ex.id for ex in examples]
    assert [r["prediction"] for r in ranks[0]["predictions"]] == [r["prediction"] for r in single.predictions]
    assert ranks[0]["metrics"]["loss"] == pytest.approx(single.metrics["loss"], rel=1e-5)
    assert ranks[0]["metrics"]["count"] == 7
