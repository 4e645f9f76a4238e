"""`torchrun -m ddm2 denoise` with two CPU ranks (gloo): every slice is denoised exactly once, rank 0
alone speaks the progress protocol and writes the outputs, and the result is as good as one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ddm2 import dwi as dwi_io
from ddm2.metrics import psnr
from ddm2.phantom import Phantom, default_gradient_table, make_phantom

SETTINGS = ["--stage1-steps", "80", "--stage3-steps", "80", "--sampler", "ddim", "--sampling-steps", "4",
            "--device", "cpu", "--preset", "small", "--no-report", "--progress", "json"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
MARGIN_DB = 0.5  # two ranks train on different batches than one: the same quality, not the same numbers


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    bvals, bvecs = default_gradient_table(n_b0=1, n_directions=8)
    return make_phantom((24, 24, 3), bvals, bvecs, snr=8, seed=3)


@pytest.fixture(scope="module")
def runs(phantom, tmp_path_factory) -> dict[int, tuple[subprocess.CompletedProcess, Path]]:
    """The same denoising by one process and by two torchrun ranks."""
    folder = tmp_path_factory.mktemp("distributed")
    noisy = folder / "noisy.nii.gz"
    dwi_io.save_nifti(phantom.noisy, noisy)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    results = {}
    for processes, launcher in ((1, [sys.executable]), (2, TORCHRUN)):
        out = folder / f"ranks{processes}"
        results[processes] = (subprocess.run([*launcher, "-m", "ddm2", "denoise", str(noisy), "--out", str(out),
                                              *SETTINGS], capture_output=True, text=True, timeout=300, env=env),
                              out)
    return results


def _events(completed: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def test_two_ranks_denoise_every_slice_exactly_once(runs):
    completed, out = runs[2]
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["processes"] == 2
    by_rank = record["shells"]["b1000"]["inference_slices_by_rank"]
    assert len(by_rank) == 2 and all(len(part) == 12 for part in by_rank)  # 8 volumes x 3 slices, halved
    assert sorted(by_rank[0] + by_rank[1]) == list(range(8 * 3))
    assert (out / "denoised.nii.gz").is_file() and (out / "fa.nii.gz").is_file()
    assert "[ddm2 rank 1]" in completed.stderr  # rank 1 ran, and logged under its name


def test_only_rank_zero_speaks_the_progress_protocol(runs):
    completed, _ = runs[2]
    names = [event["event"] for event in _events(completed)]
    assert names.count("start") == 1 and names.count("done") == 1
    assert names[0] == "start" and names[-1] == "done"


def test_two_ranks_denoise_as_well_as_one(runs, phantom):
    scores = {}
    for processes, (completed, out) in runs.items():
        assert completed.returncode == 0, completed.stderr[-3000:]
        denoised = nib.load(str(out / "denoised.nii.gz")).get_fdata(dtype=np.float32)
        weighted = ~phantom.noisy.b0_mask
        scores[processes] = psnr(denoised[..., weighted], phantom.truth.data[..., weighted], phantom.mask)
    noisy = psnr(phantom.noisy.data[..., weighted], phantom.truth.data[..., weighted], phantom.mask)
    assert scores[1] > noisy + 1.0, (scores, noisy)  # the comparison is between two real denoisings
    assert scores[2] > scores[1] - MARGIN_DB, (scores, noisy)
