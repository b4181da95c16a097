"""Shared fixtures: tiny randomly initialised models with a locally trained tokenizer, offline, seconds to build.

`synthetic_copy_examples` is a task a tiny model learns in about a minute: the context holds a few
"<key> is <value>" facts among filler words, the question asks for one key, the answer is its value, copied
from the context.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

KEYS = ["code", "city", "color", "animal", "planet", "fruit"]
VALUES = ["kilo", "lima", "oslo", "paris", "amber", "cobalt", "otter", "heron", "mars", "venus", "mango",
          "lemon", "delta", "sierra", "tango", "viking", "zulu", "quartz", "maple", "cedar"]
FILLER = ["alpha", "bravo", "charlie", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "mike",
          "november", "oscar", "papa", "romeo", "uniform", "victor", "whiskey", "yankee"]


def synthetic_copy_examples(n: int, seed: int = 0, *, filler_words: int = 6) -> list:
    """n QAExamples of the copy task, each with its own context."""
    from t5qa.data import QAExample

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        keys = rng.sample(KEYS, 3)
        facts = [f"the {k} is {rng.choice(VALUES)}" for k in keys]
        words = [rng.choice(FILLER) for _ in range(filler_words)]
        parts = facts + [" ".join(words[j:j + 2]) for j in range(0, filler_words, 2)]
        rng.shuffle(parts)
        context = " . ".join(parts) + " ."
        asked = rng.choice(keys)
        answer = next(f.split(" is ")[1] for f in facts if f.startswith(f"the {asked} is"))
        start = context.index(f"the {asked} is {answer}") + len(f"the {asked} is ")
        examples.append(QAExample(id=f"copy-{seed}-{i}", context=context, question=f"what is the {asked}?",
                                  answers=(answer,), answer_starts=(start,), source=f"synthetic:{i}"))
    return examples


def _tokenizer_corpus() -> list[str]:
    rng = random.Random(1)
    words = KEYS + VALUES + FILLER + ["the", "is", "what", "question:", "context:", ".", "?", "fraud", "detection"]
    corpus = ["question: what is the code? context: the code is kilo ."]
    for _ in range(400):
        corpus.append(" ".join(rng.choice(words) for _ in range(12)))
    corpus += ["What is an example of anomaly detection? Credit card fraud detection, clustering, association rules."]
    corpus += ["Machine learning models learn patterns from data: 0 1 2 3 4 5 6 7 8 9 , ; : ! ( ) - ' \""]
    return corpus


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A T5Tokenizer (Unigram) trained on the synthetic vocabulary; <pad>=0, </s>=1, <unk>=2."""
    from t5qa.modeling import train_tokenizer

    return train_tokenizer(_tokenizer_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny T5 (t5qa 'tiny' preset, ~0.1M parameters) with its tokenizer and t5qa.json."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from t5qa.modeling import PRESETS, ensure_generation_ids, save_model

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tiny_tokenizer), **PRESETS["tiny"])
    model = T5ForConditionalGeneration(config)
    # T5 ties its output layer to the embeddings, so an untrained model predicts its start token (<pad>)
    # forever and answers "" to everything, which would let answer-equality tests pass vacuously. A zero
    # <pad> embedding makes it answer varied, non-empty text.
    with torch.no_grad():
        model.shared.weight[tiny_tokenizer.pad_token_id] = 0
    ensure_generation_ids(model, tiny_tokenizer)
    out = tmp_path_factory.mktemp("models") / "tiny"
    meta = {"prompt_template": "question: {question} context: {context}", "max_source_tokens": 128,
            "stride_tokens": 32, "max_target_tokens": 16, "answer_tokens_p99": 4}
    save_model(model, tiny_tokenizer, out, meta)
    return out


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """(model, tokenizer) loaded fresh from tiny_model_dir (tests may modify it)."""
    from t5qa.modeling import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this machine does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (the shared QA data sets only exist on the development machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def t5_small_tokenizer_dir(shared_data) -> Path:
    """The real t5-small tokenizer directory (no weights)."""
    path = shared_data / "t5-small-tokenizer"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny_model_dir with weights scaled x3 and no <pad>/<unk> logits: it answers input-dependent,
    non-empty text, so tests comparing answers (batch vs single, ct2 vs torch, server vs Predictor) can tell
    answers apart."""
    import torch

    from t5qa.modeling import load_model, read_meta, save_model

    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
        model.shared.weight[[tokenizer.pad_token_id, tokenizer.unk_token_id]] = 0.0
    out = tmp_path_factory.mktemp("chatty") / "model"
    save_model(model, tokenizer, out, read_meta(tiny_model_dir))
    return out


def running_server(app, **options):
    """Context manager: `app` served by real uvicorn on a free loopback port; yields the base URL."""
    from t5qa.serve import running_server as run

    return run(app, **options)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two test processes share two cores: one intra-op thread each is far faster than oversubscribing."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_training_step(plain, fast, batch) -> None:
    """One training forward and backward pass of each model: the loss and every gradient agree to the tolerance
    the start-up proof applies and the README states (`t5qa.fastpath.TOLERANCE`)."""
    import torch

    from t5qa.fastpath.proof import Pass, difference

    passes = []
    for model in (plain, fast):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        passes.append(Pass(float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert difference(*passes) is None, difference(*passes)
    assert torch.isfinite(torch.tensor(passes[0].loss))


def micro_t5(dropout_rate: float, attn: str = "sdpa"):
    """A two-layer T5 of width 32 over 64 token ids, the same weights on every call."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                      dropout_rate=dropout_rate, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      relative_attention_num_buckets=8, attn_implementation=attn)
    return T5ForConditionalGeneration(config)


def micro_batch() -> dict:
    """Three padded examples for `micro_t5`."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, 64, (3, 5), generator=g)}


class FakeUvicorn:
    """What `t5qa serve` handed uvicorn, with no socket opened: `configs` (each uvicorn.Config), and with
    `start_app` (the default) the app's start-up run through a TestClient and its /health answer in `health`."""

    def __init__(self) -> None:
        self.configs: list = []
        self.health: list[dict] = []
        self.start_app = True


@pytest.fixture()
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> FakeUvicorn:
    """Replace uvicorn.Server.run for the serve command's tests."""
    uvicorn = pytest.importorskip("uvicorn")
    fake = FakeUvicorn()

    def run(self, sockets=None) -> None:
        fake.configs.append(self.config)
        if not fake.start_app:
            self.started = True
            return
        from fastapi.testclient import TestClient

        try:
            with TestClient(self.config.app) as client:
                self.started = True
                response = client.get("/health")
                fake.health.append({"status": response.status_code, "body": response.json()})
        except Exception:  # noqa: BLE001 - a start-up failure is reported by the serve command itself
            pass

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return fake
