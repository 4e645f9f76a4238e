"""Stage I's estimate from several disjoint neighbour sets, and their mean, scored against the truth.

    python bench/stage1_rings.py runs/bench-quality/hardi55-snr10-n2-directional-conditioned --rings 5

Ring r is the r-th set of n closest directions (``ddm2.data.neighbour_table``; ring 0 is the one Stage I
trains on). If Stage I's error were mostly the noise of its inputs, the mean over rings would remove
much of it; if it is mostly the network's own bias, the mean gains little. Re-uses a finished
known-truth run (bench/quality.py) of the directional method: its Stage I network of every
diffusion-weighted shell, the noisy input, the truth and its mask. Prints PSNR, SSIM and FA RMSE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from resample import known_truth

from ddm2 import stage1
from ddm2.data import gradient_features, group_shells, neighbour_table, normalised_shell_slices, \
    restore_shell_volumes, shell_neighbour_count, volume_scales
from ddm2.metrics import score_against_truth
from ddm2.training import load_checkpoint
from ddm2.unet import UNet, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rings", type=int, default=5)
    args = parser.parse_args()
    record = json.loads((args.run_dir / "run.json").read_text())
    preset = record["parameters"]["preset"]
    noisy, truth, mask, truth_maps = known_truth(args.run_dir)
    scales = volume_scales(noisy.data)
    alone = [noisy.data.copy() for _ in range(args.rings)]
    mean = [noisy.data.copy() for _ in range(args.rings)]
    for shell in group_shells(noisy.bvals):
        if shell.is_b0 or not record["shells"].get(shell.name, {}).get("denoised"):
            continue
        slices = normalised_shell_slices(noisy.data, shell, scales)
        bvecs, bvals = noisy.bvecs[list(shell.indices)], noisy.bvals[list(shell.indices)]
        n = shell_neighbour_count(record["parameters"]["n"], len(shell.indices))
        context = stage1.usable_context(record["parameters"]["context_slices"], slices.shape[1])
        tables = [neighbour_table(bvecs, n, "angular", ring) for ring in range(args.rings)]
        features = [gradient_features(bvecs, bvals, table) for table in tables]
        phi = UNet(preset_config(preset, in_channels=stage1.input_channels(n, context),
                                 condition_dim=features[0].shape[1]))
        phi.load_state_dict(load_checkpoint(args.run_dir / "checkpoints" / shell.name / "stage1.pt",
                                            torch.device("cpu"))["model"])
        total = np.zeros(slices.shape, dtype=np.float64)
        for ring, (table, conditions) in enumerate(zip(tables, features)):
            estimate = stage1.predict(phi, torch.as_tensor(slices), torch.as_tensor(table),
                                      torch.as_tensor(conditions), 64, context).reshape(slices.shape)
            total += estimate
            restore_shell_volumes(alone[ring], estimate, shell, scales)
            restore_shell_volumes(mean[ring], (total / (ring + 1)).astype(np.float32), shell, scales)
    print(f"{'estimate':24} {'PSNR':>7} {'SSIM':>7} {'FA RMSE':>8}")
    for label, data in [(f"ring {r} alone", alone[r]) for r in range(args.rings)] + \
                       [(f"mean of rings 0..{r}", mean[r]) for r in range(1, args.rings)]:
        scores = score_against_truth(data, truth.data, truth.bvals, truth.bvecs_voxel(), mask, truth_maps)
        print(f"{label:24} {scores['psnr_db']:7.2f} {scores['ssim']:7.4f} {scores['fa_rmse']:8.4f}")


if __name__ == "__main__":
    main()
