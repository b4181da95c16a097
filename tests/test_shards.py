"""Answering in shards (t5qa.shards): one output in input order, whatever the number of processes; after a crash
only the shards that are not done are answered again; shards of another job are never mixed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import synthetic_copy_examples
from t5qa.data import write_jsonl
from t5qa.errors import ConfigError
from t5qa.shards import ShardedJob, Processes, run_shards, shards_dir

ROOT = Path(__file__).resolve().parents[1]


def make_job(directory: Path, total: int = 10, shard_size: int = 3, **fingerprint) -> ShardedJob:
    return ShardedJob(directory, total=total, shard_size=shard_size, fingerprint={"data": "d", **fingerprint},
                      procs=Processes())


def squares(calls: list[int], fail_at: int | None = None):
    def work(start: int, end: int):
        calls.append(start)
        if start == fail_at:
            raise RuntimeError("simulated crash")
        return [{"i": i, "square": i * i} for i in range(start, end)], {"n": float(end - start)}
    return work


def test_a_crashed_job_answers_only_the_shards_not_done(tmp_path: Path) -> None:
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_shards(make_job(tmp_path / "s"), squares(calls, fail_at=6))
    assert calls == [0, 3, 6]
    # The crash also left a half-written shard behind, without its done marker.
    (tmp_path / "s" / "shard-00002.jsonl").write_text('{"i": 6, "squ', encoding="utf-8")
    calls.clear()
    job = make_job(tmp_path / "s")
    assert run_shards(job, squares(calls)) == 2
    assert calls == [6, 9]  # shards 0 and 1 were not answered again
    assert [row["i"] for row in job.rows()] == list(range(10))
    assert [row["square"] for row in job.rows()] == [i * i for i in range(10)]
    assert [t["n"] for t in job.totals()] == [3, 3, 3, 1]


def test_a_shard_changed_on_disk_is_answered_again(tmp_path: Path) -> None:
    run_shards(make_job(tmp_path / "s"), squares([]))
    shard = tmp_path / "s" / "shard-00001.jsonl"
    shard.write_text(shard.read_text().replace('"square": 16', '"square": 17'), encoding="utf-8")
    calls: list[int] = []
    job = make_job(tmp_path / "s")
    assert not job.is_done(1) and job.is_done(0)
    run_shards(job, squares(calls))
    assert calls == [3] and [row["square"] for row in job.rows()][4] == 16


def test_shards_of_another_job_are_refused(tmp_path: Path) -> None:
    run_shards(make_job(tmp_path / "s"), squares([]))
    with pytest.raises(ConfigError, match=r"holds the shards of another job \(its data differ\); delete"):
        run_shards(make_job(tmp_path / "s", data="other"), squares([]))
    with pytest.raises(ConfigError, match=r"\(its shard_size differ\)"):
        run_shards(make_job(tmp_path / "s", shard_size=4), squares([]))


def test_each_process_takes_every_nth_shard(tmp_path: Path) -> None:
    job = ShardedJob(tmp_path, total=10, shard_size=2, fingerprint={}, procs=Processes(rank=1, world=2))
    assert job.count == 5 and job.mine() == [1, 3] and job.span(4) == (8, 10)


# ----------------------------------------------------------------------------------- with a model


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    write_jsonl(synthetic_copy_examples(14, seed=11), path)
    return path


def test_predict_file_in_shards_writes_one_output_in_input_order(tiny_model_dir: Path, questions: Path,
                                                                 tmp_path: Path) -> None:
    from t5qa.api import predict_file

    whole = predict_file(tiny_model_dir, questions, tmp_path / "whole.jsonl")
    sharded = predict_file(tiny_model_dir, questions, tmp_path / "sharded.jsonl", shard_size=4)
    assert whole.questions == sharded.questions == 14
    ids = [json.loads(line)["id"] for line in questions.read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "sharded.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert not shards_dir(tmp_path / "sharded.jsonl").exists()  # removed once the output is written


def test_predict_file_refuses_the_shards_of_other_data(tiny_model_dir: Path, questions: Path,
                                                       tmp_path: Path) -> None:
    from t5qa.api import predict_file

    output = tmp_path / "answers.jsonl"
    job_dir = shards_dir(output)
    job_dir.mkdir()
    (job_dir / "shard-00001.jsonl").mkdir()  # a trap: the second shard cannot be written
    with pytest.raises(Exception, match="cannot write the shard"):
        predict_file(tiny_model_dir, questions, output, shard_size=4)
    (job_dir / "shard-00001.jsonl").rmdir()
    write_jsonl(synthetic_copy_examples(14, seed=12), questions)  # the data changed since
    with pytest.raises(ConfigError, match="data_sha256 differ"):
        predict_file(tiny_model_dir, questions, output, shard_size=4)


# ----------------------------------------------------------------------------------- two processes


def _predict(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "t5qa", *argv]
    else:  # what `accelerate launch --multi_cpu` sets up (tests/test_multiprocess.py says why torchrun here)
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
               "-m", "t5qa", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_answer_like_one_and_resume_after_a_crash(tiny_model_dir: Path, questions: Path,
                                                               tmp_path: Path) -> None:
    base = ["predict", "--model", str(tiny_model_dir), "--data", str(questions), "--shard-size", "2",
            "--no-progress"]
    one = _predict([*base, "--output", str(tmp_path / "one.jsonl")], processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _predict([*base, "--output", str(tmp_path / "two.jsonl")], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert two.stdout.count("wrote 14 answers") == 1  # the main process reports, once

    # A crash: process 1 cannot write its second shard (shard 3), after its first (shard 1) is done.
    output = tmp_path / "crashed.jsonl"
    job_dir = shards_dir(output)
    job_dir.mkdir()
    (job_dir / "shard-00003.jsonl").mkdir()
    crashed = _predict([*base, "--output", str(output)], processes=2)
    assert crashed.returncode != 0 and not output.exists()
    assert "shard-00003.jsonl: cannot write the shard" in crashed.stderr
    (job_dir / "shard-00003.jsonl").rmdir()
    done_before = sorted(p.name for p in job_dir.glob("*.done"))
    assert "shard-00001.done" in done_before and "shard-00003.done" not in done_before

    resumed = _predict([*base, "--output", str(output)], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Only the shards without a done marker are answered (which ones, exactly: the in-process test above).
    assert f"{len(done_before)} of 7 shards already done; answering the other {7 - len(done_before)}" in \
        resumed.stderr
    assert output.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not job_dir.exists()


def test_evaluate_in_shards_scores_like_one_pass(tiny_model_dir: Path, tmp_path: Path) -> None:
    from t5qa.api import evaluate

    data = tmp_path / "validation.jsonl"
    write_jsonl(synthetic_copy_examples(11, seed=13), data)
    whole = evaluate(tiny_model_dir, data)
    sharded = evaluate(tiny_model_dir, data, shards=tmp_path / "eval.shards", shard_size=3)
    assert not (tmp_path / "eval.shards").exists()
    for key in ("exact_match", "f1", "count", "answers_in_context"):
        assert sharded.metrics[key] == whole.metrics[key], key
    assert sharded.metrics["loss"] == pytest.approx(whole.metrics["loss"], rel=1e-5)
    assert sharded.metrics["token_accuracy"] == pytest.approx(whole.metrics["token_accuracy"])
    # Batches differ in their padding, so the answers' scores agree to float precision, the rest exactly.
    def without_score(rows):
        return [{k: v for k, v in json.loads(json.dumps(r)).items() if k != "score"} for r in rows]

    assert without_score(whole.predictions) == without_score(sharded.predictions)
    assert [r["score"] for r in sharded.predictions] == pytest.approx([r["score"] for r in whole.predictions],
                                                                      rel=1e-5)


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "validation.jsonl"
    write_jsonl(synthetic_copy_examples(11, seed=13), data)
    base = ["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--shard-size", "3", "--json"]
    one = _predict([*base, "--output", str(tmp_path / "one.jsonl")], processes=1)
    two = _predict([*base, "--output", str(tmp_path / "two.jsonl")], processes=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    metrics_one, metrics_two = json.loads(one.stdout), json.loads(two.stdout)  # printed once, by the main process
    assert metrics_two["f1"] == metrics_one["f1"] and metrics_two["count"] == 11
    assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], rel=1e-5)
