"""glibc keeping freed memory while training (`t5qa.fastpath.allocator`)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from t5qa.fastpath.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is glibc's")
def test_keep_freed_memory_stops_remapping_memory_every_step() -> None:
    # In a process of its own: glibc's settings and heap are process-wide, and another test in this worker may
    # have grown the heap already or still hold a keep_freed_memory block, so the first step would fault nothing.
    import os
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent / "src")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", "import test_fastpath_allocator as t; t._measure_faults()"],
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip("not glibc")
    assert done.returncode == 0, done.stderr[-3000:]


def _measure_faults() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    # t5-small's vocabulary and width, one layer: its 64 MiB embedding gradient is above glibc's largest mmap
    # threshold, so by default every step maps it (and other large blocks) afresh: tens of thousands of faults.
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_ff=512, d_kv=32, num_heads=4,
                                                num_layers=1, num_decoder_layers=1, decoder_start_token_id=0))
    model.train()
    batch = {"input_ids": torch.randint(2, 32128, (4, 64)), "labels": torch.randint(2, 32128, (4, 8))}

    def faults_of_a_step() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with keep_freed_memory() as kept:
        if not kept:
            sys.exit(3)  # the test skips: not glibc
        first = faults_of_a_step()  # the heap grows to the step's size once
        with keep_freed_memory():  # a nested block (a fit() inside another) must not undo the setting
            pass
        later = sorted(faults_of_a_step() for _ in range(5))
    assert later[2] < first / 5, (first, later)  # later steps reuse the heap's pages
    with keep_freed_memory(False) as kept:
        assert kept is False
