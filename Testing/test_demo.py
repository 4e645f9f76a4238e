"""`ddm2 demo` (the README's main command), at test-sized training: every method scored against the
phantom's truth, the report written, and a second call picks the finished run up instead of redoing it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from ddm2.cli import main
from ddm2.phantom import make_phantom

ARGS = ["--stage1-steps", "100", "--stage3-steps", "100", "--device", "cpu"]


def test_demo_scores_every_method_and_resumes_its_own_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "demo_scores.json").read_text())["scores"]
    assert list(scores) == ["noisy", "MP-PCA", "Patch2Self", "Stage I", "DDM2"]
    assert all(name in printed for name in scores)
    # even at 100 + 100 steps the DDM2 output is clearly closer to the truth than the noisy input (measured:
    # +4.3 dB, +0.195 SSIM)
    assert scores["DDM2"]["psnr_db"] > scores["noisy"]["psnr_db"] + 2.0, scores
    assert scores["DDM2"]["ssim"] > scores["noisy"]["ssim"] + 0.1, scores
    assert (out / "report.png").stat().st_size > 50_000 and (out / "report.html").is_file()
    shell = json.loads((out / "run.json").read_text())["shells"]["b1000"]
    # 30 directions: the default ("auto") conditions Stage III's network on Stage I's estimate
    assert shell["stage3_condition"] == "stage1"
    # the demo samples with one ddim step, and the appendix-F check still tells its curves apart from
    # flat ones: each curve starts at the input, so one step rises as far as it moved the slice
    assert shell["outlier_slices"] == []
    # and averages F over the 4 flips of each slice (bench/RESULTS.md: better on every bench case)
    parameters = json.loads((out / "run.json").read_text())["parameters"]
    assert parameters["flips"] is True and parameters["target"] == "auto"
    # the run keeps its known truth beside it (bench/resample.py re-scores it from there)
    mask = nib.load(str(out / "phantom" / "mask.nii.gz")).get_fdata() > 0.5
    np.testing.assert_array_equal(mask, make_phantom().mask)

    stored = sorted((out / "checkpoints").rglob("*.*"))
    written = {path: path.stat().st_mtime_ns for path in stored}
    assert main(["demo", "--out", str(out), *ARGS, "--no-baselines"]) == 0
    again = json.loads((out / "demo_scores.json").read_text())["scores"]
    assert again["DDM2"] == scores["DDM2"] and again["Stage I"] == scores["Stage I"]
    # nothing was retrained or re-sampled: every stored model, estimate and result was only read
    assert {path: path.stat().st_mtime_ns for path in stored} == written
    assert len(stored) == 10  # 5 per shell: --n auto denoises the 2 b0s too (n = 1)
