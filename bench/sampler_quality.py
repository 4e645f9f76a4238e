"""Quality against network evaluations: re-run only the inference of a finished `ddm2 demo` run.

    python bench/sampler_quality.py runs/demo --configs ddim:1 ddim:5 ddim:20 ddim:20:flips ddpm

Each config is sampler:steps[:flips]. The trained Stage III network, the matched states and the noisy
slices come from the run directory (its b1000 shell); the truth is the demo's phantom. Prints PSNR,
SSIM and FA RMSE of each config with its network evaluations per slice.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ddm2 import dwi as dwi_io
from ddm2.data import denormalise_volumes, group_shells, normalise_volumes, shell_slices
from ddm2.maps import dti_maps
from ddm2.metrics import score_against_truth
from ddm2.phantom import make_phantom
from ddm2.sampler import denoise_slices
from ddm2.schedule import DiffusionSchedule
from ddm2.training import Randomness
from ddm2.unet import UNet, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--configs", nargs="+", default=["ddim:1", "ddim:5", "ddim:20", "ddim:20:flips", "ddpm"])
    args = parser.parse_args()
    noisy = dwi_io.load(args.run_dir / "phantom" / "noisy.nii.gz")
    truth = dwi_io.load(args.run_dir / "phantom" / "truth.nii.gz")
    mask = make_phantom(noisy.data.shape[:3], noisy.bvals, noisy.bvecs).mask
    normalised, scales = normalise_volumes(noisy.data)
    shell = next(s for s in group_shells(noisy.bvals) if s.name == "b1000")
    slices = shell_slices(normalised, shell)
    folder = args.run_dir / "checkpoints" / shell.name
    import json

    record = json.loads((args.run_dir / "run.json").read_text())
    states = np.array(record["shells"][shell.name]["stage2"]["states"]).reshape(-1)
    model = UNet(preset_config(record["parameters"]["preset"], in_channels=1, noise_embedding=True))
    model.load_state_dict(torch.load(folder / "stage3.pt", map_location="cpu", weights_only=False)["model"])
    schedule = DiffusionSchedule()
    truth_maps = dti_maps(truth.data, truth.bvals, truth.bvecs_voxel(), mask=mask)
    rows = {"noisy": (0, score_against_truth(noisy.data, truth.data, truth.bvals, truth.bvecs_voxel(), mask,
                                             truth_maps), 0.0)}
    for config in args.configs:
        name, *rest = config.split(":")
        steps = int(rest[0]) if rest and rest[0].isdigit() else None
        flips = "flips" in rest
        started = time.monotonic()
        flat, _ = denoise_slices(model, slices.reshape(-1, *slices.shape[2:]), states, schedule, sampler=name,
                                 steps=steps, flips=flips, batch_size=64, device=torch.device("cpu"),
                                 randomness=Randomness.seeded(0, torch.device("cpu")))
        seconds = time.monotonic() - started
        denoised = noisy.data.copy()
        indices = list(shell.indices)
        volumes = np.transpose(flat.reshape(slices.shape), (2, 3, 1, 0))
        denoised[..., indices] = denormalise_volumes(volumes, scales[indices])
        evaluations = (int(np.median(states)) if name == "ddpm" else min(steps, int(np.median(states)))) * (4 if flips else 1)
        rows[config] = (evaluations, score_against_truth(denoised, truth.data, truth.bvals, truth.bvecs_voxel(),
                                                         mask, truth_maps), seconds)
    print(f"{'config':16} {'F evals/slice':>13} {'PSNR':>7} {'SSIM':>7} {'FA RMSE':>8} {'s/slice':>8}")
    for config, (evaluations, scores, seconds) in rows.items():
        print(f"{config:16} {evaluations:>13} {scores['psnr_db']:7.2f} {scores['ssim']:7.4f} "
              f"{scores['fa_rmse']:8.4f} {seconds / len(states):8.3f}")


if __name__ == "__main__":
    main()
