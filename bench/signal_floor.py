"""The floor of the signal target's output (``ddm2.noise.SIGNAL_FLOOR``): scores of a finished
known-truth run of the signal target with its denoised volumes floored at each of several multiples
of the run's noise sigma.

    python bench/signal_floor.py RUN [RUN ...] [--config ddim:1:flips] [--floors 0 0.05 0.1 0.2 0.5]

F trained against m^2 - 2 sigma^2 estimates the signal itself, and where that is far below the noise
(CSF at b = 1000 and above, the background) its answer can reach 0 or below; the tensor fit takes the
logarithm of every value. DDM2 is re-sampled once from the run's trained networks (bench/resample.py)
without a floor, then floored at each value (the sampler's output is never negative: a floor of 0 is
F's answer as it is).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from resample import known_truth, resample

from ddm2.data import group_shells
from ddm2.metrics import score_against_truth
from ddm2.noise import floor_signal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--config", default="ddim:1:flips", help="DDM2's sampler, as in bench/sampler_quality.py")
    parser.add_argument("--floors", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.5])
    args = parser.parse_args()
    print("| run | floor (sigma) | PSNR / SSIM / FA RMSE / MD RMSE (1e-3 mm^2/s) | share of voxels floored |")
    print("| --- | --- | --- | --- |")
    for run_dir in args.runs:
        record = json.loads((run_dir / "run.json").read_text())
        sigma = record["noise_sigma"]
        noisy, truth, mask, truth_maps = known_truth(run_dir)
        unfloored = resample(run_dir, noisy, args.config, signal_floor=0.0)[0]
        denoised = [volume for shell in group_shells(noisy.bvals)
                    if record["shells"].get(shell.name, {}).get("denoised") for volume in shell.indices]
        for floor in args.floors:
            data = unfloored.copy()
            floor_signal(data, denoised, sigma, floor)
            share = float(np.mean(unfloored[mask][:, denoised] < floor * sigma))
            s = score_against_truth(data, truth.data, truth.bvals, truth.bvecs_voxel(), mask, truth_maps)
            print(f"| {run_dir.name} | {floor:g} | {s['psnr_db']:.2f} / {s['ssim']:.3f} / {s['fa_rmse']:.3f} / "
                  f"{s['md_rmse'] * 1e3:.3f} | {share:.4f} |", flush=True)


if __name__ == "__main__":
    main()
