"""Prediction throughput of one implementation, in its own process: questions/s and peak RSS.

Every implementation answers the same first `--questions` dev questions (file order), greedily, with exactly
16 new tokens per answer (min = max = 16, so an untrained model does the work of a trained one), sources cut
at 384 tokens.

Implementations:
  generate-1        model.generate, one question at a time (the model card / tutorial way)
  generate-16       model.generate on batches of 16 in file order, padding within each batch
  t5qa-torch        t5qa.predict.Predictor(...).answer_many(pairs), PyTorch backend, t5qa defaults
  t5qa-ct2-int8     the same with the CTranslate2 backend on an int8 export
  t5qa-ct2-float32  the same on a float32 export

Timing: a short untimed warm-up, then wall clock over all questions, tokenisation and decoding included.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import common

IMPLS = ("generate-1", "generate-16", "t5qa-torch", "t5qa-ct2-int8", "t5qa-ct2-float32")
WARMUP_QUESTIONS = 4


class Clock:
    """Wall and CPU seconds of a `with` block."""

    def __enter__(self) -> "Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu


DEVICE = "cpu"  # --device (bench/gpu.py: cuda), the model in --dtype
DTYPE = "float32"


def _placed(model: Any) -> Any:
    import torch

    return model.to(device=DEVICE, dtype=getattr(torch, DTYPE))


def run_generate(model_dir: str, pairs: list[tuple[str, str]], batch_size: int) -> tuple[list[str], "Clock"]:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _placed(AutoModelForSeq2SeqLM.from_pretrained(model_dir))
    model.eval()

    def answer(chunk: list[tuple[str, str]]) -> list[str]:
        sources = [common.PROMPT.format(question=q.lstrip(), context=c.lstrip()) for c, q in chunk]
        inputs = tokenizer(sources, max_length=common.MAX_SOURCE_TOKENS, truncation=True, padding=True,
                           return_tensors="pt").to(DEVICE)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=common.NEW_TOKENS, min_new_tokens=common.NEW_TOKENS,
                                 num_beams=1, do_sample=False)
        assert out.shape[1] == common.NEW_TOKENS + 1, out.shape  # decoder start + 16 new tokens
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    answer(pairs[:WARMUP_QUESTIONS])
    with Clock() as clock:
        texts = []
        for i in range(0, len(pairs), batch_size):
            texts.extend(answer(pairs[i:i + batch_size]))
    return texts, clock


def run_t5qa(model_dir: str, pairs: list[tuple[str, str]], backend: str) -> tuple[list[str], "Clock", dict[str, Any]]:
    from t5qa.config import GenerateConfig
    from t5qa.predict import Predictor

    generate = GenerateConfig(min_new_tokens=common.NEW_TOKENS, max_new_tokens=common.NEW_TOKENS)
    predictor = Predictor.from_pretrained(model_dir, backend=backend, generate=generate,
                                          max_source_tokens=common.MAX_SOURCE_TOKENS,
                                          **({"device": DEVICE} if backend == "torch" else {}))
    if predictor.model is not None:
        _placed(predictor.model)  # in place: the dtype (the device is already the one asked for)
    predictor.answer_many(pairs[:WARMUP_QUESTIONS])
    warm = predictor.stats.windows
    with Clock() as clock:
        answers = predictor.answer_many(pairs)
    extra = {
        "generate_batch_size": predictor.batch_size(),
        "model_inputs": predictor.stats.windows - warm,  # > questions when long contexts need windows
    }
    return [a.text for a in answers], clock, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--model-dir", required=True, help="the model (or, for t5qa-ct2-*, its CTranslate2 export)")
    parser.add_argument("--questions", type=int, default=440, help="first N dev questions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", required=True, help="result JSON path")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, args.dtype

    common.set_threads()
    logging.basicConfig(level=logging.WARNING)
    rows = common.read_squad(common.DEV_FILE)[: args.questions]
    pairs = [(r.context, r.question) for r in rows]
    extra: dict[str, Any] = {}
    if args.impl == "generate-1":
        texts, clock = run_generate(args.model_dir, pairs, 1)
    elif args.impl == "generate-16":
        texts, clock = run_generate(args.model_dir, pairs, 16)
    else:
        backend = "torch" if args.impl == "t5qa-torch" else "ct2"
        texts, clock, extra = run_t5qa(args.model_dir, pairs, backend)
    result = {
        "name": args.impl,
        "kind": "predict",
        "questions": len(pairs),
        "seconds": clock.seconds,
        "questions_per_second": len(pairs) / clock.seconds,
        "cpu_per_wall": clock.cpu_seconds / clock.seconds,
        "questions_per_cpu_second": len(pairs) / clock.cpu_seconds,
        "answers": texts,
        **extra,
    }
    if DEVICE.startswith("cuda"):
        import torch

        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["device_name"] = torch.cuda.get_device_name()
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
