"""DDM2SlicerLib pieces that need no scene: the NRRD writer, progress text, the job runner, the CMake
file list."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DDM2Slicer"))

from DDM2SlicerLib import engine, jobs, nrrdio  # noqa: E402


def test_written_dwi_nrrd_reads_back_in_the_engine_with_ras_gradients_and_geometry(tmp_path):
    from ddm2 import dwi

    rng = np.random.default_rng(0)
    voxels = rng.uniform(10, 100, (3, 5, 4, 8)).astype(np.float32)  # (K, J, I, N)
    gradients = np.vstack([np.zeros(3), rng.normal(size=(7, 3))])
    gradients[1:] /= np.linalg.norm(gradients[1:], axis=1, keepdims=True)
    bValues = np.array([0, 1000, 1000, 1000, 2000, 2000, 2000, 2000.0])
    ijkToRas = np.array([[-1.5, 0.2, 0, 10], [0.1, -1.4, 0, 20], [0, 0, 2.5, -5], [0, 0, 0, 1]])
    frame = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]])
    path = nrrdio.writeDwiNrrd(tmp_path / "input.nrrd", voxels, ijkToRas, gradients, bValues, frame)
    loaded = dwi.load(path)
    np.testing.assert_allclose(loaded.affine, ijkToRas, atol=1e-12)
    np.testing.assert_allclose(loaded.bvals, bValues, atol=1e-6)
    np.testing.assert_allclose(loaded.bvecs[1:], gradients[1:] @ frame.T, atol=1e-9)  # RAS = MF g
    np.testing.assert_array_equal(loaded.data, np.transpose(voxels, (2, 1, 0, 3)))  # engine: (X, Y, Z, N)


def test_writer_refuses_mismatched_tables(tmp_path):
    with pytest.raises(ValueError, match="N gradients"):
        nrrdio.writeDwiNrrd(tmp_path / "x.nrrd", np.zeros((2, 2, 2, 3)), np.eye(4), np.zeros((2, 3)), np.zeros(2), np.eye(3))


def test_progress_text_names_the_stage_step_loss_and_eta():
    percent, text = engine.describeProgress({"event": "progress", "stage": "stage3", "shell": "b1000", "step": 400,
                                             "total": 5000, "loss": 0.012, "eta_s": 310, "fraction": 0.344})
    assert percent == 34
    assert text == "Stage III (diffusion model) b1000: 400/5000, loss 0.012, ETA 5 min 10 s"
    assert engine.describeProgress({"event": "progress", "stage": "maps", "fraction": 2.0})[0] == 100
    assert engine.parseEvent("not json") is None and engine.parseEvent('{"a": 1}') is None


def test_command_line_follows_the_engine_contract(tmp_path):
    settings = engine.DenoiseSettings(neighbours=3, stage1Steps=10, stage3Steps=20, preset="paper settings",
                                      device="GPU", noiseSigma=410.5, b0Guide="off", seed=7)
    command = engine.denoiseCommand("PythonSlicer", tmp_path / "in.nrrd", tmp_path / "run", settings, resume=True)
    assert command == ["PythonSlicer", "-m", "ddm2", "denoise", str(tmp_path / "in.nrrd"), "--out", str(tmp_path / "run"),
                       "--n", "3", "--stage1-steps", "10", "--stage3-steps", "20", "--preset", "paper",
                       "--sampler", "ddpm", "--no-flips",
                       "--device", "cuda", "--b0-guide", "off", "--noise-sigma", "410.5", "--seed", "7", "--progress",
                       "json", "--resume"]
    assert engine.DenoiseSettings().arguments()[:2] == ["--n", "auto"]  # the panel's default, 0
    environment = engine.engineEnvironment({"PYTHONPATH": "/elsewhere"}, forceCpu=True)
    assert environment["PYTHONPATH"].split(":")[0] == str(ROOT / "DDM2Slicer")
    assert environment["CUDA_VISIBLE_DEVICES"] == "-1"


# A launcher that starts a child worker which ignores the cancel file and SIGTERM, like a worker stuck
# in a long step: only killing the whole tree stops it.
STUBBORN_LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child', flush=True); time.sleep(600)"])
    print('{"event": "start", "run_dir": "x", "device": "cpu"}', flush=True)
    print(child.pid, file=sys.stderr, flush=True)
    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
""")


def test_cancel_kills_the_launcher_and_its_child_and_reports_cancelled(tmp_path):
    psutil = pytest.importorskip("psutil")
    events, logs = [], []
    job = jobs.EngineJob([sys.executable, "-c", STUBBORN_LAUNCHER], tmp_path, {"PATH": "/usr/bin:/bin"},
                         onEvent=events.append, onLog=logs.append)
    job.cancelGraceSeconds = 0.5
    job.start(useTimer=False)
    deadline = time.monotonic() + 30
    while not (events and any(line.strip().isdigit() for line in logs)):
        job.poll()
        time.sleep(0.05)
        assert time.monotonic() < deadline
    childPid = int(next(line for line in logs if line.strip().isdigit()))
    job.cancel()
    assert (tmp_path / engine.CANCEL_FILE_NAME).exists()
    result = job.waitForFinished(30)
    assert result.state == jobs.CANCELLED
    assert result.exitCode != 0
    time.sleep(0.2)
    assert not psutil.pid_exists(childPid) or psutil.Process(childPid).status() == psutil.STATUS_ZOMBIE


def test_a_failing_worker_reports_its_error_event(tmp_path):
    script = 'import json, sys; print(json.dumps({"event": "error", "message": "bval has 7 entries, the image 8 volumes"})); sys.exit(2)'
    job = jobs.EngineJob([sys.executable, "-c", script], tmp_path, {"PATH": "/usr/bin:/bin"})
    job.start(useTimer=False)
    result = job.waitForFinished(30)
    assert (result.state, result.exitCode) == (jobs.FAILED, 2)
    assert result.errorMessage == "bval has 7 entries, the image 8 volumes"


def test_cmake_ships_every_python_file_of_the_module_and_engine():
    """The extension installs only the files CMake lists by name: a new engine module must be listed."""
    import re

    listed = set(re.findall(r"^\s+(\S+\.py)\s*$", (ROOT / "DDM2Slicer" / "CMakeLists.txt").read_text(), re.M))
    folder = ROOT / "DDM2Slicer"
    present = {str(path.relative_to(folder)) for pattern in ("*.py", "DDM2SlicerLib/*.py", "ddm2/*.py")
               for path in folder.glob(pattern)}
    assert listed == present
