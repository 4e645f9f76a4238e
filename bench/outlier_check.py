"""How well the appendix-F outlier check tells well and poorly denoised slices apart, on known-truth runs.

    python bench/outlier_check.py runs/bench-quality/phantom-snr10-n2-directional-conditioned --configs ddim:5 ddim:1

For every denoised slice of each run re-sampled with each config (bench/resample.py): its real gain
(RMSE of the noisy slice against the truth minus the denoised slice's, in the engine's normalised units)
and two flatness scores of its RMSE curve, the distance the chain moved it from its input (what
``ddm2.metrics.flag_flat_curves`` uses) and the rise from the first step on (what it used before). Prints
the Spearman correlation of each score with the gain, the slices each flags (each shell against its own
median, as the engine does) and the mean gain of the slices the engine's rule flags and keeps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from resample import resample
from scipy.stats import spearmanr

from ddm2 import dwi as dwi_io
from ddm2.data import group_shells, normalised_shell_slices, volume_scales
from ddm2.metrics import flag_flat_curves


def slice_gains(noisy: np.ndarray, denoised: np.ndarray, truth: np.ndarray, shell_names: list[str],
                bvals: np.ndarray) -> np.ndarray:
    """Per denoised slice, in ``resample``'s curve order: RMSE(noisy, truth) - RMSE(denoised, truth)."""
    scales = volume_scales(noisy)
    gains = []
    for shell in group_shells(bvals):
        if shell.name not in shell_names:
            continue
        before, after, clean = (normalised_shell_slices(data, shell, scales) for data in (noisy, denoised, truth))
        gains.append(slice_rmse(before, clean) - slice_rmse(after, clean))
    return np.concatenate(gains)


def slice_rmse(estimate: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """(V * Z,) RMSE of every slice of (V, Z, H, W) arrays."""
    return np.sqrt(((estimate - clean) ** 2).mean(axis=(2, 3))).reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--configs", nargs="+", default=["ddim:5", "ddim:1"])
    args = parser.parse_args()
    print(f"{'run':44} {'config':7} {'slices':>6} {'rho(moved)':>10} {'rho(rise)':>9} {'flags':>5} "
          f"{'flags(rise)':>11} {'gain flagged / kept':>19}")
    for run_dir in args.run_dirs:
        noisy = dwi_io.load(run_dir / "phantom" / "noisy.nii.gz")
        truth = dwi_io.load(run_dir / "phantom" / "truth.nii.gz")
        shells = json.loads((run_dir / "run.json").read_text())["shells"]
        denoised_shells = [name for name, shell in shells.items() if shell.get("denoised")]
        for config in args.configs:
            data, _, _, shell_curves = resample(run_dir, noisy, config)
            curves = [curve for curves in shell_curves for curve in curves]
            gains = slice_gains(noisy.data, data, truth.data, denoised_shells, noisy.bvals)
            moved = np.array([curve[-1] for curve in curves])
            one_step = min(len(curve) for curve in curves) <= 2  # no rise after the first step to measure
            rise = None if one_step else np.array([curve[-1] - curve[1] for curve in curves])
            flags = np.concatenate([flag_flat_curves(curves) for curves in shell_curves])
            flags_rise = "-" if one_step else sum(int(flag_flat_curves([c[1:] for c in curves]).sum())
                                                  for curves in shell_curves)
            flagged_gain = f"{gains[flags].mean():.4f}" if flags.any() else "-"
            print(f"{run_dir.name:44} {config:7} {len(curves):6d} {spearmanr(moved, gains)[0]:10.2f} "
                  f"{'-' if one_step else format(spearmanr(rise, gains)[0], '.2f'):>9} "
                  f"{int(flags.sum()):5d} {flags_rise:>11} {flagged_gain:>9} / {gains[~flags].mean():.4f}")


if __name__ == "__main__":
    main()
