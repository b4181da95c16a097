"""Abuse the HTTP server on purpose: every bad request gets a 4xx with a message, and the server keeps answering.

All tests talk to a real uvicorn server on a loopback port (in a thread of this process) serving the tiny
model, so HTTP parsing, body streaming and connection handling are the real ones. After each abuse, a normal
request must still succeed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from conftest import running_server
from t5qa.config import GenerateConfig, ServeLimits  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTEXT = "the code is kilo . the city is oslo . alpha bravo ."
QUESTION = "what is the city?"
LIMITS = ServeLimits(max_request_bytes=100_000, max_pairs_per_request=16, max_context_chars=5_000,
                     max_question_chars=200, max_num_beams=4, max_new_tokens_cap=16)


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Any:
    from t5qa.predict import Predictor

    return Predictor.from_pretrained(tiny_model_dir, generate=GenerateConfig(max_new_tokens=4))


@pytest.fixture(scope="module")
def server(predictor: Any) -> Iterator[str]:
    from t5qa.serve import ServeConfig, create_app

    app = create_app(predictor, config=ServeConfig(limits=LIMITS, max_batch_size=16, max_wait_ms=2))
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def assert_still_answering(url: str) -> None:
    """A fresh client on a fresh connection gets a normal answer."""
    with httpx.Client(base_url=url, timeout=60) as c:
        response = c.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["answer"]["text"], str)


def assert_clear_4xx(response: httpx.Response, status: int | tuple[int, ...], *words: str) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    message = body.get("error")
    assert isinstance(message, str) and message.strip(), body
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# ------------------------------------------------------------------------------------ malformed requests


MALFORMED: list[tuple[str, bytes, int | tuple[int, ...], tuple[str, ...]]] = [
    ("truncated JSON", b'{"context": "a", "question": ', 400, ("JSON",)),
    ("not JSON", b"context=a&question=b", 400, ("JSON",)),
    ("empty body", b"", (400, 422), ()),
    ("invalid UTF-8", b'{"context": "\xff\xfe", "question": "q"}', (400, 422), ()),
    ("JSON array", b'[{"context": "a", "question": "b"}]', 422, ("object",)),
    ("JSON null", b"null", 422, ()),
    ("JSON number", b"42", 422, ()),
    ("JSON string", b'"context"', 422, ()),
    ("deeply nested", b'{"context": ' + b"[" * 5000 + b"]" * 5000 + b', "question": "q"}', (400, 422), ()),
    ("NaN literal", b'{"context": "a", "question": "b", "length_penalty": NaN}', (400, 422), ()),
    ("trailing garbage", b'{"context": "a", "question": "b"} {"x": 1}', 400, ()),
]


@pytest.mark.parametrize("name,body,status,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_gets_a_clear_4xx(server: str, client: httpx.Client, name: str, body: bytes,
                                         status: int | tuple[int, ...], words: tuple[str, ...]) -> None:
    response = client.post("/v1/answer", content=body, headers={"content-type": "application/json"})
    assert_clear_4xx(response, status, *words)
    assert_still_answering(server)


WRONG: list[tuple[str, Any, tuple[str, ...]]] = [
    ("context is a number", {"context": 1, "question": "q"}, ("context",)),
    ("question is null", {"context": "a", "question": None}, ("question",)),
    ("context is a list", {"context": ["a", "b"], "question": "q"}, ("context",)),
    ("question is an object", {"context": "a", "question": {"text": "q"}}, ("question",)),
    ("missing question", {"context": "a"}, ("question",)),
    ("missing everything", {}, ()),
    ("unknown field", {"context": "a", "question": "q", "temperature": 2}, ("unknown field",)),
    ("both forms", {"context": "a", "question": "q", "pairs": [{"context": "a", "question": "q"}]}, ("either",)),
    ("pairs not a list", {"pairs": "a"}, ("pairs",)),
    ("pairs empty", {"pairs": []}, ("empty",)),
    ("pair missing question", {"pairs": [{"context": "a"}]}, ("question",)),
    ("pair is a string", {"pairs": ["a"]}, ("pairs",)),
    ("num_beams as string", {"context": "a", "question": "q", "num_beams": "3"}, ("num_beams",)),
    ("num_beams as bool", {"context": "a", "question": "q", "num_beams": True}, ("num_beams",)),
    ("num_beams as float", {"context": "a", "question": "q", "num_beams": 2.5}, ("num_beams",)),
    ("num_beams too big", {"context": "a", "question": "q", "num_beams": 1000}, ("num_beams",)),
    ("num_beams zero", {"context": "a", "question": "q", "num_beams": 0}, ("num_beams",)),
    ("max_new_tokens negative", {"context": "a", "question": "q", "max_new_tokens": -1}, ("max_new_tokens",)),
    ("max_new_tokens huge", {"context": "a", "question": "q", "max_new_tokens": 10**30}, ("max_new_tokens",)),
    ("min above max", {"context": "a", "question": "q", "min_new_tokens": 8, "max_new_tokens": 2},
     ("min_new_tokens",)),
    ("length_penalty huge", {"context": "a", "question": "q", "length_penalty": 1e308}, ("length_penalty",)),
    ("no_repeat negative", {"context": "a", "question": "q", "no_repeat_ngram_size": -3},
     ("no_repeat_ngram_size",)),
    ("empty question", {"context": "a b c", "question": "   "}, ("question",)),
    ("empty context", {"context": "", "question": "q"}, ("context",)),
]


@pytest.mark.parametrize("name,body,words", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_types_and_missing_fields_get_422(server: str, client: httpx.Client, name: str, body: Any,
                                                words: tuple[str, ...]) -> None:
    assert_clear_4xx(client.post("/v1/answer", json=body), 422, *words)
    assert_still_answering(server)


@pytest.mark.parametrize("text", [
    "\u202e\u05d0\u05d1 \u0627\u0644 e\u0301 \U0001F600 \u200d",  # RTL override, Hebrew, Arabic, combining, emoji
    "nul \u0000 inside",
    "\ud800 lone surrogate",  # valid JSON escape, not encodable as UTF-8
    "\u2028line\u2029separators\x85",
])
def test_odd_unicode_is_answered_or_refused_never_a_5xx(server: str, client: httpx.Client, text: str) -> None:
    body = json.dumps({"context": f"{CONTEXT} {text}", "question": f"{QUESTION} {text}"}).encode()
    response = client.post("/v1/answer", content=body, headers={"content-type": "application/json"})
    if response.status_code == 200:
        assert isinstance(response.json()["answer"]["text"], str)
    else:
        assert_clear_4xx(response, (400, 422))
    assert_still_answering(server)


FUZZ_EXAMPLES = int(os.environ.get("T5QA_FUZZ_EXAMPLES", "60"))
_FIELDS = ["context", "question", "pairs", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
           "no_repeat_ngram_size", "extra"]
# Lone surrogates are left to test_odd_unicode_is_answered_or_refused_never_a_5xx.
_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
                    st.floats(allow_nan=False, allow_infinity=False), _text)
_json = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_FIELDS[:2]) | _text, inner, max_size=3)),
    max_leaves=10)
_bodies = st.one_of(
    _json,
    st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=5),
    st.fixed_dictionaries({"context": _text, "question": _text},
                          optional={k: _scalar for k in _FIELDS[3:8]}),
    st.fixed_dictionaries({"pairs": st.lists(st.fixed_dictionaries({"context": _text, "question": _text})
                                             | _json, max_size=20)}),
)


@pytest.mark.timeout(max(120, FUZZ_EXAMPLES * 3))
@settings(max_examples=FUZZ_EXAMPLES, deadline=timedelta(seconds=30), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies)
def test_fuzzed_json_bodies_never_get_a_5xx(client: httpx.Client, body: Any) -> None:
    response = client.post("/v1/answer", json=body)
    assert response.status_code < 500, (body, response.text[:300])
    if response.status_code == 200:
        data = response.json()
        expected = len(body["pairs"]) if isinstance(body, dict) and body.get("pairs") is not None else 1
        assert len(data["answers"]) == expected
    else:
        assert_clear_4xx(response, (400, 404, 405, 413, 422))


@pytest.mark.parametrize("name", ["\n", "a\tb", "\x00", "\u2028", "ok name\r\n"])
def test_field_names_with_line_breaks_are_quoted_on_one_line(client: httpx.Client, name: str) -> None:
    # Hypothesis once found {"pairs": [{"\n": null}]}: the raw name broke the one-line message.
    message = assert_clear_4xx(client.post("/v1/answer", json={"pairs": [{name: None}]}), 422, "unknown field")
    assert repr(name) in message and message.isprintable()


def test_wrong_method_and_path_get_4xx(server: str, client: httpx.Client) -> None:
    assert client.get("/v1/answer").status_code == 405
    assert client.post("/v1/nothing", json={}).status_code == 404
    assert client.post("/../../etc/passwd", json={}).status_code == 404
    assert_still_answering(server)


# ----------------------------------------------------------------------------------------- too much input


def test_oversize_body_with_content_length_gets_413(server: str, client: httpx.Client) -> None:
    body = json.dumps({"context": "x " * LIMITS.max_request_bytes, "question": "q"}).encode()
    assert_clear_4xx(client.post("/v1/answer", content=body, headers={"content-type": "application/json"}),
                     413, "larger than")
    assert_still_answering(server)


def test_oversize_chunked_body_without_content_length_gets_413(server: str, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"context": "'
        for _ in range(50):
            yield b"y" * 10_000  # 500 kB in all, 5x the limit
        yield b'", "question": "q"}'

    response = client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert_clear_4xx(response, 413, "larger than")
    assert_still_answering(server)


def test_lying_content_length_does_not_hang_or_crash(server: str) -> None:
    """Content-Length says 10 bytes, the body is longer: refused or the extra bytes ignored, never a hang."""
    host, port = server.removeprefix("http://").split(":")
    body = b'{"context": "a b", "question": "q"}'
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10\r\n\r\n" + body)
        reply = sock.recv(65536)
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:300]
    assert_still_answering(server)


def test_invalid_content_length_gets_400(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n{}")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert_still_answering(server)


def test_oversize_context_and_question_get_413(server: str, client: httpx.Client) -> None:
    long_context = {"context": "word " * (LIMITS.max_context_chars // 5 + 1), "question": QUESTION}
    assert_clear_4xx(client.post("/v1/answer", json=long_context), 413, "context", str(LIMITS.max_context_chars))
    long_question = {"context": CONTEXT, "question": "why " * LIMITS.max_question_chars}
    assert_clear_4xx(client.post("/v1/answer", json=long_question), 413, "question")
    in_pairs = {"pairs": [{"context": CONTEXT, "question": QUESTION}, long_context]}
    assert_clear_4xx(client.post("/v1/answer", json=in_pairs), 413, "pairs[1].context")
    assert_still_answering(server)


def test_thousands_of_pairs_in_one_request_get_413(server: str, client: httpx.Client) -> None:
    body = {"pairs": [{"context": "a b", "question": "q"}] * 5000}  # ~170 kB: over both limits
    assert_clear_4xx(client.post("/v1/answer", json=body), 413)
    small_pairs = {"pairs": [{"context": "a", "question": "q"}] * 2000}  # ~60 kB: under the byte limit
    assert_clear_4xx(client.post("/v1/answer", json=small_pairs), 413, "pairs", str(LIMITS.max_pairs_per_request))
    assert_still_answering(server)


def test_many_pairs_at_the_limit_are_all_answered_in_order(server: str, client: httpx.Client,
                                                           predictor: Any) -> None:
    pairs = [{"context": f"the code is {w} .", "question": "what is the code?"}
             for w in ["kilo", "lima", "oslo", "paris"] * (LIMITS.max_pairs_per_request // 4)]
    response = client.post("/v1/answer", json={"pairs": pairs})
    assert response.status_code == 200, response.text
    answers = [a["text"] for a in response.json()["answers"]]
    assert answers == [a.text for a in predictor.answer_many([(p["context"], p["question"]) for p in pairs])]


# ------------------------------------------------------------------------------------------ slow clients


def _raw_request_head(server: str, content_length: int) -> tuple[str, int, bytes]:
    host, port = server.removeprefix("http://").split(":")
    head = (f"POST /v1/answer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()
    return host, int(port), head


@pytest.mark.timeout(120)
def test_slow_clients_do_not_block_others(server: str) -> None:
    """Twenty clients send their headers, then dribble the body a byte at a time; meanwhile normal clients
    are answered at normal speed, and a dribbling client that finishes still gets its answer."""
    body = json.dumps({"context": CONTEXT, "question": QUESTION}).encode()
    slow = []
    for _ in range(20):
        host, port, head = _raw_request_head(server, len(body))
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(head)
        slow.append(sock)
    stop = threading.Event()
    sent = {id(s): 0 for s in slow}

    def dribble() -> None:
        # Everything but the last byte, slowly; the last byte only when the test says so.
        while not stop.is_set():
            for sock in slow:
                if sent[id(sock)] < len(body) - 1:
                    sock.sendall(body[sent[id(sock)]:sent[id(sock)] + 1])
                    sent[id(sock)] += 1
            stop.wait(0.05)

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    try:
        latencies = []
        with httpx.Client(base_url=server, timeout=30) as c:
            for _ in range(10):
                started = time.perf_counter()
                response = c.post("/v1/answer", json={"context": CONTEXT, "question": QUESTION})
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
        # Generous: the machine is shared. A blocked server would not answer at all (httpx timeout 30 s).
        assert max(latencies) < 20, latencies
    finally:
        stop.set()
        thread.join(timeout=5)
    # One slow client finishes its body: it is answered like anyone else.
    finisher = slow[0]
    finisher.sendall(body[sent[id(finisher)]:])
    reply = _read_http_response(finisher)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    # The rest just hang up half-way through their bodies.
    for sock in slow:
        sock.close()
    assert_still_answering(server)


def _read_http_response(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


@pytest.mark.timeout(60)
def test_client_that_disconnects_mid_body_or_mid_wait_does_not_hurt_the_server(server: str) -> None:
    body = json.dumps({"context": CONTEXT, "question": QUESTION}).encode()
    # Headers promise a body that never fully arrives.
    host, port, head = _raw_request_head(server, 10_000)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + b'{"context": "a')
    # A complete request whose client leaves before the answer.
    for _ in range(5):
        host, port, head = _raw_request_head(server, len(body))
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(head + body)
    # Garbage instead of HTTP.
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)))
        try:
            sock.recv(1024)
        except OSError:
            pass
    assert_still_answering(server)


# ----------------------------------------------------------------------------------------------------- load


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_400_requests_32_clients_no_5xx_no_drops(server: str) -> None:
    """400 requests from 32 concurrent clients: every one answered with 200, and concurrent requests shared
    model calls. (bench/load_test.py sends 2,000 and records the figures in bench/LOAD_RESULTS.md.)"""
    import asyncio

    before = httpx.get(f"{server}/health", timeout=30).json()

    async def scenario() -> list[int | str]:
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            async def one(i: int) -> int | str:
                async with gate:
                    try:
                        r = await c.post("/v1/answer", json={"context": CONTEXT, "question": f"{QUESTION} {i}"})
                    except httpx.HTTPError as exc:  # a dropped connection counts against the server
                        return type(exc).__name__
                    return r.status_code if r.status_code != 200 or r.json()["answers"] else "empty"

            return list(await asyncio.gather(*(one(i) for i in range(400))))

    codes = asyncio.run(scenario())
    assert codes == [200] * 400, sorted({str(c) for c in codes})
    after = httpx.get(f"{server}/health", timeout=30).json()
    assert after["requests_served"] - before["requests_served"] == 400
    assert after["batches_run"] - before["batches_run"] < 400  # concurrent requests shared model calls


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_with_abuse_mixed_in_keeps_good_requests_whole(server: str) -> None:
    """Bad requests fired alongside good ones under load: good ones all succeed, bad ones all get 4xx."""
    import asyncio

    bad_bodies = [b"{", b"[]", json.dumps({"context": 1, "question": "q"}).encode(),
                  json.dumps({"pairs": [{"context": "a", "question": "q"}] * 100}).encode()]

    async def scenario() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            async def good(i: int) -> int:
                r = await c.post("/v1/answer", json={"context": CONTEXT, "question": f"{QUESTION} {i}"})
                return r.status_code

            async def bad(i: int) -> int:
                r = await c.post("/v1/answer", content=bad_bodies[i % len(bad_bodies)],
                                 headers={"content-type": "application/json"})
                return r.status_code

            goods = [good(i) for i in range(100)]
            bads = [bad(i) for i in range(100)]
            results = await asyncio.gather(*goods, *bads)
            return list(results[:100]), list(results[100:])

    good_codes, bad_codes = asyncio.run(scenario())
    assert good_codes == [200] * 100
    assert all(400 <= code < 500 for code in bad_codes), sorted(set(bad_codes))
