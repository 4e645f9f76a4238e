"""`ddm2 denoise` end to end: the contract's outputs, resume after a kill, cancellation, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from ddm2 import dwi as dwi_io
from ddm2.cli import main
from ddm2.data import group_shells
from ddm2.phantom import default_gradient_table, make_phantom
from ddm2.pipeline import Settings, b0_guided_shells, b0_snr
from ddm2.progress import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK
from ddm2.stage1 import input_channels
from paths import PHILIPS, needs_philips

TINY = ["--stage1-steps", "4", "--stage3-steps", "4", "--sampler", "ddim", "--sampling-steps", "2",
        "--device", "cpu", "--preset", "small"]
CONTRACT_OUTPUTS = ["denoised.nii.gz", "denoised.bval", "denoised.bvec", "denoised.nrrd", "residual.nii.gz",
                    "residual_rms.nii.gz", "mask.nii.gz", "run.json"] + \
    [f"{name}{suffix}.nii.gz" for name in ("fa", "md", "ad", "rd", "color_fa") for suffix in ("", "_input")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory) -> Path:
    """A small phantom with 1 b0 (passed through) and 8 directions, volumes in a shuffled order."""
    bvals, bvecs = default_gradient_table(n_b0=1, n_directions=8)
    order = np.array([3, 0, 5, 1, 8, 2, 7, 4, 6])  # the b0 is volume 1: output order must follow the input
    phantom = make_phantom((24, 24, 3), bvals[order], bvecs[order], snr=8, seed=3)
    path = tmp_path_factory.mktemp("tiny") / "dwi.nii.gz"
    dwi_io.save_nifti(phantom.noisy, path)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, list[dict], str]:
    code = main(args)
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    return code, events, captured.err


def test_denoise_writes_every_output_of_the_contract(tiny_input, tmp_path, capsys):
    before = digest(tiny_input)
    handlers = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]
    out = tmp_path / "run"
    code, events, _ = run_cli(["denoise", str(tiny_input), "--out", str(out), "--progress", "json", *TINY,
                               "--stage3-condition", "stage1", "--no-report"], capsys)
    assert code == EXIT_OK
    # a Python session that ran the engine gets its Ctrl-C back (the run's handlers only cancel a run)
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert digest(tiny_input) == before  # the input is never written
    for name in CONTRACT_OUTPUTS:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.partial*"))
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "done"
    stages = {e["stage"] for e in events if e["event"] == "progress"}
    assert {"stage1", "stage2", "stage3", "inference", "outputs"} <= stages
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert set(events[-1]["outputs"]) >= {"denoised", "denoised_nrrd", "residual", "fa", "fa_input", "run_json"}

    source = dwi_io.load(tiny_input)
    image = nib.load(str(out / "denoised.nii.gz"))
    denoised = image.get_fdata(dtype=np.float32)
    assert denoised.shape == source.data.shape
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-6)
    np.testing.assert_array_equal(denoised[..., 1], source.data[..., 1])  # the lone b0 passes through
    assert not np.array_equal(denoised[..., 0], source.data[..., 0])
    # intensities are in the input's units, volume by volume (not the model's [-1, 1]); after 4 training
    # steps only the scale is meaningful, the exact inverse is tested in test_data
    ratio = denoised[..., 2:].mean(axis=(0, 1, 2)) / source.data[..., 2:].mean(axis=(0, 1, 2))
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    np.testing.assert_allclose(np.loadtxt(out / "denoised.bval"), source.bvals)

    array, header = nrrd.read(str(out / "denoised.nrrd"))
    assert header["modality"] == "DWMRI" and array.shape == (9, 24, 24, 3)
    reread = dwi_io.load(out / "denoised.nrrd")
    np.testing.assert_allclose(reread.bvecs, source.bvecs, atol=1e-9)
    np.testing.assert_allclose(reread.bvals, source.bvals, atol=1e-6)
    np.testing.assert_allclose(reread.data, denoised, rtol=1e-6)

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done"
    assert record["parameters"]["n"] == 0 and record["parameters"]["preset"] == "small"  # n: auto
    # by default Stage III estimates the signal where the background gives the noise level
    assert record["parameters"]["target"] == "auto" and record["noise_sigma"] > 0
    assert {"stage1_b1000", "stage3_b1000", "inference_b1000", "outputs"} <= set(record["timings_s"])
    states = np.array(record["shells"]["b1000"]["stage2"]["states"])
    assert states.shape == (8, 3) and states.min() >= 1
    assert record["shells"]["b0"]["denoised"] is False
    b1000 = record["shells"]["b1000"]
    assert b1000["stage3_condition"] == "stage1"
    assert b1000["n"] == 3  # auto: the most that leave a second disjoint set among 8 volumes
    for v, (first, second) in enumerate(zip(b1000["neighbours"], b1000["second_neighbours"])):
        assert len({v, *first, *second}) == 7  # the independent estimate shares no volume with Stage I's
    assert set(record["versions"]) >= {"torch", "dipy", "ddm2"}
    residual = nib.load(str(out / "residual.nii.gz")).get_fdata()
    np.testing.assert_allclose(residual, source.data - denoised, atol=1e-3)


@pytest.mark.parametrize("asked", ["stage1", "auto"])
def test_a_shell_too_small_for_a_conditioned_stage3_gets_the_papers(tiny_input, tmp_path, capsys, asked):
    """stage1 needs 2n + 1 volumes (here n = 4: 9 > 8); auto conditions only shells of 30 or more."""
    out = tmp_path / "run"
    code, _, err = run_cli(["denoise", str(tiny_input), "--out", str(out), *TINY, "--n", "4",
                            "--stage3-condition", asked, "--b0-guide", "off", "--no-report"], capsys)
    assert code == EXIT_OK
    told = "b1000]: 8 volumes, fewer than 2n + 1 = 9: F is not conditioned on Stage I" in err
    assert told == (asked == "stage1")  # auto chose the paper's F itself: nothing to report
    assert json.loads((out / "run.json").read_text())["shells"]["b1000"]["stage3_condition"] == "none"
    weights = torch.load(out / "checkpoints" / "b1000" / "stage3.pt", weights_only=False)["model"]
    assert weights["input.weight"].shape[1] == 1  # F's first convolution takes the state alone


@pytest.mark.parametrize("method, condition, stage3_channels", [("directional", "none", 2),
                                                                ("directional", "stage1", 3),
                                                                ("paper", "none", 1)])
def test_the_b0_guide_feeds_the_weighted_shells_stage1_and_f_of_the_directional_method(tiny_input, tmp_path, capsys,
                                                                                        method, condition,
                                                                                        stage3_channels):
    """The input's only b0 is passed through (n + 1 > 1), yet it still guides the b1000 shell: Stage I
    sees its slices z - 1..z + 1, F its slice z after the state (and after Stage I's estimate)."""
    out = tmp_path / "run"
    code, _, _ = run_cli(["denoise", str(tiny_input), "--out", str(out), *TINY, "--n", "2", "--method", method,
                          "--stage3-condition", condition, "--b0-guide", "on", "--no-report"], capsys)
    assert code == EXIT_OK
    guided = method == "directional"
    assert json.loads((out / "run.json").read_text())["shells"]["b1000"]["b0_guide"] == guided
    folder = out / "checkpoints" / "b1000"
    weights = torch.load(folder / "stage1.pt", weights_only=False)["model"]
    context = 1 if guided else 0
    assert weights["input.weight"].shape[1] == input_channels(2, context, guided)
    weights = torch.load(folder / "stage3.pt", weights_only=False)["model"]
    assert weights["input.weight"].shape[1] == stage3_channels


def test_auto_guides_the_weighted_shells_of_fewer_than_30_directions_at_a_b0_snr_of_at_most_15():
    bvals = np.array([0] * 2 + [1000] * 6 + [2000] * 29 + [3000] * 30, dtype=float)
    shells = group_shells(bvals)

    def guided(guide: str, snr: float | None = 10.0, method: str = "directional", b0_count: int = 2) -> list[str]:
        settings = Settings(b0_guide=guide, method=method)
        return [shell.name for shell in b0_guided_shells(settings, shells, b0_count, snr)]

    assert guided("auto") == guided("auto", 15.0) == ["b1000", "b2000"]
    assert guided("auto", 15.1) == guided("auto", None) == []  # a clean scan, or one whose sigma is unknown
    assert guided("on") == guided("on", 50.0) == guided("on", None) == ["b1000", "b2000", "b3000"]
    assert guided("off") == guided("auto", method="paper") == guided("on", b0_count=0) == []


@pytest.mark.parametrize("snr", [5, 20])
def test_the_b0_snr_is_the_one_the_bench_cases_are_made_with(snr):
    phantom = make_phantom(snr=snr, seed=0)
    assert b0_snr(phantom.noisy, phantom.sigma) == pytest.approx(snr, rel=0.1)


def test_the_signal_target_takes_the_rician_floor_out_of_low_signal(tmp_path, capsys):
    """Where the signal is far below the noise (the background, and CSF at b = 1000), F trained against
    the noisy slices answers their mean, which Rician noise lifts to about sigma sqrt(pi / 2); trained
    against the signal target it answers the signal. Same seed, so the same Stage I: only F differs."""
    from scipy import ndimage

    from ddm2.phantom import CSF

    phantom = make_phantom((32, 32, 4), snr=5, seed=2)
    path = tmp_path / "dwi.nii.gz"
    dwi_io.save_nifti(phantom.noisy, path)
    options = ["--stage1-steps", "100", "--stage3-steps", "200", "--sampler", "ddim", "--sampling-steps", "1",
               "--device", "cpu", "--preset", "small", "--holdout", "0", "--no-report"]
    outputs = {}
    for target in ("mean", "auto"):  # auto: signal, since the phantom has a background
        out = tmp_path / target
        code, _, err = run_cli(["denoise", str(path), "--out", str(out), *options, "--target", target], capsys)
        assert code == EXIT_OK, err
        outputs["signal" if target == "auto" else target] = nib.load(str(out / "denoised.nii.gz")).get_fdata()
    sigma = json.loads((tmp_path / "auto" / "run.json").read_text())["noise_sigma"]
    assert sigma == pytest.approx(phantom.sigma, rel=0.05)
    assert "noise_sigma" not in json.loads((tmp_path / "mean" / "run.json").read_text())
    weighted = phantom.noisy.bvals > 50
    assert outputs["signal"][..., weighted].min() >= 0.1 * sigma * (1 - 1e-6)  # floored: a logarithm for DTI
    background = ~ndimage.binary_dilation(phantom.mask, iterations=3)
    csf = phantom.labels == CSF
    truth = phantom.truth.data[..., weighted]
    for where in (background, csf):
        bias = {target: np.mean(output[..., weighted][where] - truth[where]) / sigma
                for target, output in outputs.items()}
        assert bias["mean"] > 0.8, bias  # the floor: sigma sqrt(pi / 2) = 1.25 sigma where nu = 0
        assert abs(bias["signal"]) < 0.4 * bias["mean"], bias


def test_a_second_run_into_the_same_directory_is_refused(tiny_input, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["denoise", str(tiny_input), "--out", str(out), *TINY, "--no-report"], capsys)[0] == EXIT_OK
    code, _, err = run_cli(["denoise", str(tiny_input), "--out", str(out), *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "--resume" in err


def test_ctrl_c_during_a_run_requests_a_cancel_instead_of_interrupting(tmp_path):
    from ddm2.progress import Cancelled, CancelToken

    token = CancelToken(tmp_path)
    # raise_signal delivers to this thread and runs the Python handler before it returns: os.kill may
    # land on one of torch's threads, and the main thread then sees it only later (a flaky test)
    with token.signals_handled():
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(Cancelled):
            token.check()  # the next step's check stops the run, with a checkpoint
    with pytest.raises(KeyboardInterrupt):  # and afterwards Ctrl-C interrupts again
        signal.raise_signal(signal.SIGINT)


def _start_worker(tiny_input: Path, out: Path, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "ddm2", "denoise", str(tiny_input), "--out", str(out), "--progress", "json",
            "--stage1-steps", "6", "--stage3-steps", "400", "--checkpoint-every", "5", "--sampler", "ddim",
            "--sampling-steps", "2", "--no-flips", "--device", "cpu", "--no-report", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_stage3_step(process: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 120
    for line in process.stdout:
        event = json.loads(line)
        if event.get("stage") == "stage3" and event.get("step", 0) >= step:
            return
        assert time.monotonic() < deadline, "stage 3 did not start in time"
    raise AssertionError(f"the worker ended before stage 3: {process.stderr.read()}")


def test_a_run_killed_mid_stage3_resumes_and_completes(tiny_input, tmp_path):
    out = tmp_path / "run"
    worker = _start_worker(tiny_input, out, [])
    _wait_for_stage3_step(worker, 12)
    worker.kill()  # SIGKILL: no chance to clean up, only the periodic checkpoints survive
    worker.wait()
    assert (out / "checkpoints" / "b1000" / "stage1_estimate.npy").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    resumed = subprocess.run([sys.executable, "-m", "ddm2", "denoise", str(tiny_input), "--out", str(out),
                              "--resume", "--device", "cpu", "--progress", "json"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert "stage3 [b1000]: resuming at step" in resumed.stderr
    assert "stage1 [b1000]: resuming" not in resumed.stderr  # Stage I's estimate is reused, not retrained
    # the resumed run keeps its own settings and says which of the command line's it did not apply
    assert "resuming with the run's own settings; not applied: stage1_steps 1000 (the run's: 6), " \
           "stage3_steps 1000 (the run's: 400), sampling_steps 1 (the run's: 2), flips True (the run's: False)" \
           in resumed.stderr
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    first_stage3 = next(e for e in events if e.get("stage") == "stage3")
    assert first_stage3["step"] > 10
    assert events[-1]["event"] == "done"
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_a_run_resumed_after_its_first_shell_ends_as_an_uninterrupted_run(tmp_path, capsys):
    """The resumed run builds no network for the finished b0 shell; the b1000 shell's networks must
    still start from the same weights, and so end on the same denoised volumes."""
    bvals, bvecs = default_gradient_table(n_b0=3, n_directions=8)
    source = tmp_path / "dwi.nii.gz"
    dwi_io.save_nifti(make_phantom((24, 24, 3), bvals, bvecs, snr=8, seed=4).noisy, source)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ["denoise", str(source), *TINY, "--no-report"]
    assert run_cli([*args, "--out", str(whole)], capsys)[0] == EXIT_OK
    record = json.loads((whole / "run.json").read_text())
    assert record["shells"]["b0"]["denoised"] and record["shells"]["b1000"]["denoised"]
    # the state of a run that ended while its b1000 shell had just begun: the b0 shell's files only
    shutil.copytree(whole / "checkpoints" / "b0", resumed / "checkpoints" / "b0")
    record["status"] = "running"
    for key in ("outputs", "timings_s"):
        record.pop(key)
    (resumed / "run.json").write_text(json.dumps(record))
    code, events, _ = run_cli([*args, "--out", str(resumed), "--resume", "--progress", "json"], capsys)
    assert code == EXIT_OK
    b0_stages = {e["stage"] for e in events if e["event"] == "progress" and e["shell"] == "b0"}
    assert b0_stages == {"stage2"}  # the b0 shell was not trained or sampled again
    np.testing.assert_array_equal(nib.load(str(resumed / "denoised.nii.gz")).get_fdata(),
                                  nib.load(str(whole / "denoised.nii.gz")).get_fdata())


@pytest.mark.parametrize("recorded, holdout, target, guide", [
    ({}, 0.0, "mean", "off"), ({"stage1_holdout": 0.2}, 0.2, "mean", "off"),
    ({"holdout": 0.3, "target": "auto", "b0_guide": "auto"}, 0.3, "auto", "auto")])
def test_a_recorded_run_resumes_with_its_own_held_out_share_target_and_guide(recorded, holdout, target, guide):
    """Runs recorded before held-out slices existed trained on every slice; runs recorded before the
    option's rename stored it as stage1_holdout; runs recorded before the signal target had the mean's;
    runs recorded before the b0 guide had none."""
    assert Settings.from_dict({"n": 3, **recorded}) == Settings(n=3, holdout=holdout, target=target, b0_guide=guide)


@pytest.mark.parametrize("how", ["sigterm", "cancel_file"])
def test_cancel_checkpoints_and_exits_with_the_resumable_code(tiny_input, tmp_path, how):
    out = tmp_path / "run"
    worker = _start_worker(tiny_input, out, [])
    _wait_for_stage3_step(worker, 3)
    if how == "sigterm":
        worker.send_signal(signal.SIGTERM)
    else:
        (out / "cancel").touch()
    remaining, errors = worker.communicate(timeout=120)
    assert worker.returncode == EXIT_CANCELLED, errors
    assert json.loads(remaining.splitlines()[-1]) == {"event": "cancelled", "run_dir": str(out.resolve())}
    assert json.loads((out / "run.json").read_text())["status"] == "cancelled"
    assert (out / "checkpoints" / "b1000" / "stage3.pt").exists()
    assert not (out / "denoised.nii.gz").exists()


def _bad_inputs(folder: Path) -> dict[str, list[str]]:
    """Each case: the ddm2 arguments that must fail (the files are written here)."""
    data = np.abs(np.random.default_rng(0).normal(100, 10, (6, 6, 2, 5))).astype(np.float32)

    def write(name: str, array: np.ndarray, bvals, bvecs) -> str:
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(folder / f"{name}.nii.gz"))
        np.savetxt(folder / f"{name}.bval", np.atleast_2d(bvals))
        np.savetxt(folder / f"{name}.bvec", np.asarray(bvecs, dtype=float).T)
        return str(folder / f"{name}.nii.gz")

    bvals = [0, 1000, 1000, 1000, 1000]
    bvecs = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]
    nan = data.copy()
    nan[0, 0, 0, 2] = np.nan
    (folder / "notes.txt").write_text("not an image")
    return {
        "wrong file": [str(folder / "notes.txt")],
        "count mismatch": [write("count", data, bvals[:4], bvecs[:4])],
        "3-D volume": [write("three_d", data[..., 0], bvals, bvecs)],
        "fewer volumes than n+1": [write("few", data, bvals, bvecs), "--n", "4"],
        "NaN": [write("nan", nan, bvals, bvecs)],
        "no b=0": [write("no_b0", data, [1000] * 5, [[0.6, 0, 0.8]] + bvecs[1:])],
        "zero-norm gradient": [write("zero", data, bvals, [bvecs[0], [0, 0, 0]] + bvecs[2:])],
        "CUDA absent": [write("good", data, bvals, bvecs), "--device", "cuda"],
        "no background to measure the noise on": [write("good", data, bvals, bvecs), "--target", "signal"],
        "negative noise sigma": [write("good", data, bvals, bvecs), "--noise-sigma", "-3"],
    }


def test_each_bad_input_ends_with_one_clear_line_and_leaves_the_input_alone(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = _bad_inputs(inputs)
    before = {path: digest(path) for path in inputs.iterdir()}
    for case, args in cases.items():
        if case == "CUDA absent":
            import torch

            if torch.cuda.is_available():
                continue
        code, events, err = run_cli(["denoise", *args, "--out", str(tmp_path / case), "--progress", "json",
                                     *TINY[:4]], capsys)
        assert code == EXIT_BAD_INPUT, case
        assert len(events) == 1 and events[0]["event"] == "error", case
        assert err.strip().count("\n") == 0 and "error:" in err, (case, err)
        assert ":" in events[0]["message"] and len(events[0]["message"]) < 300
    assert {path: digest(path) for path in inputs.iterdir()} == before


def test_n_is_a_count_from_one_or_auto(capsys):
    from ddm2.cli import neighbour_count

    assert neighbour_count("auto") == 0 and neighbour_count("8") == 8
    for wrong in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as raised:
            main(["denoise", "in.nii.gz", "--out", "out", "--n", wrong])
        assert raised.value.code == 2
        assert f"{wrong!r} is not a neighbour count: give a whole number from 1, or auto" in capsys.readouterr().err


def test_disk_full_is_reported_as_such(tiny_input, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "denoised.nii.gz")

    monkeypatch.setattr(dwi_io, "save_nifti", full)
    code, events, _ = run_cli(["denoise", str(tiny_input), "--out", str(tmp_path / "r"), "--progress", "json",
                               *TINY, "--no-report"], capsys)
    assert code == EXIT_FAILURE
    assert "disk full" in events[-1]["message"] and "--resume" in events[-1]["message"]


@pytest.mark.slow
@needs_philips
def test_real_scan_denoises_into_every_output(tmp_path):
    """The Philips scan (5 b0 + 12 directions) with small CPU settings: its b0 volumes are denoised too."""
    out = tmp_path / "philips"
    before = digest(PHILIPS)
    completed = subprocess.run([sys.executable, "-m", "ddm2", "denoise", str(PHILIPS), "--out", str(out),
                                "--stage1-steps", "10", "--stage3-steps", "10", "--sampler", "ddim",
                                "--sampling-steps", "2", "--no-flips", "--device", "cpu", "--progress", "json"],
                               capture_output=True, text=True, timeout=900,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert completed.returncode == EXIT_OK, completed.stderr
    assert digest(PHILIPS) == before
    for name in CONTRACT_OUTPUTS + ["report.png", "report.html"]:
        assert (out / name).is_file(), name
    source = dwi_io.load(PHILIPS)
    image = nib.load(str(out / "denoised.nii.gz"))
    assert image.shape == (112, 112, 32, 17)
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    denoised = image.get_fdata(dtype=np.float32)
    b0 = source.b0_mask
    # volumes keep their place: the interleaved b0 volumes are denoised as one shell and written back
    # where they were (10 training steps say nothing of quality; units are checked on the phantom)
    record = json.loads((out / "run.json").read_text())
    assert record["shells"]["b0"]["denoised"] is True
    assert record["shells"]["b0"]["volumes"] == np.flatnonzero(b0).tolist() == [0, 4, 8, 12, 16]
    # its background is 62 % zeros and holds scalp: a warning says sigma may be off, in the log, in the
    # progress events and in the record
    assert record["noise_sigma"] == pytest.approx(409.9, abs=0.1)
    [warning] = record["warnings"]
    assert "62% of it is exactly 0" in warning and "1.66 times their median" in warning
    assert "1.58 times as high in the b = 0 volumes" in warning
    assert f"warning: {warning}" in completed.stderr
    # 12 directions, but a clean scan: auto leaves the b0 guide out and says why
    assert "b1000: not guided by the b0s, whose SNR is 50.7, above 15" in completed.stderr
    assert record["shells"]["b1000"]["b0_guide"] is False
    events = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [event["message"] for event in events if event["event"] == "warning"] == [warning]
    np.testing.assert_allclose(np.loadtxt(out / "denoised.bval"), source.bvals)
    assert np.all(denoised >= 0) and np.isfinite(denoised).all()
    reread = dwi_io.load(out / "denoised.nrrd")
    np.testing.assert_allclose(reread.bvecs[~b0], source.bvecs[~b0], atol=1e-9)
    np.testing.assert_allclose(reread.bvals[~b0], source.bvals[~b0], atol=1e-6)
    assert np.all(reread.bvals[b0] < 1)


def test_evaluate_and_compare_commands_score_against_the_truth(tmp_path, capsys):
    bvals, bvecs = default_gradient_table(n_b0=1, n_directions=8)
    phantom = make_phantom((24, 24, 3), bvals, bvecs, snr=6, seed=5)
    dwi_io.save_nifti(phantom.noisy, tmp_path / "noisy.nii.gz")
    dwi_io.save_nifti(phantom.truth, tmp_path / "truth.nii.gz")
    code, _, _ = run_cli(["compare", str(tmp_path / "noisy.nii.gz"), "--truth", str(tmp_path / "truth.nii.gz"),
                          "--out", str(tmp_path / "cmp"), *TINY], capsys)
    assert code == EXIT_OK
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert list(rows) == ["noisy", "MP-PCA", "Patch2Self", "Stage I", "DDM2"]
    assert rows["MP-PCA"]["psnr_db"] > rows["noisy"]["psnr_db"] + 1  # the scores are real scores
    assert (tmp_path / "cmp" / "ddm2" / "stage1.nii.gz").is_file()
    code = main(["evaluate", "--noisy", str(tmp_path / "noisy.nii.gz"),
                 "--denoised", str(tmp_path / "cmp" / "ddm2" / "denoised.nii.gz"),
                 "--truth", str(tmp_path / "truth.nii.gz"), "--out", str(tmp_path / "ev")])
    printed = capsys.readouterr().out
    assert code == EXIT_OK and "PSNR" in printed
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["truth"]["noisy"]["psnr_db"] == pytest.approx(rows["noisy"]["psnr_db"], abs=1e-6)


def test_phantom_and_maps_commands_write_the_truth_and_its_maps(tmp_path, capsys):
    code = main(["phantom", "--out", str(tmp_path), "--shape", "20", "20", "3", "--gradients", "small_64D",
                 "--snr", "20"])
    assert code == EXIT_OK
    truth = dwi_io.load(tmp_path / "truth.nii.gz")
    assert truth.data.shape[:3] == (20, 20, 3) and truth.n_volumes == len(np.loadtxt(tmp_path / "noisy.bval"))
    code, events, _ = run_cli(["maps", str(tmp_path / "truth.nii.gz"), "--out", str(tmp_path / "maps"),
                               "--progress", "json"], capsys)
    assert code == EXIT_OK and events[-1]["event"] == "done"
    fa = nib.load(events[-1]["outputs"]["fa"]).get_fdata()
    true_fa = nib.load(str(tmp_path / "fa_truth.nii.gz")).get_fdata()
    inside = (nib.load(events[-1]["outputs"]["mask"]).get_fdata() > 0) & (true_fa > 0)
    # noise-free signal: the fitted FA is the phantom's own, up to partial-volume mixing at edges
    assert np.median(np.abs(fa[inside] - true_fa[inside])) < 0.02


def test_gpu_out_of_memory_names_the_fix(tiny_input, tmp_path, capsys, monkeypatch):
    import torch

    from ddm2 import training

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train", out_of_memory)
    code, events, err = run_cli(["denoise", str(tiny_input), "--out", str(tmp_path / "r"), "--progress", "json",
                                 *TINY, "--no-report"], capsys)
    assert code == EXIT_FAILURE
    assert events[-1]["event"] == "error" and "--batch-size" in events[-1]["message"]
    assert "--resume" in events[-1]["message"]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_outlier_slices_are_judged_within_their_own_shell():
    """A b = 0 slice carries less noise in normalised units, so the chain moves it less than a b = 1000
    slice; judged against the b = 1000 slices, every b = 0 slice would look flat."""
    from types import SimpleNamespace

    from ddm2.data import Shell
    from ddm2.pipeline import Run, ShellResult

    b0, b1000 = Shell("b0", 0.0, (0, 3)), Shell("b1000", 1000.0, (1, 2, 4, 5))
    ramp = lambda rmse: np.array([0.0, rmse / 2, rmse])  # noqa: E731  input, then two steps
    b0_curves = [ramp(0.020 + 0.001 * i) for i in range(2 * 2)]  # 2 volumes x 2 slices
    b1000_curves = [ramp(0.16)] * 7 + [ramp(0.01)] + [ramp(0.15)] * 4  # volume 2's slice 1 stays flat
    results = [ShellResult(b0, None, np.zeros((2, 2, 4, 4)), np.ones(4), b0_curves),
               ShellResult(b1000, None, np.zeros((4, 3, 4, 4)), np.ones(12), b1000_curves)]
    run = SimpleNamespace(record={"shells": {"b0": {}, "b1000": {}}})
    curves, flags = Run.flag_outliers(run, results)
    assert len(curves) == 16 and flags.tolist() == [False] * 4 + [False] * 7 + [True] + [False] * 4
    assert run.record["shells"] == {"b0": {"outlier_slices": []}, "b1000": {"outlier_slices": [[4, 1]]}}


def test_held_out_slices_stop_stage1_before_it_learns_the_noise_of_a_small_scan(tmp_path, capsys):
    """12 target slices (6 directions x 2 slices): trained 800 steps on all of them, Stage I learns their
    noise (at 400 steps it is on its way, and how far depends on its initial weights); the loss on 2
    held-out slices keeps an early step instead."""
    bvals, bvecs = default_gradient_table(n_b0=1, n_directions=6)
    phantom = make_phantom((24, 24, 2), bvals, bvecs, snr=10, seed=0)
    dwi_io.save_nifti(phantom.noisy, tmp_path / "dwi.nii.gz")
    weighted = bvals > 50
    errors, records = {}, {}
    for share in ("0", "0.2"):
        out = tmp_path / f"holdout{share}"
        assert main(["denoise", str(tmp_path / "dwi.nii.gz"), "--out", str(out), "--stage1-steps", "800",
                     "--stage3-steps", "1", "--sampler", "ddim", "--sampling-steps", "1", "--device", "cpu",
                     "--preset", "small", "--save-stage1", "--no-report", "--holdout", share]) == EXIT_OK
        estimate = nib.load(str(out / "stage1.nii.gz")).get_fdata()[..., weighted][phantom.mask]
        errors[share] = np.sqrt(np.mean((estimate - phantom.truth.data[..., weighted][phantom.mask]) ** 2))
        records[share] = json.loads((out / "run.json").read_text())["shells"]["b1000"]
    assert "stage1_validation" not in records["0"] and "stage3_validation" not in records["0"]
    validation = records["0.2"]["stage1_validation"]
    assert validation["held_out_slices"] == 2 and len(validation["losses"]) == 40
    # Stage III holds the same slices out (its one step is validated once)
    assert records["0.2"]["stage3_validation"]["held_out_slices"] == 2
    assert [step for step, _ in records["0.2"]["stage3_validation"]["losses"]] == [1]
    assert validation["kept_step"] < 800  # the held-out loss rose again before the end
    # measured 69.3 without and 53.5 with held-out slices (noisy: 70.9); with --seed 1, 2, 3:
    # 70.8 / 70.8 / 70.4 without, 56.5 / 53.5 / 58.6 with
    assert errors["0.2"] < 0.9 * errors["0"], errors
