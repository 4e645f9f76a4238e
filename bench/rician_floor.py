"""The Rician floor: how much of every denoiser's error against the truth is the bias of magnitude
noise, and what removing that bias does to each method.

    python bench/rician_floor.py RUN [RUN ...] [--config ddim:1:flips]

Every denoiser here (DDM2, MP-PCA, Patch2Self) learns or keeps the mean of the noisy magnitude M,
which for Rician noise lies above the noise-free signal nu (at nu = 0 it is sigma sqrt(pi / 2)). So a
perfect estimate of that mean, ``rician_mean(truth, sigma)``, is the best any of them can score
against the truth; the first row of each case prints it. ``remove_rician_bias`` inverts the mean
voxel by voxel (0 where an estimate lies below the floor) and the last column scores each method
after it. sigma is the added noise's, recovered from the noisy input and the truth
(E[M^2] = nu^2 + 2 sigma^2). Each RUN is a known-truth run directory (bench/quality.py,
``ddm2 demo``); DDM2 is re-sampled from its trained networks with ``--config`` (bench/resample.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from resample import known_truth, resample
from scipy.special import i0e, i1e

from ddm2.baselines import BASELINE_LABELS, denoise_baseline
from ddm2.metrics import score_against_truth

# E[M] / sigma as a function of nu / sigma, tabulated for its inverse; beyond the table
# E[M] = sqrt(nu^2 + sigma^2) to better than 1e-4 sigma
RATIO_GRID = np.linspace(0.0, 40.0, 40001)


def rician_mean(nu: np.ndarray, sigma: float) -> np.ndarray:
    """Mean of the magnitude of nu plus complex Gaussian noise of ``sigma`` per channel:
    sigma sqrt(pi / 2) L_1/2(-nu^2 / (2 sigma^2)), with exponentially scaled Bessel functions."""
    half = np.asarray(nu, dtype=np.float64) ** 2 / (4 * sigma ** 2)
    return sigma * np.sqrt(np.pi / 2) * ((1 + 2 * half) * i0e(half) + 2 * half * i1e(half))


MEAN_GRID = rician_mean(RATIO_GRID, 1.0)


def remove_rician_bias(mean: np.ndarray, sigma: float) -> np.ndarray:
    """The signal nu whose Rician mean is ``mean`` (the inverse of ``rician_mean``), 0 at or below the
    floor sigma sqrt(pi / 2)."""
    ratio = np.asarray(mean, dtype=np.float64) / sigma
    nu = np.interp(ratio, MEAN_GRID, RATIO_GRID, left=0.0)
    beyond = ratio > MEAN_GRID[-1]
    nu[beyond] = np.sqrt(ratio[beyond] ** 2 - 1)
    return (nu * sigma).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--config", default="ddim:1:flips", help="DDM2's sampler, as in bench/sampler_quality.py")
    args = parser.parse_args()
    print("| run | method | as is | Rician bias removed |\n| --- | --- | --- | --- |")
    for run_dir in args.runs:
        noisy, truth, mask, truth_maps = known_truth(run_dir)
        nu = truth.data.astype(np.float64)
        sigma = float(np.sqrt(np.mean(noisy.data.astype(np.float64) ** 2 - nu ** 2) / 2))
        outputs = {"Rician mean of the truth": rician_mean(nu, sigma), "noisy": noisy.data,
                   f"DDM2 ({args.config})": resample(run_dir, noisy, args.config)[0]}
        for name, label in BASELINE_LABELS.items():
            outputs[label] = denoise_baseline(name, noisy.data, noisy.bvals)
        for method, data in outputs.items():
            cells = []
            for values in (data, remove_rician_bias(data, sigma)):
                s = score_against_truth(values, truth.data, truth.bvals, truth.bvecs_voxel(), mask, truth_maps)
                cells.append(f"{s['psnr_db']:.2f} / {s['ssim']:.3f} / {s['fa_rmse']:.3f} / {s['md_rmse'] * 1e3:.3f}")
            print(f"| {run_dir.name} (sigma {sigma:.0f}) | {method} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
