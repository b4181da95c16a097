"""The benchmark suite's own arithmetic and bookkeeping: untimed, tiny, offline. It lives with the benchmarks, so
that tests/ tests t5qa alone and never imports bench/; pytest collects it too (pyproject's testpaths).

No timing is asserted here, ever: the benchmark reports speed, tests only check that what it counts is right.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402
import run as bench_run  # noqa: E402

import common  # noqa: E402  (after the path insert, like the two above)


def toy_config() -> SimpleNamespace:
    # d_model 4, d_ff 8, 2 heads of 2 -> inner width 4, one encoder and one decoder layer, vocabulary 10
    return SimpleNamespace(d_model=4, d_ff=8, d_kv=2, num_heads=2, num_layers=1, num_decoder_layers=1,
                           vocab_size=10, is_gated_act=False)


def test_forward_flops_of_a_hand_computed_toy_config():
    # source 3 tokens, target 2 tokens; multiply-adds:
    # encoder: 3 x (q,k,v,o 4*4*4=64 + FFN 2*4*8=64) + scores and weighted sum 2*3*3*4=72      = 456
    # decoder: 2 x (64 + 64) + self scores 2*2*2*4=32 + cross q,o 2*(2*4*4)=64
    #          + cross k,v on the source 3*(2*4*4)=96 + cross scores 2*2*3*4=48                = 496
    # LM head: 2 x 4 x 10                                                                      = 80
    # total 1032 multiply-adds = 2064 FLOPs; training is 3x that
    assert flops.forward_flops(toy_config(), 3, 2) == 2064
    assert flops.train_flops(toy_config(), 3, 2) == 3 * 2064


def test_generate_flops_of_a_hand_computed_toy_config():
    # encoder 456 and cross k,v 96 once; decoder step i: 64 + 64 + self 2*i*4 + cross q,o 32 + cross 2*3*4=24,
    # plus the LM head 40 -> 224 + 8i; two steps: 232 + 240 = 472; total 1024 multiply-adds
    assert flops.generate_flops(toy_config(), 3, 2) == 2 * 1024


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flop_count_matches_torch_flop_counter_on_a_tiny_t5(attn):
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5ForConditionalGeneration

    # dropout 0.1 as in t5-small: in training mode the attention then runs as plain matmuls, every one of which
    # FlopCounterMode sees (with dropout 0 one cross-attention product goes through a kernel it does not count)
    config = T5Config(vocab_size=50, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=1,
                      decoder_start_token_id=0, dropout_rate=0.1)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.config._attn_implementation = attn
    ids = torch.randint(2, 50, (1, 13))
    labels = torch.randint(2, 50, (1, 5))
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    assert counter.get_total_flops() == flops.forward_flops(config, 13, 5)
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    assert counter.get_total_flops() == flops.train_flops(config, 13, 5)
    assert loss.item() > 0


def test_token_counter_counts_only_real_tokens_of_training_calls():
    torch = pytest.importorskip("torch")
    from transformers import T5Config, T5ForConditionalGeneration

    class Model(T5ForConditionalGeneration):  # a subclass, so the wrapper never leaks into other tests
        pass

    config = T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1, decoder_start_token_id=0)
    model = Model(config)
    counter = common.TokenCounter().install(Model)
    try:
        ids = torch.tensor([[5, 6, 7, 1], [8, 1, 0, 0]])  # 4 and 2 real tokens
        mask = (ids != 0).long()
        labels = torch.tensor([[9, 1, -100], [9, 9, 1]])  # 2 and 3 real target tokens
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels)
        model.eval()
        model(input_ids=ids, attention_mask=mask, labels=labels)  # evaluation: not a training step
    finally:
        counter.uninstall()
    assert counter.calls == [[(4, 2), (2, 3)]]
    assert "labels" in __import__("inspect").signature(Model.forward).parameters


def test_step_timer_excludes_warmup_steps():
    timer = common.StepTimer()
    timer.ends = [10.0, 12.0, 13.5, 15.0]
    timer.cpu_ends = [1.0, 5.0, 8.0, 11.0]
    assert timer.window(1) == (3, 5.0, 10.0)
    with pytest.raises(RuntimeError):
        timer.window(4)


def test_verdict_reports_pass_and_the_size_of_a_miss():
    assert bench_run.verdict(1.4, 1.3) == "PASS"
    assert bench_run.verdict(2.4, 3.0).startswith("MISS (by 20%")
    assert bench_run.verdict(1.1, 1.0, higher_is_better=False).startswith("MISS (by 10%")
    assert bench_run.verdict(None, 1.0).startswith("n/a")


def test_run_skips_with_a_message_when_shared_data_is_absent(monkeypatch, capsys):
    monkeypatch.setattr(common, "shared_data_missing", lambda: "/nowhere/t5-small-tokenizer is absent")
    assert bench_run.main(["--quick", "--output", "/nonexistent/RESULTS.md"]) == 0
    assert "skipped: /nowhere/t5-small-tokenizer is absent" in capsys.readouterr().out


def test_rounds_combine_into_totals_not_an_average_of_rates():
    def round_(samples: int, seconds: float, cpu: float, flop: float, rss: float, src: float) -> dict:
        return {"samples": samples, "seconds": seconds, "cpu_seconds": cpu, "samples_per_second": samples / seconds,
                "useful_flop_per_second": flop / seconds, "peak_rss_mb": rss, "timed_steps": samples // 8,
                "real_source_tokens_per_example": src, "real_target_tokens_per_example": 5.0, "command": "x"}

    combined = bench_run.combine_rounds([round_(80, 10.0, 20.0, 1e12, 3000, 100), round_(160, 40.0, 70.0, 3e12, 3100, 160)])
    assert combined["samples_per_second"] == pytest.approx(240 / 50)  # not (8 + 4) / 2
    assert combined["useful_flop_per_second"] == pytest.approx(4e12 / 50)
    assert combined["cpu_per_wall"] == pytest.approx(90 / 50)
    assert combined["real_source_tokens_per_example"] == pytest.approx((80 * 100 + 160 * 160) / 240)
    assert combined["peak_rss_mb"] == 3100 and combined["timed_steps"] == 30 and combined["rounds"] == 2
    assert "command" not in combined  # each round lists its own
    assert bench_run.combine_rounds([{"error": "boom"}, round_(8, 1.0, 2.0, 1e9, 1, 1)]) == {"error": "boom"}


def test_training_with_evaluation_report_sums_rounds_and_divides_by_t5qa(tmp_path):
    import bench_train_eval

    def result(total: float, evaluation: float, refused: list[str] | None = None) -> dict:
        return {"seconds": total, "eval_seconds": evaluation, "train_seconds": total - evaluation,
                "peak_rss_mb": 1000.0, "answering_fast_paths_refused": refused or []}

    args = SimpleNamespace(steps=40, evals=2, questions=10, rounds=2, output=str(tmp_path / "R.md"))
    bench_train_eval.write_report(args, {"trainer": [result(100, 60), result(120, 70)],
                                         "t5qa": [result(50, 20), result(60, 30, ["decoding not used: x"])]})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "R.md").read_text().splitlines() if line.startswith("| t")}
    assert rows["trainer"][:4] == ["220.0", "90.0", "130.0", f"{10 * 2 * 2 / 130:.2f}"]
    assert rows["trainer"][4] == f"{220 / 110:.2f}x / {130 / 50:.2f}x"
    assert rows["t5qa"][4] == "1.00x / 1.00x"
    assert "refused: decoding not used: x" in (tmp_path / "R.md").read_text()


def test_every_name_the_benchmarks_import_from_t5qa_exists():
    # The benchmarks import t5qa inside their functions (peers' workers must not), so a renamed function
    # breaks them only when they run: profile_train.py once failed in a full run on a name the redesign removed.
    import ast
    import importlib
    import importlib.util

    missing = []
    for script in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "t5qa":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    is_package = hasattr(module, "__path__")
                    if not hasattr(module, alias.name) and not (
                            is_package and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None):
                        missing.append(f"{script.name}: {node.module}.{alias.name}")
    assert not missing, missing


def test_report_gives_the_server_the_load_test_and_training_with_evaluation_their_rows(tmp_path):
    def scenario(rps: float, batch: float) -> dict:
        return {"requests": 128, "seconds": 128 / rps, "requests_per_second": rps, "p50_ms": 900.0, "p99_ms": 1500.0,
                "model_calls": round(128 / batch), "mean_batch": batch}

    def train_eval(total: float, evaluation: float) -> dict:
        return {"steps": 40, "evaluations": 2, "seconds": total, "eval_seconds": evaluation,
                "train_seconds": total - evaluation, "peak_rss_mb": 1000.0, "answering_fast_paths_refused": []}

    load = {"requests": 2000, "concurrency": 32, "ok": 1999, "server_errors_5xx": 1, "client_errors_4xx": 0,
            "dropped": 0, "requests_per_second": 100.0, "latency_ms": {"p99": 800.0}, "server_batches": 300}
    results = {
        "serve": {"scenarios": {"batched": scenario(8.0, 16.0), "one-by-one": scenario(2.5, 1.0),
                                "sequential": scenario(2.4, 1.0)},
                  "ratio_batched_vs_one_by_one": 8.0 / 2.5, "concurrency": 16, "max_batch_size": 32,
                  "max_wait_ms": 5.0, "model": "toy"},
        "load": load,
        "train-eval-trainer": train_eval(130.0, 50.0), "train-eval-t5qa": train_eval(100.0, 40.0),
    }
    out = tmp_path / "RESULTS.md"
    bench_run.write_report(out, bench_run.QUICK, results, [], __import__("datetime").datetime.now().astimezone(), 1.0)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ")}
    serve_row = rows["server requests/s, 16 concurrent clients, micro-batching / one request per model call"]
    assert serve_row[:2] == ["3.20x", "PASS"]
    load_row = rows["server 5xx and dropped requests, 2000 requests from 32 clients"]
    assert load_row[:2] == ["1 5xx, 0 dropped, 0 4xx", "MISS"]  # one 5xx misses the target
    evaluation_row = rows["training run with evaluation, t5qa / Seq2SeqTrainer with predict_with_generate "
                          "(total seconds)"]
    assert evaluation_row[0] == "1.30x"
    assert rows["trainer"][3] == "1.30x / 1.25x" and rows["batched"][2] == "8.00"
