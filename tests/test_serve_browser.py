"""The web page in a real headless Chromium against a real uvicorn server (Debian's /usr/bin/chromium, driven
by Playwright's Python API; no browser download)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONTEXT = "the code is kilo . the city is oslo . alpha bravo ."
QUESTION = "what is the city?"
KEY = "browser-test-key-71d0"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser tests",
                allow_module_level=True)
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from conftest import running_server  # noqa: E402


@pytest.fixture(scope="module")
def predictor(chatty_model_dir: Path) -> Any:
    """A Predictor on the chatty tiny model, which answers varied, non-empty text."""
    from t5qa.config import GenerateConfig
    from t5qa.predict import Predictor

    predictor = Predictor.from_pretrained(chatty_model_dir, generate=GenerateConfig(max_new_tokens=4))
    assert predictor.answer(CONTEXT, QUESTION).text != ""
    return predictor


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def _ask(page: Any, context: str, question: str) -> None:
    page.fill("#context", context)
    page.fill("#question", question)
    page.click("#ask")


def test_page_shows_the_predictors_answer_and_the_time(browser: Any, predictor: Any) -> None:
    from t5qa.serve import create_app

    with running_server(create_app(predictor)) as base:
        page = browser.new_page()
        page.goto(base + "/")
        assert page.title().startswith("t5qa")
        _ask(page, CONTEXT, QUESTION)
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert page.text_content("#answer") == predictor.answer(CONTEXT, QUESTION).text
        timing = page.text_content("#timing")
        assert "model" in timing and "round trip" in timing and ("ms" in timing or " s" in timing)
        assert page.is_hidden("#error")
        if os.environ.get("T5QA_SCREENSHOT"):
            page.screenshot(path=os.environ["T5QA_SCREENSHOT"], full_page=True)
        page.close()


class EchoPredictor:
    """Answers with the question itself, so the test controls exactly what text the page must display."""

    backend = "echo"

    def answer_many(self, pairs: list[tuple[str, str]], **options: Any) -> list[Any]:
        from t5qa.predict import Answer

        return [Answer(text=q, score=-0.1, window_index=0, num_windows=1, seconds=0.0) for _, q in pairs]


def test_page_shows_markup_as_text(browser: Any) -> None:
    from t5qa.serve import create_app

    markup = '<img id="injected" src="x" onerror="document.title=\'pwned\'"><b>bold</b>'
    with running_server(create_app(EchoPredictor())) as base:
        page = browser.new_page()
        page.goto(base + "/")
        _ask(page, CONTEXT, markup)
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert page.text_content("#answer") == markup
        assert page.query_selector("#injected") is None and page.query_selector("#answer b") is None
        assert page.title() != "pwned"
        page.close()


def test_page_shows_errors_readably(browser: Any, predictor: Any) -> None:
    from t5qa.config import ServeConfig, ServeLimits
    from t5qa.serve import create_app

    with running_server(create_app(predictor, config=ServeConfig(limits=ServeLimits(max_question_chars=20)))) \
            as base:
        page = browser.new_page()
        page.goto(base + "/")
        _ask(page, CONTEXT, "a question that is far too long for this server")
        page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        message = page.text_content("#error")
        assert "413" in message and "limit is 20" in message
        assert page.is_hidden("#result")
        page.close()


def test_page_sends_the_api_key_the_user_types(browser: Any, predictor: Any) -> None:
    from t5qa.serve import create_app

    with running_server(create_app(predictor, api_key=KEY)) as base:
        page = browser.new_page()
        page.goto(base + "/")
        # The page found out that the server wants a key (GET /health answered 401) and asks for it.
        page.wait_for_selector("#key-row:not([hidden])", timeout=20_000)
        _ask(page, CONTEXT, QUESTION)
        page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        assert "401" in page.text_content("#error")
        page.fill("#api-key", KEY)
        page.click("#ask")
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert page.text_content("#answer") == predictor.answer(CONTEXT, QUESTION).text
        assert page.is_hidden("#error")
        page.close()


class SpanPredictor:
    """Answers with a known span of the context, and records what the page asked for."""

    backend = "span"

    def __init__(self) -> None:
        self.options: list[dict[str, Any]] = []

    def answer_many(self, pairs: list[tuple[str, str]], **options: Any) -> list[Any]:
        from t5qa.predict import Answer

        self.options.append(options)
        answers = []
        for context, _ in pairs:
            start = context.index("credit")
            answers.append(Answer(text="credit <b>card</b>", score=-0.1, window_index=0, num_windows=1, seconds=0.0,
                                  in_context=True, answer_char_start=start, answer_char_end=start + 18))
        return answers


def test_page_marks_the_answer_in_its_context_and_asks_grounded(browser: Any) -> None:
    from t5qa.serve import create_app

    context = "Anomaly detection finds rare events, such as credit <b>card</b> fraud detection."
    spans = SpanPredictor()
    with running_server(create_app(spans)) as base:
        page = browser.new_page()
        page.goto(base + "/")
        page.click("#options summary")
        page.check("#grounded")
        _ask(page, context, "What is an example?")
        page.wait_for_selector("#where:not([hidden])", timeout=20_000)
        assert page.text_content("#where mark") == "credit <b>card</b>"  # marked, and shown as text
        assert page.text_content("#where") == context
        assert page.locator("#where b").count() == 0
        page.close()
    assert spans.options[-1].get("grounded") is True


def test_page_footer_names_the_model_not_its_directory(browser: Any, tmp_path: Path) -> None:
    import json

    from t5qa.serve import create_app

    model_dir = tmp_path / "private-disk-path" / "best"
    model_dir.mkdir(parents=True)
    (model_dir / "README.md").write_text("# fraud-qa\n", encoding="utf-8")
    (model_dir / "t5qa.json").write_text(json.dumps({"train_config": {"model": "t5-small"}}), encoding="utf-8")
    with running_server(create_app(EchoPredictor(), model_dir=model_dir)) as base:
        page = browser.new_page()
        page.goto(base + "/")
        # A locator waits in Playwright's own script world. wait_for_function with a string evaluates it in the
        # page, and the page's Content-Security-Policy (script-src 'self') refuses eval: one clean-clone CI run
        # failed on that EvalError (not reproduced here, a /health delayed by 1.5 s included).
        sync_api.expect(page.locator("#server-info")).to_contain_text("fraud-qa", timeout=20_000)
        footer = page.text_content("#server-info")
        assert "model fraud-qa" in footer and "from t5-small" in footer and "backend echo" in footer
        assert "private-disk-path" not in page.content()
        page.close()
