"""Re-run only the inference of a finished known-truth run (``ddm2 demo``, bench/quality.py) with another
sampler: the trained Stage III networks, the matched states and the noisy input come from the run
directory. Used by bench/sampler_quality.py and bench/quality.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ddm2 import dwi as dwi_io
from ddm2.data import group_shells, normalised_shell_slices, restore_shell_volumes, volume_scales
from ddm2.dwi import DWI
from ddm2.maps import dti_maps
from ddm2.metrics import score_against_truth
from ddm2.noise import SIGNAL_FLOOR, floor_signal
from ddm2.sampler import denoise_slices
from ddm2.schedule import DiffusionSchedule
from ddm2.training import Randomness
from ddm2.unet import UNet, preset_config


def known_truth(run_dir: Path) -> tuple[DWI, DWI, np.ndarray, dict]:
    """A known-truth run's noisy input, its truth, the brain mask and the truth's DTI maps (what
    ``score_against_truth`` compares with), as the run stored them under ``phantom/``."""
    noisy = dwi_io.load(run_dir / "phantom" / "noisy.nii.gz")
    truth = dwi_io.load(run_dir / "phantom" / "truth.nii.gz")
    mask = nib.load(str(run_dir / "phantom" / "mask.nii.gz")).get_fdata() > 0.5
    return noisy, truth, mask, dti_maps(truth.data, truth.bvals, truth.bvecs_voxel(), mask=mask)


def parse_config(config: str) -> tuple[str, int | None, bool]:
    """'ddim:5', 'ddim:20:flips', 'ddpm' -> (sampler, steps, flips)."""
    name, *rest = config.split(":")
    steps = int(rest[0]) if rest and rest[0].isdigit() else None
    return name, steps, "flips" in rest


def resample(run_dir: Path, noisy: DWI, config: str,
             signal_floor: float = SIGNAL_FLOOR) -> tuple[np.ndarray, int, float, list[list[np.ndarray]]]:
    """The run's output re-sampled with ``config`` on every denoised shell; other volumes keep their
    noisy values (a signal target's floored at ``signal_floor`` sigma, as the pipeline floors them).
    Returns (data, F evaluations per slice at the median state, seconds, per denoised shell the RMSE
    curves of its slices in ``normalised_shell_slices`` order)."""
    name, steps, flips = parse_config(config)
    record = json.loads((run_dir / "run.json").read_text())
    scales = volume_scales(noisy.data)
    data = noisy.data.copy()
    schedule = DiffusionSchedule()
    seconds, curves, all_states = 0.0, [], []
    for shell in group_shells(noisy.bvals):
        if not record["shells"].get(shell.name, {}).get("denoised"):
            continue
        slices = normalised_shell_slices(noisy.data, shell, scales)
        states = np.array(record["shells"][shell.name]["stage2"]["states"]).reshape(-1)
        conditioned = record["shells"][shell.name].get("stage3_condition") == "stage1"
        model = UNet(preset_config(record["parameters"]["preset"], in_channels=2 if conditioned else 1,
                                   noise_embedding=True))
        condition = None
        if conditioned:  # F's second channel: the run's stored Stage I estimate (what the run recomputes)
            estimate = np.load(run_dir / "checkpoints" / shell.name / "stage1_estimate.npy")
            estimate = estimate.reshape(-1, *slices.shape[2:])

            def condition(items: np.ndarray) -> torch.Tensor:
                return torch.as_tensor(estimate[items])[:, None]
        checkpoint = torch.load(run_dir / "checkpoints" / shell.name / "stage3.pt", map_location="cpu",
                                weights_only=False)
        model.load_state_dict(checkpoint["model"])
        started = time.monotonic()
        flat, shell_curves = denoise_slices(model, slices.reshape(-1, *slices.shape[2:]), states, schedule,
                                            sampler=name, steps=steps, flips=flips, batch_size=64,
                                            device=torch.device("cpu"),
                                            randomness=Randomness.seeded(0, torch.device("cpu")),
                                            condition=condition)
        seconds += time.monotonic() - started
        restore_shell_volumes(data, flat.reshape(slices.shape), shell, scales)
        if "noise_sigma" in record:  # the signal target's estimates
            floor_signal(data, list(shell.indices), record["noise_sigma"], signal_floor)
        curves.append(shell_curves)
        all_states.append(states)
    median_state = int(np.median(np.concatenate(all_states)))
    evaluations = (median_state if name == "ddpm" else min(steps, median_state)) * (4 if flips else 1)
    return data, evaluations, seconds, curves


def resample_scores(run_dir: Path, noisy: DWI, truth: DWI, mask: np.ndarray, truth_maps: dict,
                    config: str) -> dict:
    """``score_against_truth`` of the run re-sampled with ``config``, plus ``evaluations`` (F evaluations per
    slice at the median state) and ``seconds_per_slice``."""
    data, evaluations, seconds, curves = resample(run_dir, noisy, config)
    return {**score_against_truth(data, truth.data, truth.bvals, truth.bvecs_voxel(), mask, truth_maps),
            "evaluations": evaluations, "seconds_per_slice": seconds / sum(map(len, curves))}
