"""Two ways of running the same training step, on real batches, in one process.

Builds fit()'s model, optimizer and loader with t5qa.train.setup() on the benchmark's TyDi QA data, then trains on
each batch twice, once per variant, alternating which goes first; the first two batches only warm up. So both
variants see the same shapes and the same load from other jobs. Prints total seconds per variant. The variants are
levers whose fixed-shape measurement (train_levers.py) needs checking on real batches:

- `sparse_embedding_grads`: the tied embedding's lookups give sparse gradients (nn.Embedding(sparse=True)),
  added into the output layer's dense gradient instead of zero-filling a 64 MiB buffer per lookup.
- `onednn_forward`: t5qa's FastLinear (every linear layer's forward product and input gradient through oneDNN,
  `torch.ops.mkldnn._linear_pointwise`) against nn.Linear (MKL).
- `onednn_input_grad`: FastLinear (forward product and input gradient through oneDNN) against a version with
  only the forward product through oneDNN (the input gradient through MKL, as FastLinear had it before).
- `fast_norm`: t5qa's T5 layer norm (one autograd function) against transformers' T5LayerNorm.
- `dropped_product`: attention's dropout applied inside the product with the values (the dropped weights
  recomputed in the backward pass) against dropout, then the product.

    .venv/bin/python bench/experiments/step_ab.py --model-dir DIR --variant sparse_embedding_grads [--batches 22]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model-dir", required=True, help="a saved t5-small (bench/make_model.py)")
parser.add_argument("--variant", required=True, choices=("sparse_embedding_grads", "onednn_forward", "onednn_input_grad",
                                                    "fast_norm", "dropped_product"))
parser.add_argument("--batches", type=int, default=22)
args = parser.parse_args()
keeping = common.start_t5qa_experiment()
import torch  # noqa: E402

from t5qa.config import EncodeConfig, TrainConfig  # noqa: E402
from t5qa.fastpath.linear import FastLinear  # noqa: E402
from t5qa.train import setup  # noqa: E402

cfg = TrainConfig(model=args.model_dir, train=str(common.TRAIN_FILE),
                  output=str(Path(tempfile.mkdtemp(prefix="t5qa-step-ab-")) / "run"),
                  encode=EncodeConfig(max_source_tokens=common.MAX_SOURCE_TOKENS,
                                      max_target_tokens=common.MAX_TARGET_TOKENS),
                  train_batch_size=common.BATCH_SIZE, learning_rate=common.LEARNING_RATE, max_steps=2 * args.batches)
run = setup(cfg)
model, optimizer, accelerator = run.model, run.optimizer, run.accelerator
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]


def sparse_embedding_grads() -> Callable[[bool], None]:
    tied = model.get_input_embeddings().weight
    # transformers 5 gives the encoder and decoder their own nn.Embedding modules sharing the weight
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is tied]

    def switch(on: bool) -> None:
        for module in embeddings:
            module.sparse = on
    return switch


def onednn_forward() -> Callable[[bool], None]:
    linears = [m for m in model.modules() if isinstance(m, FastLinear)]  # setup() made them FastLinear
    if not linears:
        sys.exit("skipped: this PyTorch build has no oneDNN linear operator")

    def switch(on: bool) -> None:
        for module in linears:
            module.__class__ = FastLinear if on else torch.nn.Linear
    return switch


def onednn_input_grad() -> Callable[[bool], None]:
    from t5qa.fastpath import linear as fastpath

    threshold = fastpath._INPUT_GRAD_ONEDNN_MIN_ROWS

    def switch(on: bool) -> None:  # off: no product reaches the threshold, so every input gradient is MKL's
        fastpath._INPUT_GRAD_ONEDNN_MIN_ROWS = threshold if on else sys.maxsize
    return switch


def fast_norm() -> Callable[[bool], None]:
    # setup() gave every T5LayerNorm t5qa's subclass; its base is transformers' class
    fast_classes = {m: type(m) for m in model.modules() if type(m).__name__.startswith("FastT5")}

    def switch(on: bool) -> None:
        for module, fast in fast_classes.items():
            module.__class__ = fast if on else fast.__mro__[1]
    return switch


def dropped_product() -> Callable[[bool], None]:
    from t5qa.fastpath import dropout as fastpath

    fused = fastpath.dropped_product

    def separate(weights, value, p, training=True):  # type: ignore[no-untyped-def]
        return torch.matmul(fastpath.dropout(weights, p, training), value)

    def switch(on: bool) -> None:
        fastpath.dropped_product = fused if on else separate  # t5qa's attention looks it up at each call
    return switch


switch = {"sparse_embedding_grads": sparse_embedding_grads, "onednn_forward": onednn_forward,
          "onednn_input_grad": onednn_input_grad, "fast_norm": fast_norm,
          "dropped_product": dropped_product}[args.variant]()
seconds = {False: 0.0, True: 0.0}
batches = iter(run.train_loader)
for i in range(args.batches):
    batch = next(batches)
    batch.pop("example_index", None)
    for on in ((True, False) if i % 2 else (False, True)):
        switch(on)
        started = time.perf_counter()
        accelerator.backward(model(**batch).loss)
        run.fast.limit_gradient_norm(accelerator, model, trainable, run.cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            seconds[on] += time.perf_counter() - started
print(json.dumps({"variant": args.variant, "batches_timed": args.batches - 2, "baseline_seconds": seconds[False],
                  "variant_seconds": seconds[True], "speedup": seconds[False] / seconds[True]}), flush=True)
