"""The HTTP server: answers, every 4xx, model failures, the API key, micro-batching and the `serve` command.

Most tests use the real Predictor on the tiny model; the batching tests use a fake predictor with a fixed
delay per model call, so "fewer model calls than requests" does not depend on machine speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import running_server
from t5qa.config import GenerateConfig, ServeConfig, ServeLimits  # noqa: E402
from t5qa.predict import Answer, Predictor  # noqa: E402
from t5qa.serve import STATIC_DIR, create_app, create_app_from_dir  # noqa: E402

CONTEXT = "the code is kilo . the city is oslo . alpha bravo ."
QUESTION = "what is the city?"
KEY = "s3cret-key-for-tests-9f2c"


@pytest.fixture(scope="module")
def model_dir(chatty_model_dir: Path) -> Path:
    return chatty_model_dir


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    predictor = Predictor.from_pretrained(model_dir, generate=GenerateConfig(max_new_tokens=4))
    assert predictor.answer(CONTEXT, QUESTION).text != ""  # the tests below compare real answers
    return predictor


@pytest.fixture()
def client(predictor: Predictor) -> Iterator[TestClient]:
    limits = ServeLimits(max_pairs_per_request=4, max_context_chars=500, max_question_chars=50,
                         max_request_bytes=4000, max_num_beams=4, max_new_tokens_cap=8)
    with TestClient(create_app(predictor, config=ServeConfig(limits=limits))) as c:
        yield c


class FakePredictor:
    """Records every model call (pairs and options); optional delay per call and a poisoned question."""

    backend = "fake"

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[tuple[int, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def answer_many(self, pairs: list[tuple[str, str]], **options: Any) -> list[Answer]:
        with self.lock:
            self.calls.append((len(pairs), dict(options)))
        time.sleep(self.delay_s)
        if self.fail_on is not None and any(q == self.fail_on for _, q in pairs):
            raise RuntimeError("the model broke")
        return [Answer(text=f"{q}|{options.get('num_beams', 1)}", score=-0.25, window_index=0, num_windows=1,
                       seconds=0.0) for _, q in pairs]


# ---------------------------------------------------------------------------------------------- answers


def test_single_question_matches_the_predictor(client: TestClient, predictor: Predictor) -> None:
    response = client.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.answer(CONTEXT, QUESTION)
    assert body["answer"]["text"] == expected.text
    assert body["answers"] == [body["answer"]]
    assert body["answer"]["score"] == pytest.approx(expected.score, abs=1e-4)
    assert (body["answer"]["window_index"], body["answer"]["num_windows"]) == (0, 1)
    assert body["model_seconds"] > 0
    assert body["server_seconds"] >= body["model_seconds"]
    assert body["batch_pairs"] == 1


def test_pairs_come_back_in_order_and_match(client: TestClient, predictor: Predictor) -> None:
    pairs = [(CONTEXT, QUESTION), ("the color is amber . papa romeo .", "what is the color?"),
             (CONTEXT, "what is the code?")]
    response = client.post("/v1/answer", json={"pairs": [{"context": c, "question": q} for c, q in pairs]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] is None
    assert [a["text"] for a in body["answers"]] == [a.text for a in predictor.answer_many(pairs)]


def test_generation_options_reach_the_model(client: TestClient, predictor: Predictor) -> None:
    options = {"num_beams": 3, "max_new_tokens": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2}
    response = client.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION, **options})
    assert response.status_code == 200, response.text
    assert response.json()["answer"]["text"] == predictor.answer(CONTEXT, QUESTION, **options).text
    # min_new_tokens = max_new_tokens fixes the answer length: a random tiny model then never stops early.
    fixed = client.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION,
                                            "min_new_tokens": 6, "max_new_tokens": 6}).json()["answer"]["text"]
    short = client.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION,
                                            "min_new_tokens": 1, "max_new_tokens": 1}).json()["answer"]["text"]
    assert fixed == predictor.answer(CONTEXT, QUESTION, min_new_tokens=6, max_new_tokens=6).text
    assert len(fixed) > len(short)


def test_long_context_is_answered_in_windows(client: TestClient, predictor: Predictor) -> None:
    # tiny_model_dir's inputs are 128 tokens: this context needs several windows.
    context = " . ".join(f"the city is oslo alpha bravo charlie {i}" for i in range(40))[:500]
    response = client.post("/v1/answer", json={"context": context, "question": QUESTION})
    assert response.status_code == 200, response.text
    answer = response.json()["answer"]
    expected = predictor.answer(context, QUESTION)
    assert answer["num_windows"] == expected.num_windows > 1
    assert answer["window_index"] == expected.window_index
    assert answer["text"] == expected.text


def test_health_reports_the_server(client: TestClient) -> None:
    client.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION})
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["backend"] == "torch"
    assert health["queue_size"] == 0
    assert health["uptime_seconds"] >= 0
    assert health["requests_served"] == 1 and health["batches_run"] == 1
    assert health["limits"]["max_pairs_per_request"] == 4
    assert health["api_key_required"] is False


def test_model_is_loaded_in_lifespan_not_at_creation(model_dir: Path, predictor: Predictor) -> None:
    app = create_app_from_dir(model_dir, generate=GenerateConfig(max_new_tokens=4))
    assert app.state.t5qa.predictor is None  # creating the app loads nothing
    with TestClient(app) as c:
        assert app.state.t5qa.predictor is not None
        health = c.get("/health").json()
        assert health["model"] == model_dir.name and str(model_dir) not in json.dumps(health)
        assert health["backend"] == "torch"
        answer = c.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION}).json()["answer"]
        assert answer["text"] == predictor.answer(CONTEXT, QUESTION).text


def test_openapi_describes_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/v1/answer", "/health"} <= set(schema["paths"])
    request_ref = schema["paths"]["/v1/answer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = schema["components"]["schemas"][request_ref["$ref"].rsplit("/", 1)[1]]
    assert {"context", "question", "pairs", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
            "no_repeat_ngram_size"} <= set(request["properties"])
    assert client.get("/docs").status_code == 200


# ----------------------------------------------------------------------------------------------- errors

GOOD = {"context": CONTEXT, "question": QUESTION}
ERROR_CASES = [
    # (name, raw body or json, expected status, words the message must contain)
    ("malformed json", b'{"context": "a", "question": ', 400, ["malformed JSON"]),
    ("not an object", b"[1, 2]", 422, ["JSON object"]),
    ("empty body", b"", 422, ["missing request body"]),
    ("missing question", {"context": CONTEXT}, 422, ["missing question"]),
    ("missing pair field", {"pairs": [{"context": CONTEXT}]}, 422, ["pairs[0].question"]),
    ("context not a string", {"context": 12, "question": QUESTION}, 422, ["context", "string"]),
    ("num_beams as string", {**GOOD, "num_beams": "2"}, 422, ["num_beams", "integer"]),
    ("pairs not a list", {"pairs": "abc"}, 422, ["pairs"]),
    ("unknown field", {**GOOD, "temperature": 0.7}, 422, ["temperature", "unknown field"]),
    ("both forms", {**GOOD, "pairs": [GOOD]}, 422, ["not both"]),
    ("empty pairs", {"pairs": []}, 422, ["pairs is empty"]),
    ("empty question", {"context": CONTEXT, "question": "  "}, 422, ["question", "empty"]),
    ("num_beams too large", {**GOOD, "num_beams": 5}, 422, ["num_beams", "[1, 4]"]),
    ("num_beams zero", {**GOOD, "num_beams": 0}, 422, ["num_beams"]),
    ("max_new_tokens too large", {**GOOD, "max_new_tokens": 9}, 422, ["max_new_tokens", "[1, 8]"]),
    ("min above max", {**GOOD, "min_new_tokens": 3, "max_new_tokens": 2}, 422, ["min_new_tokens"]),
    ("length_penalty not finite", b'{"context": "a b", "question": "c", "length_penalty": Infinity}', 422,
     ["length_penalty"]),
    ("too many pairs", {"pairs": [GOOD] * 5}, 413, ["5 pairs", "limit is 4"]),
    ("context too long", {"context": "x " * 300, "question": QUESTION}, 413, ["context", "600 characters"]),
    ("question too long", {"context": CONTEXT, "question": "why " * 20}, 413, ["question", "limit is 50"]),
    ("pair context too long", {"pairs": [GOOD, {"context": "y" * 501, "question": "q"}]}, 413,
     ["pairs[1].context"]),
    ("body too large", {"context": "z" * 5000, "question": QUESTION}, 413, ["larger than 4000 bytes"]),
]


@pytest.mark.parametrize("name,body,status,words", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_request_gets_a_readable_error_and_the_server_keeps_answering(
        client: TestClient, name: str, body: Any, status: int, words: list[str]) -> None:
    if isinstance(body, bytes):
        response = client.post("/v1/answer", content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post("/v1/answer", json=body)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message
    assert client.post("/v1/answer", json=GOOD).status_code == 200


def test_streamed_body_is_counted_before_parsing(client: TestClient) -> None:
    # No Content-Length (chunked): the limit must hold while the body streams in.
    def chunks() -> Iterator[bytes]:
        yield b'{"context": "'
        for _ in range(50):
            yield b"a" * 1000
        yield b'", "question": "q"}'

    response = client.post("/v1/answer", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "larger than 4000 bytes" in response.json()["error"]


def test_lying_content_length_is_rejected(client: TestClient) -> None:
    response = client.post("/v1/answer", content=b"{}", headers={"Content-Length": "12x"})
    assert response.status_code == 400
    assert "Content-Length" in response.json()["error"]


def test_model_exception_fails_that_request_only() -> None:
    fake = FakePredictor(fail_on="boom")
    with TestClient(create_app(fake)) as c:
        failed = c.post("/v1/answer", json={"context": "c", "question": "boom"})
        assert failed.status_code == 500
        assert "RuntimeError" in failed.json()["error"] and "still running" in failed.json()["error"]
        ok = c.post("/v1/answer", json={"context": "c", "question": "fine"})
        assert ok.status_code == 200
        assert ok.json()["answer"]["text"] == "fine|1"


async def _post_all(app: Any, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        return list(await asyncio.gather(*(c.post("/v1/answer", json=b, headers=headers) for b in bodies)))


def test_a_failing_request_does_not_fail_its_batch_mates() -> None:
    fake = FakePredictor(delay_s=0.05, fail_on="boom")
    app = create_app(fake, config=ServeConfig(max_batch_size=16, max_wait_ms=50))
    bodies = [{"context": "c", "question": f"q{i}"} for i in range(5)] + [{"context": "c", "question": "boom"}]
    responses = asyncio.run(_post_all(app, bodies))
    assert [r.status_code for r in responses] == [200] * 5 + [500]
    assert [r.json()["answer"]["text"] for r in responses[:5]] == [f"q{i}|1" for i in range(5)]


# ----------------------------------------------------------------------------------------- micro-batching


def test_concurrent_requests_share_model_calls() -> None:
    fake = FakePredictor(delay_s=0.1)
    app = create_app(fake, config=ServeConfig(max_batch_size=32, max_wait_ms=20))
    bodies = [{"context": "c", "question": f"q{i}"} for i in range(16)]
    started = time.perf_counter()
    responses = asyncio.run(_post_all(app, bodies))
    elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in responses)
    # Each request got its own answer back, not a batch-mate's.
    assert [r.json()["answer"]["text"] for r in responses] == [f"q{i}|1" for i in range(16)]
    sizes = [n for n, _ in fake.calls]
    assert sum(sizes) == 16
    assert len(sizes) <= 4, sizes  # one at a time would be 16 calls of 0.1 s
    assert elapsed < 16 * 0.1 / 2
    assert max(r.json()["batch_pairs"] for r in responses) == max(sizes) > 1


def test_batches_respect_max_batch_size() -> None:
    fake = FakePredictor(delay_s=0.05)
    app = create_app(fake, config=ServeConfig(max_batch_size=4, max_wait_ms=50))
    responses = asyncio.run(_post_all(app, [{"context": "c", "question": f"q{i}"} for i in range(12)]))
    assert all(r.status_code == 200 for r in responses)
    sizes = [n for n, _ in fake.calls]
    assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) >= 3


def test_different_generation_options_are_never_mixed() -> None:
    fake = FakePredictor(delay_s=0.05)
    app = create_app(fake, config=ServeConfig(max_batch_size=32, max_wait_ms=50))
    bodies = [{"context": "c", "question": f"q{i}", "num_beams": 1 + i % 2} for i in range(16)]
    responses = asyncio.run(_post_all(app, bodies))
    assert [r.json()["answer"]["text"] for r in responses] == [f"q{i}|{1 + i % 2}" for i in range(16)]
    assert len(fake.calls) < 16
    assert {opts["num_beams"] for _, opts in fake.calls} == {1, 2}
    assert sum(n for n, o in fake.calls if o["num_beams"] == 2) == 8


def _closed_loop(delay_s: float, starts_s: list[float], rounds: int) -> tuple[list[int], int]:
    """Clients that each send `rounds` requests, the next a few ms after the last answer (as over HTTP), against a
    MicroBatcher whose model call takes `delay_s`; client i starts at starts_s[i]. Returns the pairs per model
    call and how many batches waited to regroup."""
    from t5qa.serve.batcher import MicroBatcher

    calls: list[int] = []

    def answer(pairs: list[tuple[str, str]], options: dict[str, Any]) -> list[str]:
        calls.append(len(pairs))
        time.sleep(delay_s)
        return [q for _, q in pairs]

    async def scenario() -> int:
        batcher = MicroBatcher(answer, config=ServeConfig(max_batch_size=32, max_wait_ms=5))

        async def client(i: int) -> None:
            await asyncio.sleep(starts_s[i])
            for r in range(rounds):
                result = await batcher.submit([("c", f"{i}-{r}")], {})
                assert result.answers == [f"{i}-{r}"]
                await asyncio.sleep(0.003)  # the answer's way back and the next request's way in

        await asyncio.gather(*(client(i) for i in range(len(starts_s))))
        await batcher.stop()
        return batcher.regrouped

    regrouped = asyncio.run(scenario())
    return calls, regrouped


def test_clients_that_arrived_in_two_groups_merge_into_one_batch() -> None:
    # 8 clients, then 8 more while the first batch runs: without regrouping the two groups take turns forever
    # (batches of 8); with it, the next batch waits for the first group to come back and takes all 16.
    calls, regrouped = _closed_loop(0.2, [0.0] * 8 + [0.1] * 8, rounds=4)
    assert sum(calls) == 16 * 4
    assert regrouped >= 1
    assert calls[:2] == [8, 16], calls
    assert len(calls) <= 5, calls  # taking turns: 8 calls of 8


def test_a_lone_client_never_waits_to_regroup() -> None:
    calls, regrouped = _closed_loop(0.05, [0.0], rounds=5)
    assert calls == [1] * 5
    assert regrouped == 0


def test_event_loop_stays_responsive_while_the_model_runs() -> None:
    fake = FakePredictor(delay_s=0.6)
    app = create_app(fake)

    async def scenario() -> tuple[float, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            slow = asyncio.create_task(c.post("/v1/answer", json={"context": "c", "question": "q"}))
            await asyncio.sleep(0.1)  # the model is now busy in its thread
            queued = asyncio.create_task(c.post("/v1/answer", json={"context": "c", "question": "r"}))
            # Until the second request has reached the queue (a loaded machine may take a while to get there),
            # while the model is still busy with the first.
            for _ in range(40):
                await asyncio.sleep(0.01)
                t0 = time.perf_counter()
                health = await c.get("/health")
                seconds = time.perf_counter() - t0
                if health.json()["queue_size"] == 1:
                    break
            await slow
            await queued
            return seconds, health.status_code, health.json()["queue_size"]

    seconds, status, queue_size = asyncio.run(scenario())
    assert status == 200
    assert seconds < 0.3
    assert queue_size == 1  # the second request waits for the busy model


# ---------------------------------------------------------------------------------------------- API key


@pytest.fixture()
def keyed(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, api_key=KEY)) as c:
        yield c


def test_api_key_is_required_on_the_api(keyed: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}):
        response = keyed.post("/v1/answer", json=GOOD, headers=headers)
        assert response.status_code == 401, headers
        assert "Authorization: Bearer" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/health").status_code == 401
    assert keyed.post("/v1/answer", json=GOOD, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.post("/v1/answer", json=GOOD, headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/health", headers={"X-API-Key": KEY}).json()["api_key_required"] is True


def test_the_page_loads_without_the_key(keyed: TestClient) -> None:
    assert keyed.get("/").status_code == 200
    assert keyed.get("/static/app.js").status_code == 200
    assert keyed.get("/static/style.css").status_code == 200


def test_api_key_never_appears_in_logs(predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakePredictor(fail_on="boom")
    with TestClient(create_app(fake, api_key=KEY)) as c:
        c.post("/v1/answer", json=GOOD, headers={"Authorization": f"Bearer {KEY}"})
        c.post("/v1/answer", json={"context": "c", "question": "boom"}, headers={"X-API-Key": KEY})
        c.post("/v1/answer", json=GOOD, headers={"X-API-Key": KEY + "x"})
        c.post("/v1/answer", content=b"{bad", headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert caplog.records, "expected some log records (the model failure is logged)"
    assert KEY not in caplog.text


def test_api_key_stays_out_of_real_uvicorn_logs(predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_server(create_app(predictor, api_key=KEY), log_level="debug") as base:
        ok = httpx.post(f"{base}/v1/answer", json=GOOD, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        denied = httpx.post(f"{base}/v1/answer", json=GOOD, headers={"X-API-Key": "nope"}, timeout=30)
    assert (ok.status_code, denied.status_code) == (200, 401)
    assert ok.json()["answer"]["text"] == predictor.answer(CONTEXT, QUESTION).text
    assert any(r.name == "uvicorn.access" for r in caplog.records)  # the access log was captured...
    assert KEY not in caplog.text  # ...and holds no key


# ------------------------------------------------------------------------------------------------- page


def test_page_is_self_contained_and_escapes_text(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    html = response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for element in ('id="context"', 'id="question"', 'id="ask"', 'id="answer"', 'id="timing"', 'id="error"',
                    'id="api-key"'):
        assert element in html
    # Every script, style and image comes from this server.
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("/"), url
    script = (STATIC_DIR / "app.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write", script)
    assert ".textContent =" in script
    assert "localStorage" not in script  # the key stays in the page


# ------------------------------------------------------------------------------------------------- CLI


def test_serve_command_rejects_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from t5qa.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such model directory" in err[0] and "--model" in err[0]


def test_serve_command_builds_the_app_from_flags(tiny_model_dir: Path, fake_uvicorn: Any,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    from t5qa.cli import main

    monkeypatch.delenv("T5QA_API_KEY", raising=False)
    fake_uvicorn.start_app = False  # to see the app as the command built it, before start-up
    code = main(["serve", "--model", str(tiny_model_dir), "--port", "8123", "--max-batch-size", "8",
                 "--max-wait-ms", "2", "--max-pairs-per-request", "5", "--num-beams", "2"])
    assert code == 0
    config = fake_uvicorn.configs[0]
    assert (config.host, config.port) == ("127.0.0.1", 8123)
    state = config.app.state.t5qa
    assert state.limits.max_pairs_per_request == 5
    assert (state.batcher.max_batch_size, state.batcher.max_wait_ms) == (8, 2.0)
    assert state.predictor is None  # loaded only when the server starts
    assert "warning" not in capsys.readouterr().err


def test_serve_command_warns_on_a_public_host_without_a_key(tiny_model_dir: Path, fake_uvicorn: Any,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from t5qa.cli import main

    monkeypatch.delenv("T5QA_API_KEY", raising=False)
    fake_uvicorn.start_app = False  # the app is started below, by the TestClient
    assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    assert "without an API key" in capsys.readouterr().err
    # With the key from the environment: no warning, and the key is enforced.
    monkeypatch.setenv("T5QA_API_KEY", KEY)
    assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0"]) == 0
    assert "without an API key" not in capsys.readouterr().err
    assert fake_uvicorn.configs[-1].host == "0.0.0.0"
    with TestClient(fake_uvicorn.configs[-1].app) as c:
        assert c.get("/health").status_code == 401
        assert c.get("/health", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    from t5qa.cli.serve_cmd import is_loopback

    assert is_loopback(host) is loopback

