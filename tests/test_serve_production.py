"""The production server: GET /metrics in Prometheus' format, request ids and the JSON access log, the model named
rather than its path, graceful shutdown that finishes queued requests, `--workers N` on one port, the Dockerfile."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from t5qa.config import ServeConfig  # noqa: E402
from t5qa.errors import ConfigError  # noqa: E402
from t5qa.predict import Answer  # noqa: E402
from t5qa.serve import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIR = {"context": "Anomaly detection finds credit card fraud.", "question": "What does it find?"}


class EchoPredictor:
    backend = "echo"

    def answer_many(self, pairs: list[tuple[str, str]], **options: Any) -> list[Any]:
        return [Answer(text=q, score=-0.1, window_index=0, num_windows=1, seconds=0.0) for _, q in pairs]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus scrape."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_by_status_batches_and_queue() -> None:
    app = create_app(EchoPredictor(), api_key="sesame")
    key = {"X-API-Key": "sesame"}
    with TestClient(app) as client:
        for _ in range(3):
            assert client.post("/v1/answer", json=PAIR, headers=key).status_code == 200
        assert client.post("/v1/answer", json={**PAIR, "question": " "}, headers=key).status_code == 422
        assert client.post("/v1/answer", json=PAIR).status_code == 401
        assert client.get("/metrics").status_code == 401  # the metrics are behind the key too
        response = client.get("/metrics", headers=key)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)

    def requests(status: str) -> float:
        return got[("t5qa_requests_total", (("method", "POST"), ("route", "/v1/answer"), ("status", status)))]

    assert (requests("200"), requests("422"), requests("401")) == (3, 1, 1)
    assert got[("t5qa_requests_total", (("method", "GET"), ("route", "/metrics"), ("status", "401")))] == 1
    assert got[("t5qa_request_seconds_count", (("route", "/v1/answer"),))] == 5
    assert got[("t5qa_batch_pairs_count", ())] == 3 and got[("t5qa_batch_pairs_sum", ())] == 3
    assert got[("t5qa_model_seconds_count", ())] == 3
    assert got[("t5qa_queue_pairs", ())] == 0


def test_unknown_paths_share_one_label() -> None:
    with TestClient(create_app(EchoPredictor())) as client:
        for path in ("/a", "/b", "/c/d"):
            assert client.get(path).status_code == 404
        got = samples(client.get("/metrics").text)
    assert got[("t5qa_requests_total", (("method", "GET"), ("route", "other"), ("status", "404")))] == 3
    assert not [key for key in got if ("route", "/a") in key[1]]


def test_request_ids_and_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t5qa.access")
    with TestClient(create_app(EchoPredictor(), api_key="sesame")) as client:
        given = client.post("/v1/answer", json=PAIR, headers={"X-Request-ID": "lb-42.a_b", "X-API-Key": "sesame"})
        fresh = client.post("/v1/answer?api_key=sesame", json=PAIR, headers={"X-Request-ID": "no spaces allowed"})
    assert given.headers["x-request-id"] == "lb-42.a_b"
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.headers["x-request-id"] != "no spaces allowed"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "t5qa.access"]
    assert [(line["request_id"], line["status"]) for line in lines] == [
        ("lb-42.a_b", 200), (fresh.headers["x-request-id"], 401)]
    assert {"time", "method", "path", "ms", "client"} <= set(lines[0]) and lines[0]["path"] == "/v1/answer"
    assert "sesame" not in caplog.text  # the query string (a key in the URL) never reaches the log


def test_health_names_the_model_not_its_path(tmp_path: Path) -> None:
    model_dir = tmp_path / "secret-location" / "best"
    model_dir.mkdir(parents=True)
    (model_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# fraud-qa\n\nA model.\n", encoding="utf-8")
    (model_dir / "t5qa.json").write_text(json.dumps({"train_config": {"model": "google/flan-t5-small"}}))
    with TestClient(create_app(EchoPredictor(), model_dir=model_dir)) as client:
        health = client.get("/health").json()
    assert health["model"] == "fraud-qa" and health["base_model"] == "google/flan-t5-small"
    assert "secret-location" not in json.dumps(health)
    with TestClient(create_app(EchoPredictor(), model_dir=model_dir, config=ServeConfig(model_name="Fraud v2"))) as c:
        assert c.get("/health").json()["model"] == "Fraud v2"
    (model_dir / "README.md").unlink()
    with TestClient(create_app(EchoPredictor(), model_dir=model_dir)) as client:
        assert client.get("/health").json()["model"] == "best"


def test_serve_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        ServeConfig(workers=0)
    with pytest.raises(ConfigError, match="--shutdown-timeout-s must be positive"):
        ServeConfig(shutdown_timeout_s=0)


# ------------------------------------------------------------------------------------ the real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "t5qa", "serve", "--model", str(model_dir), "--port", str(port), *flags],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "ok":
                return process
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up within 120 s")


def stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return process.returncode, err


@pytest.mark.slow
def test_sigterm_finishes_the_queued_requests_first(tiny_model_dir: Path) -> None:
    port = free_port()
    # Each request waits 1.5 s for company in the batcher, so all of them are still queued when SIGTERM comes.
    process = start_server(tiny_model_dir, port, "--max-wait-ms", "1500", "--max-new-tokens", "4")
    results: dict[int, Any] = {}

    def ask(i: int) -> None:
        try:
            results[i] = httpx.post(f"http://127.0.0.1:{port}/v1/answer", json=PAIR, timeout=60,
                                    headers={"X-Request-ID": f"queued-{i}"})
        except httpx.HTTPError as exc:
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.6)
    code, err = stop(process)
    for thread in threads:
        thread.join(timeout=60)
    assert {i: getattr(r, "status_code", r) for i, r in results.items()} == {i: 200 for i in range(6)}
    assert all(r.json()["batch_pairs"] == 6 for r in results.values())  # answered together, after the signal
    assert code == 0, err
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert sorted(line["request_id"] for line in logged if line["path"] == "/v1/answer") == [
        f"queued-{i}" for i in range(6)]


@pytest.mark.slow
def test_workers_share_one_port_and_their_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    process = start_server(tiny_model_dir, port, "--workers", "2", "--max-new-tokens", "4",
                           env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        deadline = time.monotonic() + 60
        # Both workers load their model; each writes its numbers under its own pid.
        while len({path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("*.db")}) < 2:
            assert time.monotonic() < deadline, sorted(p.name for p in metrics_dir.iterdir())
            time.sleep(0.2)
        for _ in range(10):
            with httpx.Client() as client:  # a new connection each time: any worker may take it
                assert client.post(f"http://127.0.0.1:{port}/v1/answer", json=PAIR, timeout=60).status_code == 200
        got = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    finally:
        code, err = stop(process)
    # A scrape of one worker counts every worker's requests.
    assert got[("t5qa_requests_total", (("method", "POST"), ("route", "/v1/answer"), ("status", "200")))] == 10
    assert got[("t5qa_batch_pairs_sum", ())] == 10
    assert err.count("model loaded from") == 2 and code == 0, err


# ------------------------------------------------------------------------------------------- Docker


def test_the_dockerfile_runs_flags_the_server_has() -> None:
    """The image's command line is one `t5qa serve` accepts (checked without Docker)."""
    import shlex

    from t5qa.cli import build_parser

    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    entry = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
    command = json.loads(entry.removeprefix("ENTRYPOINT").strip())
    cmd = next(line for line in text.splitlines() if line.startswith("CMD"))
    command += json.loads(cmd.removeprefix("CMD").strip())
    assert command[:2] == ["t5qa", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.host == "0.0.0.0" and args.model == "/model"
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text, shlex.join(command)
    assert "USER " in text  # not root


@pytest.mark.slow
def test_the_docker_image_builds() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed on this machine; the Dockerfile's command line is checked above")
    if subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("docker is installed but its daemon is not reachable")
    built = subprocess.run([docker, "build", "-q", "-t", "t5qa-ci-test", str(ROOT)], capture_output=True,
                           text=True, timeout=1800)
    assert built.returncode == 0, built.stderr[-2000:]
