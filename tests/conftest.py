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


def load_bench_load_test():
    """bench/load_test.py as a module: its `running_server` (real uvicorn on a free loopback port, in a
    thread) and `run_load` serve both the load benchmark and the server tests."""
    import importlib.util
    import sys

    name = "t5qa_bench_load_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / "load_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def running_server(app, **options):
    """Context manager: `app` served by real uvicorn on a free loopback port; yields the base URL."""
    return load_bench_load_test().running_server(app, **options)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two test processes share two cores: one intra-op thread each is far faster than oversubscribing."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_training_step(plain, fast, batch, grad_atol: float = 1e-5, grad_rtol: float = 0.0) -> None:
    """One training forward and backward pass of each model: the same loss and the same gradients."""
    import torch

    plain.train()
    fast.train()
    loss_plain, loss_fast = plain(**batch).loss, fast(**batch).loss
    loss_plain.backward()
    loss_fast.backward()
    assert torch.allclose(loss_plain, loss_fast, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=grad_atol, rtol=grad_rtol), name
