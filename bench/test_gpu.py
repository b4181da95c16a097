"""bench/gpu.sh: the dry run goes through the whole pipeline on the CPU and writes a report marked as a dry run;
the card's peak is looked up by name; without a GPU the real run refuses in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import gpu  # noqa: E402


def test_peak_is_found_by_the_longest_matching_name():
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA A10G") == 70.0
    assert gpu.peak_tflops("Some Future Card") is None


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(common.shared_data_missing() is not None, reason=str(common.shared_data_missing()))
def test_the_dry_run_measures_every_row(tmp_path):
    report = tmp_path / "GPU_RESULTS.md"
    proc = subprocess.run(["bash", str(HERE / "gpu.sh"), "--dry-run", "--output", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = report.read_text(encoding="utf-8")
    assert "DRY RUN" in text
    for name in ("trainer-best", "t5qa", "generate-16", "t5qa-torch"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert float(row.split("|")[2]) > 0, row  # a measured rate, not an error
    assert (tmp_path / "gpu_results.json").is_file()
    assert not (HERE / "GPU_RESULTS.md").exists() or "DRY RUN" not in (HERE / "GPU_RESULTS.md").read_text()


@pytest.mark.skipif(common.shared_data_missing() is not None, reason=str(common.shared_data_missing()))
def test_without_a_gpu_the_real_run_says_so(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU here" in err and "--dry-run" in err
