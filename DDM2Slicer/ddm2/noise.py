"""The noise level of a magnitude scan, for Stage III's signal target (``Settings.target``).

A magnitude image of complex Gaussian noise of sigma per channel is Rician where there is signal and
Rayleigh where there is none. Outside the head every voxel of every volume is such a Rayleigh sample,
whose median is sigma sqrt(2 ln 2): a median is robust to the few voxels of ghosting or of the skull
that a mask leaves in. Scanners that set the background to 0 leave nothing to measure: those zeros are
left out, and a scan with too little background left asks for sigma instead. Where the background does
not look like pure noise (much of it 0, or the shape of its values not a Rayleigh's), the log says
that sigma may be off.

dipy's PIESNO (``dipy.denoise.noise_estimate.piesno``) was measured beside this median and not used: it
fits each slice on its own, and with few volumes some slices miss (clinical6, 7 volumes: 6180 against
1943 on three of eight slices; the Philips scan: 437 to 13767 across slices, where this median gives 410).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddm2.dwi import B0_THRESHOLD, InputError

# voxels this far outside the brain mask (dilations) count as background: clear of the scalp's signal
BACKGROUND_MARGIN = 3
MIN_BACKGROUND_VOXELS = 1000
# a median needs no more values than this: about 16 MB whatever the scan's size
MAX_BACKGROUND_SAMPLES = 4_000_000
# A background of pure noise is a Rayleigh sample, whose mean is 1.0645 times its median. The log
# doubts sigma where the background's ratio strays further than RATIO_TOLERANCE (more: ghosting or
# signal left in it; less: a sum of squares over several coils, whose median the Rayleigh's sqrt(2 ln 2)
# misreads: with two coils sigma would come out 56 % high) or 4 standard errors of the ratio, which
# is 0.47 / sqrt(values) for a Rayleigh sample (simulated); or where more of it than ZERO_SHARE_DOUBT
# is exactly 0.
RAYLEIGH_MEAN_OVER_MEDIAN = float(np.sqrt(np.pi / 2) / np.sqrt(2 * np.log(2)))
RATIO_TOLERANCE = 0.03
RATIO_STANDARD_ERROR = 0.47
ZERO_SHARE_DOUBT = 0.1
# Noise is the same in every volume and tissue signal is not: where the background's median in the b = 0
# volumes strays from that of the diffusion-weighted ones by more than B0_RATIO_TOLERANCE (or 4 standard
# errors: the median of n Rayleigh values has a relative standard error of MEDIAN_STANDARD_ERROR /
# sqrt(n), 1 / (2 f(m) m) at the median m), it holds signal: scalp left in it (the Philips scan: 1.6).
B0_RATIO_TOLERANCE = 0.1
MEDIAN_STANDARD_ERROR = 0.721
# The signal target's output is floored at this many sigma. Where the signal is far below the noise
# (CSF at b = 1000 and above) F's estimate of it can reach 0, and a tensor fit takes its logarithm:
# dipy clips it to 1e-4, and the mean diffusivity of those voxels explodes. Measured on three bench
# runs (bench/signal_floor.py, bench/RESULTS.md): 0.1 sigma floors 0.06-2 % of the brain's values, cuts
# the MD error by a quarter to a half (hardi55 at SNR 10: 0.593 to 0.265e-3) and leaves PSNR as it was.
SIGNAL_FLOOR = 0.1


class NoBackground(InputError):
    """The scan has too few non-zero voxels outside the head to measure its noise."""

    def __init__(self, measured: str) -> None:
        super().__init__(f"{measured}: the background looks masked to zero. Give the noise level with "
                         "--noise-sigma, or use --target mean")
        self.measured = measured


def background_values(data: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    """The voxel values ``BACKGROUND_MARGIN`` or more voxels outside the brain mask
    (``ddm2.maps.brain_mask``) of magnitude data (X, Y, Z, N), zeros included: (N, K), one row per
    volume; on a large scan an evenly strided ``MAX_BACKGROUND_SAMPLES`` of them, one volume at a time."""
    from scipy import ndimage

    from ddm2.maps import brain_mask

    data = np.asarray(data)
    outside = ~ndimage.binary_dilation(brain_mask(data, bvals), iterations=BACKGROUND_MARGIN)
    stride = max(1, -(-int(outside.sum()) * data.shape[3] // MAX_BACKGROUND_SAMPLES))
    return np.stack([data[..., volume][outside][::stride] for volume in range(data.shape[3])])


@dataclass(frozen=True)
class Background:
    """The noise measured outside the head: sigma, and what says whether the background is pure noise."""

    sigma: float
    non_zero_values: int  # measured
    zero_share: float  # of every value outside the head
    mean_over_median: float  # of the non-zero values
    b0_over_weighted: float  # the median of the b = 0 volumes' non-zero values over the others'; nan: no such pair
    ratio_standard_error: float  # of b0_over_weighted, for pure noise

    def doubt(self) -> str:
        """Why sigma may be off, for the log; "" where the background looks like pure Rayleigh noise."""
        reasons = []
        if self.zero_share > ZERO_SHARE_DOUBT:
            reasons.append(f"{self.zero_share:.0%} of it is exactly 0, masked by the scanner")
        tolerance = max(RATIO_TOLERANCE, 4 * RATIO_STANDARD_ERROR / np.sqrt(self.non_zero_values))
        if abs(self.mean_over_median - RAYLEIGH_MEAN_OVER_MEDIAN) > tolerance:
            reasons.append(f"the mean of its non-zero values is {self.mean_over_median:.2f} times their median, "
                           f"where pure noise gives {RAYLEIGH_MEAN_OVER_MEDIAN:.2f}")
        if abs(self.b0_over_weighted - 1.0) > max(B0_RATIO_TOLERANCE, 4 * self.ratio_standard_error):
            reasons.append(f"its median is {self.b0_over_weighted:.2f} times as high in the b = 0 volumes as in the "
                           "diffusion-weighted ones, where noise is the same in every volume: it holds signal")
        if not reasons:
            return ""
        return (f"the background may not be pure noise ({'; '.join(reasons)}), so sigma {self.sigma:.4g} may be "
                "off: give the scanner's noise level (--noise-sigma) if it is known")


def measure_background(data: np.ndarray, bvals: np.ndarray) -> Background:
    """Sigma of the complex Gaussian noise of magnitude data (X, Y, Z, N): the median of its
    Rayleigh-distributed non-zero ``background_values`` divided by sqrt(2 ln 2); with the figures
    ``Background.doubt`` judges that background by."""
    values = background_values(data, bvals)
    positive = values > 0
    non_zero = values[positive]
    if non_zero.size < MIN_BACKGROUND_VOXELS:
        raise NoBackground(f"only {non_zero.size} non-zero voxels lie outside the head, fewer than the "
                           f"{MIN_BACKGROUND_VOXELS} needed to measure the noise")
    median = float(np.median(non_zero))
    b0 = np.asarray(bvals) <= B0_THRESHOLD
    b0_values, weighted_values = values[b0][positive[b0]], values[~b0][positive[~b0]]
    if b0_values.size and weighted_values.size:
        b0_over_weighted = float(np.median(b0_values) / np.median(weighted_values))
        standard_error = MEDIAN_STANDARD_ERROR * float(np.sqrt(1 / b0_values.size + 1 / weighted_values.size))
    else:
        b0_over_weighted, standard_error = float("nan"), 0.0
    return Background(sigma=median / float(np.sqrt(2.0 * np.log(2.0))), non_zero_values=int(non_zero.size),
                      zero_share=1.0 - non_zero.size / values.size, mean_over_median=float(non_zero.mean()) / median,
                      b0_over_weighted=b0_over_weighted, ratio_standard_error=standard_error)


def floor_signal(data: np.ndarray, volumes: list[int], sigma: float, floor: float = SIGNAL_FLOOR) -> None:
    """Raise the given volumes of (X, Y, Z, N) ``data`` to at least ``floor`` sigma, in place."""
    for volume in volumes:
        np.maximum(data[..., volume], floor * sigma, out=data[..., volume])
