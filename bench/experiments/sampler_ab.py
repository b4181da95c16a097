"""Batching by input length only against input and answer length (t5qa's default), in one process.

Each variant trains one epoch over bench/run.py's 416-example subset with t5qa's model, optimizer and collator
(fit()'s loop body); the variants alternate epoch by epoch, so load from other jobs hits both. Prints seconds
per epoch for each.

    .venv/bin/python bench/experiments/sampler_ab.py --model-dir DIR [--rounds 2]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import bench_train  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model-dir", required=True, help="a saved t5-small (bench/make_model.py)")
parser.add_argument("--rounds", type=int, default=2)
args = parser.parse_args()
keeping = common.start_t5qa_experiment()
import torch  # noqa: E402

from t5qa.config import EncodeConfig, TrainConfig  # noqa: E402
from t5qa.encode import LengthGroupedSampler, make_collator  # noqa: E402
from t5qa.train import setup  # noqa: E402

bench_train.EXAMPLES = 416  # bench/run.py's full mode: (2 warm-up + 50 timed steps) x batch 8
work = Path(tempfile.mkdtemp(prefix="t5qa-sampler-ab-"))
cfg = TrainConfig(model=args.model_dir, train=bench_train._train_file(work), output=str(work / "run"),
                  encode=EncodeConfig(max_source_tokens=common.MAX_SOURCE_TOKENS,
                                      max_target_tokens=common.MAX_TARGET_TOKENS),
                  train_batch_size=common.BATCH_SIZE, max_steps=100)
run = setup(cfg)
model, optimizer = run.model, run.optimizer
features = run.train_loader.dataset
sources = [len(f["input_ids"]) for f in features]
targets = [len(f["labels"]) for f in features]
collate = make_collator(run.tokenizer)


def epoch(sampler: LengthGroupedSampler) -> float:
    order = list(sampler)
    started = time.perf_counter()
    for k in range(0, len(order) - common.BATCH_SIZE + 1, common.BATCH_SIZE):
        batch = collate([features[i] for i in order[k:k + common.BATCH_SIZE]])
        batch.pop("example_index", None)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


variants = {
    "input length only, groups of 50 batches": LengthGroupedSampler(sources, common.BATCH_SIZE, seed=1,
                                                                    group_batches=50),
    "input and answer length, groups of 100 (default)": LengthGroupedSampler(
        sources, common.BATCH_SIZE, seed=1, group_batches=100, target_lengths=targets),
}
model.train()
epoch(next(iter(variants.values())))  # grow the heap once
seconds: dict[str, list[float]] = {k: [] for k in variants}
for round_ in range(args.rounds):
    for name, sampler in variants.items():
        sampler.set_epoch(round_)
        seconds[name].append(epoch(sampler))
print(json.dumps({"seconds per epoch": {k: [round(x, 1) for x in v] for k, v in seconds.items()}}))
