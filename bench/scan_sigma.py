"""A real scan's noise sigma three ways: the background's (``ddm2.noise.measure_background``), the
spread of its repeated b0s, and dipy's MP-PCA noise map inside the brain (``--mppca``).

    python bench/scan_sigma.py ../shared/data/philips-dwi/philips_dwi.nii.gz --mppca
    python bench/scan_sigma.py RUN/phantom/noisy.nii.gz --mppca --truth RUN/phantom/truth.nii.gz \
        --mask RUN/phantom/mask.nii.gz --snr 10      # a known-truth bench run: how far each estimate is off

Where the signal is high, Rician noise is Gaussian with the same sigma, so the standard deviation of
a voxel over repeated b0 volumes measures sigma plus any physiological or motion fluctuation: an upper
bound on the thermal sigma that the signal target needs. The b0s are scaled to a common mean in the
brain first (the first b0 of a scan is often darker), and the first is left out for that reason.
Prints the background's figures (its share of zeros, its non-zero values' mean/median against a
Rayleigh's 1.0645) and the b0 spread in ten bins of b0 signal inside the brain. MP-PCA's noise map
(``dipy.denoise.localpca.mppca(..., return_sigma=True)``, 5 x 5 x 5 patches) measures the noise where
the signal is, from the data's own redundancy; it takes minutes on a large scan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from ddm2 import dwi as dwi_io
from ddm2.maps import brain_mask
from ddm2.noise import RAYLEIGH_MEAN_OVER_MEDIAN, measure_background
from ddm2.phantom import noise_level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a DWI (the b0 spread needs three or more b0 volumes)")
    parser.add_argument("--mppca", action="store_true", help="also dipy's MP-PCA noise map inside the brain")
    parser.add_argument("--truth", type=Path, help="a known-truth run's truth: print the sigma its noise was made with")
    parser.add_argument("--mask", type=Path, help="with --truth: the mask its SNR was defined in")
    parser.add_argument("--snr", type=float, help="with --truth: the SNR its noise was made with")
    args = parser.parse_args()
    dwi = dwi_io.load(args.input)
    data = np.asarray(dwi.data, dtype=np.float64)
    mask = brain_mask(data, dwi.bvals)
    if args.truth:
        truth = dwi_io.load(args.truth)
        snr_mask = nib.load(str(args.mask)).get_fdata() > 0.5
        print(f"truth: sigma {noise_level(truth.data, truth.bvals, snr_mask, args.snr):.1f}")
    background = measure_background(data, dwi.bvals)
    print(f"background: {background.zero_share:.0%} zeros; non-zero mean/median {background.mean_over_median:.3f} "
          f"(Rayleigh {RAYLEIGH_MEAN_OVER_MEDIAN:.4f}); median in the b0s / in the others "
          f"{background.b0_over_weighted:.3f} (pure noise: 1); sigma {background.sigma:.1f}")
    print(background.doubt() or "the background looks like pure noise")
    print_b0_spread(data[..., dwi.b0_mask], mask)
    if args.mppca:
        from dipy.denoise.localpca import mppca

        sigma_map = mppca(data, patch_radius=2, return_sigma=True)[1][mask]
        quartiles = np.quantile(sigma_map, [0.25, 0.5, 0.75])
        print("MP-PCA noise map inside the brain: median {1:.1f} (quartiles {0:.1f}, {2:.1f})".format(*quartiles))


def print_b0_spread(b0_volumes: np.ndarray, mask: np.ndarray) -> None:
    b0 = b0_volumes[..., 1:]
    if b0.shape[-1] < 2:
        print(f"b0 spread: {b0.shape[-1] + 1} b0 volume(s), three or more needed")
        return
    brain_means = np.array([b0[..., k][mask].mean() for k in range(b0.shape[-1])])
    b0 *= brain_means.mean() / brain_means
    mean, spread = b0.mean(-1), b0.std(-1, ddof=1)
    # the median of a sample standard deviation of k Gaussian values lies below sigma; this factor
    # (simulated once per k) makes it an estimate of sigma
    rng = np.random.default_rng(0)
    median_factor = np.median(rng.standard_normal((200_000, b0.shape[-1])).std(-1, ddof=1))
    edges = np.quantile(mean[mask], np.linspace(0, 1, 11))
    print(f"b0 spread over {b0.shape[-1]} b0s, in bins of b0 signal inside the brain:")
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = mask & (mean >= low) & (mean < high)
        print(f"  b0 {low:9.0f} - {high:9.0f}: sigma {np.median(spread[chosen]) / median_factor:8.1f}")


if __name__ == "__main__":
    main()
