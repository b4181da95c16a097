"""Safety defaults: no pickle, no remote code, localhost only, the API key guarded, no user string reaching a shell,
`eval`, or a path outside the output directory.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import running_server
from t5qa.errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "src" / "t5qa"
CONTEXT = "the code is kilo . the city is oslo ."
QUESTION = "what is the city?"
KEY = "k3y-that-must-never-be-logged-71c0"


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from t5qa.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ pickled weights


class _RunsCodeWhenUnpickled:
    """Unpickling this creates a directory: the harmless stand-in for what a malicious pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def pickled_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of model.safetensors."""
    import torch

    from t5qa.modeling import load_model

    out = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_model_dir, out)
    model, _ = load_model(str(tiny_model_dir))
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


@pytest.fixture()
def malicious_model_dir(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose pytorch_model.bin runs code when unpickled; returns (dir, marker it would create)."""
    out = tmp_path / "malicious"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (out / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    return out, marker


def test_load_model_refuses_pickled_weights_without_allow_pickle(pickled_model_dir: Path) -> None:
    from t5qa.modeling import load_model

    with pytest.raises(ModelError, match="pickle") as info:
        load_model(str(pickled_model_dir))
    assert str(pickled_model_dir) in str(info.value) and "--allow-pickle" in str(info.value)
    model, _ = load_model(str(pickled_model_dir), allow_pickle=True)
    assert model is not None


def test_refused_pickle_is_never_unpickled(malicious_model_dir: tuple[Path, Path]) -> None:
    from t5qa.modeling import load_model

    directory, marker = malicious_model_dir
    with pytest.raises(ModelError):
        load_model(str(directory))
    assert not marker.exists(), "the pickled weights were unpickled although pickle is not allowed"


def test_predict_cli_refuses_pickled_weights_and_allows_them_with_the_flag(
        pickled_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", "--model", str(pickled_model_dir), "--context", CONTEXT, "--question", QUESTION, "--json"]
    code, out, err = _cli(argv, capsys)
    assert code == 2, (code, err)
    assert err.startswith("error: ") and "pickle" in err and "--allow-pickle" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = _cli(argv + ["--allow-pickle"], capsys)
    assert code == 0, err
    assert isinstance(json.loads(out)["text"], str)


@pytest.mark.parametrize("command", [
    ["evaluate", "--data", "DATA"],
    ["serve", "--port", "1"],
])
def test_other_commands_refuse_pickled_weights(pickled_model_dir: Path, tmp_path: Path, command: list[str],
                                               capsys: pytest.CaptureFixture[str],
                                               request: pytest.FixtureRequest) -> None:
    from t5qa.cli import build_parser

    if command[0] not in build_parser()._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        pytest.skip(f"`t5qa {command[0]}` is not registered in this build")
    if command[0] == "serve":
        request.getfixturevalue("fake_uvicorn")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "1", "context": CONTEXT, "question": QUESTION, "answers": ["oslo"]}) + "\n")
    argv = [a.replace("DATA", str(data)) for a in command] + ["--model", str(pickled_model_dir)]
    code, _, err = _cli(argv, capsys)
    assert code == 2, (code, err[-2000:])
    assert "pickle" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------- trust_remote_code


def _record_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    calls: list[tuple[str, dict[str, Any]]] = []
    for cls in (AutoModelForSeq2SeqLM, AutoTokenizer):
        original = cls.from_pretrained.__func__  # type: ignore[attr-defined]

        def recording(klass: Any, *args: Any, _original: Any = original, _name: str = cls.__name__,
                      **kwargs: Any) -> Any:
            calls.append((_name, dict(kwargs)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    return calls


def test_trust_remote_code_is_off_by_default(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from t5qa.modeling import load_model, load_tokenizer
    from t5qa.predict import Predictor

    calls = _record_from_pretrained(monkeypatch)
    load_model(str(tiny_model_dir))
    load_tokenizer(str(tiny_model_dir))
    Predictor.from_pretrained(tiny_model_dir)
    assert {name for name, _ in calls} == {"AutoModelForSeq2SeqLM", "AutoTokenizer"}
    for name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is False, (name, kwargs)
    model_calls = [kwargs for name, kwargs in calls if name == "AutoModelForSeq2SeqLM"]
    assert all(kwargs.get("use_safetensors") is True for kwargs in model_calls), model_calls


def test_trust_remote_code_is_passed_only_when_asked(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from t5qa.modeling import load_model

    calls = _record_from_pretrained(monkeypatch)
    load_model(str(tiny_model_dir), trust_remote_code=True)
    assert calls and all(kwargs.get("trust_remote_code") is True for _, kwargs in calls)


def test_predict_cli_does_not_trust_remote_code_by_default(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    calls = _record_from_pretrained(monkeypatch)
    code, _, err = _cli(["predict", "--model", str(tiny_model_dir), "--context", CONTEXT, "--question", QUESTION],
                        capsys)
    assert code == 0, err
    assert calls and all(kwargs.get("trust_remote_code") is False for _, kwargs in calls)


def test_remote_code_in_a_model_directory_is_not_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A config.json pointing at the directory's own Python code (auto_map): the code must not be imported."""
    from t5qa.modeling import load_model

    out = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, out)
    marker = tmp_path / "remote-code-ran"
    (out / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).mkdir()\n"
                                 "from transformers import T5ForConditionalGeneration as EvilModel\n"
                                 "from transformers import T5Config as EvilConfig\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSeq2SeqLM": "evil.EvilModel"}
    (out / "config.json").write_text(json.dumps(config))
    try:
        load_model(str(out))
    except ModelError:
        pass  # refusing is fine too; running the code is not
    assert not marker.exists(), "the model directory's own Python code ran without trust_remote_code"


# ------------------------------------------------------------------------------------------------- server


def test_serve_binds_to_localhost_by_default(tiny_model_dir: Path, fake_uvicorn: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(["serve", "--model", str(tiny_model_dir)], capsys)
    assert code == 0, err
    assert fake_uvicorn.configs[0].host == "127.0.0.1" and "warning" not in err.lower()


@pytest.fixture()
def keyed_server(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> Iterator[str]:
    """A real uvicorn server with an API key, every log record captured at DEBUG."""
    pytest.importorskip("uvicorn")

    from t5qa.predict import Predictor
    from t5qa.serve import create_app

    caplog.set_level(logging.DEBUG)
    app = create_app(Predictor.from_pretrained(tiny_model_dir), api_key=KEY)
    with running_server(app, log_level="debug") as url:
        yield url


def _server_log_leaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    # httpx/httpcore records are this test's own client logging its URLs, not the server's.
    server_records = [r for r in caplog.records if r.name.startswith(("uvicorn", "t5qa", "fastapi", "starlette"))]
    assert any(r.name == "uvicorn.access" for r in server_records), "no access log captured: the check is empty"
    return [f"{r.name}: {r.getMessage()}" for r in server_records if KEY in r.getMessage()]


def test_api_key_is_required_and_never_logged(keyed_server: str, caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    body = {"context": CONTEXT, "question": QUESTION}
    with httpx.Client(base_url=keyed_server, timeout=60) as client:
        missing = client.post("/v1/answer", json=body)
        wrong = client.post("/v1/answer", json=body, headers={"Authorization": "Bearer " + KEY[:-1] + "x"})
        prefix = client.post("/v1/answer", json=body, headers={"X-API-Key": KEY[:8]})
        longer = client.post("/v1/answer", json=body, headers={"X-API-Key": KEY + "0"})
        basic = client.post("/v1/answer", json=body, headers={"Authorization": f"Basic {KEY}"})
        health = client.get("/health")
        ok_bearer = client.post("/v1/answer", json=body, headers={"Authorization": f"Bearer {KEY}"})
        ok_header = client.post("/v1/answer", json=body, headers={"X-API-Key": KEY})
    for response in (missing, wrong, prefix, longer, basic, health):
        assert response.status_code == 401, (response.request.url, response.status_code)
        assert KEY not in response.text
        assert "error" in response.json()
    assert ok_bearer.status_code == 200 and ok_header.status_code == 200
    assert _server_log_leaks(caplog) == []


def test_api_key_sent_in_the_query_string_is_refused_and_not_logged(keyed_server: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A client that puts the key in the URL (a common mistake) is refused, and the key stays out of the
    server's access log (which would otherwise keep it in plain text)."""
    import httpx

    with httpx.Client(base_url=keyed_server, timeout=60) as client:
        response = client.post(f"/v1/answer?api_key={KEY}", json={"context": CONTEXT, "question": QUESTION})
    assert response.status_code == 401 and KEY not in response.text
    assert _server_log_leaks(caplog) == []


def test_api_key_from_the_environment_is_not_logged_by_the_serve_command(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, fake_uvicorn: Any) -> None:
    monkeypatch.setenv("T5QA_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    code, out, err = _cli(["-v", "serve", "--model", str(tiny_model_dir)], capsys)
    assert code == 0, err
    assert fake_uvicorn.health[0]["status"] == 401  # the key from the environment is in force
    assert KEY not in out and KEY not in err and KEY not in caplog.text
    assert KEY not in json.dumps(fake_uvicorn.health[0])


# ------------------------------------------------------------------------------------------- static scan


def _calls(tree: ast.AST) -> Iterator[tuple[ast.Call, str]]:
    """Every call with its dotted name ("os.system", "eval", "torch.load", ...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts = []
            func: ast.AST = node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            yield node, ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Calls that could run a user-controlled string or unpickle untrusted bytes."""
    problems = []
    tree = ast.parse(source, filename)
    for call, name in _calls(tree):
        where = f"{filename}:{call.lineno}: {name}()"
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            problems.append(f"{where} runs code from a string")
        elif name in ("os.system", "os.popen", "os.execv", "os.execvp", "os.spawnv", "commands.getoutput"):
            problems.append(f"{where} goes through a shell")
        elif name.startswith("subprocess.") and (_is_true(_keyword(call, "shell"))
                                                 or last in ("getoutput", "getstatusoutput")):
            problems.append(f"{where} with shell=True")
        elif name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads",
                      "marshal.loads", "marshal.load", "shelve.open", "joblib.load"):
            problems.append(f"{where} unpickles")
        elif name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            problems.append(f"{where} without weights_only=True unpickles")
        elif name == "yaml.load" and not any(
                isinstance(arg, ast.Attribute) and arg.attr in ("SafeLoader", "CSafeLoader")
                for arg in [*call.args[1:], *(k.value for k in call.keywords if k.arg == "Loader")]):
            problems.append(f"{where} without SafeLoader can build arbitrary objects")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            problems.append(f"{where} can build arbitrary objects")
    return problems


def test_the_scanner_catches_what_it_looks_for() -> None:
    bad = textwrap_dedent("""
        import os, subprocess, pickle, torch, yaml
        eval(x); exec(y); os.system(cmd); subprocess.run(cmd, shell=True); pickle.loads(b)
        torch.load(path); torch.load(path, weights_only=False); yaml.load(text); yaml.unsafe_load(text)
    """)
    good = textwrap_dedent("""
        import subprocess, torch, yaml
        subprocess.run(["ls", path]); torch.load(path, weights_only=True); yaml.load(t, Loader=yaml.SafeLoader)
        yaml.safe_load(text); model.eval()
    """)
    assert len(unsafe_calls(bad, "bad.py")) == 9
    assert unsafe_calls(good, "good.py") == []


def textwrap_dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


def test_no_eval_shell_pickle_or_unsafe_yaml_in_the_package() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO_ROOT)))]
    assert problems == []


# ---------------------------------------------------------------------------------- paths from user data


HOSTILE_IDS = ["../../escaped", "/tmp/t5qa-absolute-escape", "..\\..\\win-escape", "a/b/c", "~/home-escape",
               "", ".", "..", "nul\u0000byte", "x" * 300]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _hostile_rows() -> list[dict[str, Any]]:
    return [{"id": hostile, "context": f"{CONTEXT} item {i}", "question": f"{QUESTION} {i}", "answers": ["oslo"]}
            for i, hostile in enumerate(HOSTILE_IDS)]


def test_data_prepare_writes_only_inside_the_output_directory(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    data = work / "hostile.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _hostile_rows()))
    before = _tree(tmp_path)
    code, _, err = _cli(["data", "prepare", str(data), "--output", str(work / "out")], capsys)
    assert code == 0, err
    created = _tree(tmp_path) - before
    assert created == {"work/deeper/out", "work/deeper/out/train.jsonl", "work/deeper/out/validation.jsonl",
                       "work/deeper/out/test.jsonl", "work/deeper/out/report.json"}, created
    assert not Path("/tmp/t5qa-absolute-escape").exists()
    ids = [json.loads(line)["id"] for split in ("train", "validation", "test")
           for line in (work / "out" / f"{split}.jsonl").read_text().splitlines()]
    assert len(ids) == len(HOSTILE_IDS)  # kept as data, not used as paths


def test_predict_writes_only_its_output_file(tiny_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    data = work / "hostile.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _hostile_rows()))
    before = _tree(tmp_path)
    code, _, err = _cli(["predict", "--model", str(tiny_model_dir), "--data", str(data),
                         "--output", str(work / "answers.jsonl"), "--no-progress"], capsys)
    assert code == 0, err
    assert _tree(tmp_path) - before == {"work/deeper/answers.jsonl"}
    assert not Path("/tmp/t5qa-absolute-escape").exists()
    rows = [json.loads(line) for line in (work / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(HOSTILE_IDS)


def test_server_does_not_serve_files_outside_its_static_folder(tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from t5qa.predict import Predictor
    from t5qa.serve import create_app

    secret = (PACKAGE / "train.py").read_text(encoding="utf-8")[:200]
    with TestClient(create_app(Predictor.from_pretrained(tiny_model_dir))) as client:
        for path in ("/static/../train.py", "/static/..%2ftrain.py", "/static/%2e%2e/train.py",
                     "/static/..%2f..%2fpyproject.toml", "/static//etc/passwd", "/static/%2fetc%2fpasswd"):
            response = client.get(path)
            assert response.status_code in (400, 404), (path, response.status_code)
            assert secret not in response.text and "root:" not in response.text
