"""Training throughput of one implementation, in its own process: samples/s, useful FLOP/s, peak RSS.

Implementations (each written the way its users write it):
  trainer-default  Seq2SeqTrainer as examples/pytorch/question-answering/run_seq2seq_qa.py runs it by default:
                   every source padded to 384 tokens and every target to 30 (pad_to_max_length=True),
                   default_data_collator, random sampling.
  trainer-best     the same script with its best flags: dynamic padding (DataCollatorForSeq2Seq) and
                   train_sampling_strategy="group_by_length" (transformers 5's name for group_by_length).
  trainer-compile  trainer-best with torch_compile=True (TorchInductor; compiling falls in the untimed warm-up
                   epoch, and a new batch shape that recompiles falls where it happens).
  plain-512        the tutorial / simpleT5 loop: tokenizer(..., padding="max_length", max_length=512),
                   targets padded to 30, AdamW, shuffle.
  t5qa             t5qa.train.fit(TrainConfig(...)) with its defaults, evaluation and saving pushed past the end.

Timing: wall clock from the end of optimizer step `--warmup-steps` to the end of the last step, so model
loading, tokenisation and the first (slow) steps are excluded. FLOPs are counted per timed batch from its real
token counts (see flops.py), by wrapping the model class's forward, so every loop is measured the same way.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import common

IMPLS = ("trainer-default", "trainer-best", "trainer-compile", "plain-512", "t5qa")


EXAMPLES: int | None = None  # --examples: train on this fixed random subset (the same one for every tool)
BATCH_SIZE = common.BATCH_SIZE  # --batch-size
GPU = False  # --gpu: each tool's best GPU flags (bench/gpu.py): bf16, and for the Trainer tf32 and fused AdamW


def _rows() -> list[common.QA]:
    rows = common.read_squad(common.TRAIN_FILE)
    if EXAMPLES is not None and EXAMPLES < len(rows):
        keep = set(random.Random(0).sample(range(len(rows)), EXAMPLES))
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows


def _sources_targets() -> tuple[list[str], list[str]]:
    rows = _rows()
    return [common.prompt(r) for r in rows], [r.answer for r in rows]


def _train_file(work: Path) -> str:
    """The training file t5qa reads: the data set itself, or the --examples subset written as SQuAD JSON."""
    if EXAMPLES is None:
        return str(common.TRAIN_FILE)
    keep = {r.id for r in _rows()}
    return str(common.write_squad_subset(common.TRAIN_FILE, keep, work / "train-subset.json"))


def run_trainer(model_dir: str, best_flags: bool, steps: int, work: Path, timer: common.StepTimer,
                compile_model: bool = False) -> Any:
    import datasets
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
        default_data_collator,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # SDPA attention is transformers 5's default; named so that the GPU flags are all in view.
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, attn_implementation="sdpa")
    sources, targets = _sources_targets()
    raw = datasets.Dataset.from_dict({"source": sources, "target": targets})
    padding = False if best_flags else "max_length"

    def preprocess(batch: dict) -> dict:
        # as run_seq2seq_qa.py's preprocess_function
        inputs = tokenizer(batch["source"], max_length=common.MAX_SOURCE_TOKENS, padding=padding, truncation=True)
        labels = tokenizer(text_target=batch["target"], max_length=common.MAX_TARGET_TOKENS, padding=padding,
                           truncation=True)
        if padding == "max_length":  # ignore_pad_token_for_loss=True
            labels["input_ids"] = [[(t if t != tokenizer.pad_token_id else -100) for t in ids]
                                   for ids in labels["input_ids"]]
        inputs["labels"] = labels["input_ids"]
        return inputs

    train = raw.map(preprocess, batched=True, remove_columns=raw.column_names)
    collator = (DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100) if best_flags
                else default_data_collator)
    args = Seq2SeqTrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=common.LEARNING_RATE,
        max_steps=steps,
        **({"bf16": True, "tf32": True, "optim": "adamw_torch_fused"} if GPU else {}),
        train_sampling_strategy="group_by_length" if best_flags else "random",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=42,
        torch_compile=compile_model,
    )

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.mark()

    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                             processing_class=tokenizer, callbacks=[Timing()])
    trainer.train()
    return model.config, {"optimizer": str(args.optim), "sampling": args.train_sampling_strategy,
                          "torch_compile": compile_model}


def run_plain(model_dir: str, steps: int, timer: common.StepTimer) -> Any:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    sources, targets = _sources_targets()
    enc = tokenizer(sources, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    lab = tokenizer(targets, max_length=common.MAX_TARGET_TOKENS, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    lab[lab == tokenizer.pad_token_id] = -100
    data = torch.utils.data.TensorDataset(enc.input_ids, enc.attention_mask, lab)
    torch.manual_seed(42)
    loader = torch.utils.data.DataLoader(data, batch_size=common.BATCH_SIZE, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=common.LEARNING_RATE)
    model.train()
    done = 0
    while done < steps:
        for input_ids, attention_mask, labels in loader:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            timer.mark()
            done += 1
            if done == steps:
                break
    return model.config, {"optimizer": "torch.optim.AdamW (defaults)"}


def run_t5qa(model_dir: str, steps: int, work: Path, timer: common.StepTimer, counter: common.TokenCounter) -> Any:
    from transformers import AutoConfig

    from t5qa import fastpath
    from t5qa import train as t5qa_train
    from t5qa.config import EncodeConfig, TrainConfig

    enable = fastpath.enable

    def enable_uncounted(*args: Any, **kwargs: Any) -> Any:
        # The fast paths' start-up proof runs two forward passes before step one; they are not training steps,
        # and the token counter maps its i-th call to step i.
        counter.paused = True
        try:
            return enable(*args, **kwargs)
        finally:
            counter.paused = False

    fastpath.enable = enable_uncounted

    cfg = TrainConfig(
        model=model_dir,
        train=_train_file(work),
        validation=str(common.DEV_FILE),
        output=str(work / "t5qa-run"),
        encode=EncodeConfig(max_source_tokens=common.MAX_SOURCE_TOKENS, max_target_tokens=common.MAX_TARGET_TOKENS),
        train_batch_size=BATCH_SIZE,
        learning_rate=common.LEARNING_RATE,
        max_steps=steps,
        **({"precision": "bf16"} if GPU else {}),
        # evaluation and checkpoints belong to fit() but not to the step rate: push them past the last step
        # (fit still evaluates, on 8 examples, and saves once at the end, after the timed window)
        eval_every_steps=steps + 1,
        save_every_steps=steps + 1,
        max_eval_examples=8,
    )
    _mark_steps_via_optimizer(timer)
    t5qa_train.fit(cfg)
    return AutoConfig.from_pretrained(model_dir), {"t5qa_config": "defaults + the setting above"}


def _mark_steps_via_optimizer(timer: common.StepTimer) -> None:
    """Mark the end of each optimizer step from inside fit(), whatever optimizer class it builds.

    torch.optim.Optimizer has global step post-hooks, which fire after every optimizer.step() of any optimizer,
    so fit()'s loop stays untouched.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: timer.mark())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--model-dir", required=True, help="saved randomly initialised t5-small (bench/run.py makes it)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps after the warm-up")
    parser.add_argument("--examples", type=int, default=None,
                        help="train on this many examples (a fixed random subset, the same for every tool)")
    parser.add_argument("--batch-size", type=int, default=common.BATCH_SIZE)
    parser.add_argument("--gpu", action="store_true", help="each tool's best GPU flags (bench/gpu.py)")
    parser.add_argument("--out", required=True, help="result JSON path")
    args = parser.parse_args()
    global EXAMPLES, BATCH_SIZE, GPU
    EXAMPLES, BATCH_SIZE, GPU = args.examples, args.batch_size, args.gpu

    common.set_threads()
    logging.basicConfig(level=logging.WARNING)
    from transformers import T5ForConditionalGeneration

    counter = common.TokenCounter().install(T5ForConditionalGeneration)
    timer = common.StepTimer()
    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:  # a step ends when the card has finished it, not when its kernels are queued
        mark = timer.mark
        timer.mark = lambda: (torch.cuda.synchronize(), mark())[-1]  # type: ignore[method-assign]
    total = args.warmup_steps + args.steps
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="t5qa-bench-train-") as tmp:
        work = Path(tmp)
        if args.impl == "trainer-default":
            config, extra = run_trainer(args.model_dir, False, total, work, timer)
        elif args.impl == "trainer-best":
            config, extra = run_trainer(args.model_dir, True, total, work, timer)
        elif args.impl == "trainer-compile":
            config, extra = run_trainer(args.model_dir, True, total, work, timer, compile_model=True)
        elif args.impl == "plain-512":
            config, extra = run_plain(args.model_dir, total, timer)
        else:
            config, extra = run_t5qa(args.model_dir, total, work, timer, counter)
    extra["wall_seconds_total"] = time.perf_counter() - started
    extra["gpu_flags"] = GPU
    if on_gpu:
        extra["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        extra["device_name"] = torch.cuda.get_device_name()
    result = common.train_result(args.impl, timer=timer, counter=counter, warmup_steps=args.warmup_steps,
                                 model_config=config, extra=extra)
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
