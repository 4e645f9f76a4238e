"""How the module talks to the engine: its command lines, environment and progress events.

The engine (``python -m ddm2``) runs as a separate process so that torch never loads into Slicer's
process and a long training run cannot freeze the GUI. This file knows the command contract; it does
not start anything (see ``jobs``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# Exit codes of `python -m ddm2` (the engine's documented contract).
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 75

# Name of the file whose creation in the run folder asks the engine to stop at the next step.
CANCEL_FILE_NAME = "cancel"

# Panel choices -> engine arguments. The panel shows words a user understands; the engine wants its own.
# The quick preview takes the fast deterministic sampler with one step, averaged over the 4 flips (the
# engine's default, spelled out so that the panel keeps it): it scored best in bench/RESULTS.md. The
# paper settings take the paper's every-state chain without the authors' flips (4x its evaluations).
PRESET_ARGUMENTS = {
    "quick preview": ("--preset", "small", "--sampler", "ddim", "--sampling-steps", "1", "--flips"),
    "paper settings": ("--preset", "paper", "--sampler", "ddpm", "--no-flips"),
}
DEVICE_ARGUMENTS = {"auto": "auto", "GPU": "cuda", "CPU": "cpu"}
# The b0 guide (the engine's --b0-guide): "auto" guides shells of fewer than 30 directions of a noisy
# scan (b0 SNR at most 15)
B0_GUIDE_ARGUMENTS = {"auto": "auto", "every shell": "on", "off": "off"}

# Training steps each preset puts in the panel. "paper settings" are the DDM2 paper's HARDI
# configuration (Stage I 10k, Stage III 100k iterations); "quick preview" trades quality for minutes.
PRESET_STEPS = {"quick preview": (1000, 2000), "paper settings": (10000, 100000)}

STAGE_LABELS = {
    "stage1": "Stage I (noise model)",
    "stage2": "Stage II (state matching)",
    "stage3": "Stage III (diffusion model)",
    "inference": "Denoising",
    "maps": "DTI maps",
    "outputs": "Writing outputs",
}


@dataclass
class DenoiseSettings:
    """What the panel lets a user choose, in the panel's own words."""

    neighbours: int = 0  # 0: auto (the engine's default)
    stage1Steps: int = 1000
    stage3Steps: int = 2000
    preset: str = "quick preview"
    device: str = "auto"
    noiseSigma: float = 0.0  # the noise's sigma in the scan's units for the signal target; 0: measured
    b0Guide: str = "auto"  # a key of B0_GUIDE_ARGUMENTS
    seed: int | None = None
    # Further engine options, passed through as given (e.g. ("--sampler", "ddim")).
    extraArguments: tuple[str, ...] = ()

    def arguments(self) -> list[str]:
        """The engine options for these settings (everything after ``--out DIR``)."""
        arguments = [
            "--n", str(self.neighbours or "auto"),
            "--stage1-steps", str(self.stage1Steps),
            "--stage3-steps", str(self.stage3Steps),
            *PRESET_ARGUMENTS[self.preset],
            "--device", DEVICE_ARGUMENTS[self.device],
            "--b0-guide", B0_GUIDE_ARGUMENTS[self.b0Guide],
        ]
        if self.noiseSigma:
            arguments += ["--noise-sigma", str(self.noiseSigma)]
        if self.seed is not None:
            arguments += ["--seed", str(self.seed)]
        return arguments + list(self.extraArguments)


def moduleDirectory() -> Path:
    """The DDM2Slicer/ folder: it holds the ``ddm2`` package the worker imports."""
    return Path(__file__).resolve().parent.parent


def pythonExecutable() -> str:
    """Slicer's Python launcher (PythonSlicer), or this interpreter outside Slicer.

    Inside Slicer ``sys.executable`` is already PythonSlicer; the ``which`` lookup comes first because
    that is the documented way the reference extensions find it.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if not sys.executable:
        raise RuntimeError("Python was not found: cannot start the DDM2 engine")
    return sys.executable


def engineEnvironment(base: dict[str, str] | None = None, forceCpu: bool = False) -> dict[str, str]:
    """Environment for the worker: ``ddm2`` importable, unbuffered output, CPU forced on request."""
    environment = dict(os.environ if base is None else base)
    paths = [str(moduleDirectory())]
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    # Progress lines must reach the panel as they are printed, not when a buffer fills.
    environment["PYTHONUNBUFFERED"] = "1"
    if forceCpu:
        # A CUDA build of torch can still grab a GPU context; hiding the devices rules that out.
        environment["CUDA_VISIBLE_DEVICES"] = "-1"
    return environment


def denoiseCommand(python: str, inputPath: str | os.PathLike, runDirectory: str | os.PathLike,
                   settings: DenoiseSettings, resume: bool = False) -> list[str]:
    """``python -m ddm2 denoise INPUT --out DIR ... --progress json [--resume]``."""
    command = [python, "-m", "ddm2", "denoise", str(inputPath), "--out", str(runDirectory)]
    command += settings.arguments() + ["--progress", "json"]
    if resume:
        command.append("--resume")
    return command


def mapsCommand(python: str, inputPath: str | os.PathLike, outputDirectory: str | os.PathLike) -> list[str]:
    """``python -m ddm2 maps INPUT --out DIR``: DTI maps of any DWI, no training."""
    return [python, "-m", "ddm2", "maps", str(inputPath), "--out", str(outputDirectory)]


def parseEvent(line: str) -> dict | None:
    """The event of one stdout line, or None for anything that is not a JSON object with an "event"."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def formatDuration(seconds: float) -> str:
    """'45 s', '5 min 10 s', '2 h 03 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def describeProgress(event: dict) -> tuple[int, str]:
    """Percent (0..100) and one line for the progress bar, from a "progress" event."""
    percent = int(round(100 * min(1.0, max(0.0, float(event.get("fraction", 0.0))))))
    stage = event.get("stage", "")
    text = STAGE_LABELS.get(stage, stage)
    if event.get("shell"):
        text += f" {event['shell']}"
    if "step" in event and "total" in event:
        text += f": {event['step']}/{event['total']}"
    if event.get("loss") is not None:
        text += f", loss {float(event['loss']):.4g}"
    if event.get("eta_s") is not None:
        text += f", ETA {formatDuration(float(event['eta_s']))}"
    return percent, text
