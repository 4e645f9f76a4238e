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

SETTINGS = ["--stage1-steps", "80", "--stage3-steps", "80", "--sampler", "ddim", "--sampling-steps", "1",
            "--no-flips", "--device", "cpu", "--preset", "small", "--no-report", "--progress", "json"]
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
    # both ranks scored their halves of the held-out slices and kept the same Stage I step (else the
    # summed loss would have left them waiting on each other, or the estimates would not fit together)
    validation = record["shells"]["b1000"]["stage1_validation"]
    assert validation["held_out_slices"] == 2 and len(validation["losses"]) == 40
    for name in ("[ddm2]", "[ddm2 rank 1]"):
        assert f"{name} stage1 [b1000]: kept step {validation['kept_step']} of 80" in completed.stderr
    kept = record["shells"]["b1000"]["stage3_validation"]["kept_step"]  # Stage III too, on the same slices
    for name in ("[ddm2]", "[ddm2 rank 1]"):
        assert f"{name} stage3 [b1000]: kept step {kept} of 80" in completed.stderr


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


def test_sigterm_to_torchrun_stops_both_ranks_at_one_checkpoint_and_the_run_resumes(phantom, tmp_path):
    """A cluster's scheduler stops a job with SIGTERM to torchrun, which passes it on to every rank."""
    import signal

    import torch

    noisy = tmp_path / "noisy.nii.gz"
    dwi_io.save_nifti(phantom.noisy, noisy)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    settings = [*SETTINGS, "--checkpoint-every", "1000"]
    settings[settings.index("--stage1-steps") + 1] = "300"
    command = [*TORCHRUN, "-m", "ddm2", "denoise", str(noisy), "--out", str(out), *settings]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # wait until both ranks train: a few Stage I steps reported
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "progress" and event.get("stage") == "stage1" and event.get("step", 0) >= 3:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "cancelled", stderr[-3000:]
    # both ranks stopped at the same step and took part in the checkpoint (its random states: one per rank)
    checkpoint = torch.load(out / "checkpoints" / "b1000" / "stage1.pt", map_location="cpu", weights_only=False)
    assert 3 <= checkpoint["step"] < 300 and len(checkpoint["randomness"]) == 2
    assert not (out / "denoised.nii.gz").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {checkpoint['step']} of 300" in resumed.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert (out / "denoised.nii.gz").is_file()
