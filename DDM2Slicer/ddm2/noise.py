"""The noise level of a magnitude scan, for Stage III's signal target (``Settings.target``).

A magnitude image of complex Gaussian noise of sigma per channel is Rician where there is signal and
Rayleigh where there is none. Outside the head every voxel of every volume is such a Rayleigh sample,
whose median is sigma sqrt(2 ln 2): a median is robust to the few voxels of ghosting or of the skull
that a mask leaves in. Scanners that set the background to 0 leave nothing to measure: those zeros are
left out, and a scan with too little background left asks for sigma instead.

dipy's PIESNO (``dipy.denoise.noise_estimate.piesno``) was measured beside this median and not used: it
fits each slice on its own, and with few volumes some slices miss (clinical6, 7 volumes: 6180 against
1943 on three of eight slices; the Philips scan: 437 to 13767 across slices, where this median gives 410).
"""

from __future__ import annotations

import numpy as np

from ddm2.dwi import InputError

# voxels this far outside the brain mask (dilations) count as background: clear of the scalp's signal
BACKGROUND_MARGIN = 3
MIN_BACKGROUND_VOXELS = 1000
# a median needs no more values than this: about 16 MB whatever the scan's size
MAX_BACKGROUND_SAMPLES = 4_000_000
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
    """The non-zero voxel values ``BACKGROUND_MARGIN`` or more voxels outside the brain mask
    (``ddm2.maps.brain_mask``) of magnitude data (X, Y, Z, N), over every volume; on a large scan an
    evenly strided ``MAX_BACKGROUND_SAMPLES`` of them, gathered one volume at a time."""
    from scipy import ndimage

    from ddm2.maps import brain_mask

    data = np.asarray(data)
    outside = ~ndimage.binary_dilation(brain_mask(data, bvals), iterations=BACKGROUND_MARGIN)
    stride = max(1, -(-int(outside.sum()) * data.shape[3] // MAX_BACKGROUND_SAMPLES))
    values = np.concatenate([data[..., volume][outside][::stride] for volume in range(data.shape[3])])
    return values[values > 0]


def background_sigma(data: np.ndarray, bvals: np.ndarray) -> float:
    """Sigma of the complex Gaussian noise of magnitude data (X, Y, Z, N): the median of its
    Rayleigh-distributed ``background_values`` divided by sqrt(2 ln 2)."""
    values = background_values(data, bvals)
    if values.size < MIN_BACKGROUND_VOXELS:
        raise NoBackground(f"only {values.size} non-zero voxels lie outside the head, fewer than the "
                           f"{MIN_BACKGROUND_VOXELS} needed to measure the noise")
    return float(np.median(values) / np.sqrt(2.0 * np.log(2.0)))


def floor_signal(data: np.ndarray, volumes: list[int], sigma: float, floor: float = SIGNAL_FLOOR) -> None:
    """Raise the given volumes of (X, Y, Z, N) ``data`` to at least ``floor`` sigma, in place."""
    for volume in volumes:
        np.maximum(data[..., volume], floor * sigma, out=data[..., volume])
