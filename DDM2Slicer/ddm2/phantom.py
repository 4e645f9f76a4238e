"""A synthetic brain-like DWI with known truth: the default input of the demo and of most tests.

Anatomy (in every axial slice, scaled with height): a head ellipse, a folded cortical ribbon of grey
matter with a CSF rim, lateral ventricles, and white matter whose fibres run left-right (a corpus
callosum above the ventricles), anterior-posterior (two lateral bundles), inferior-superior (two
corticospinal bundles) and around the head elsewhere. Each tissue has a diffusion tensor and a b = 0
signal; a smooth coil-sensitivity field multiplies everything, edges are partial-volume averaged
(2x supersampling in-plane), and Rician noise of a chosen SNR is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddm2.dwi import B0_THRESHOLD, DWI

# tissue: (b = 0 signal, eigenvalues in mm^2/s)
TISSUES = {
    "csf": (1.00, (3.0e-3, 3.0e-3, 3.0e-3)),
    "gm": (0.75, (0.8e-3, 0.8e-3, 0.8e-3)),
    "wm": (0.60, (1.7e-3, 0.3e-3, 0.3e-3)),
}
BACKGROUND, CSF, GM, WM = 0, 1, 2, 3
SIGNAL_SCALE = 1000.0


@dataclass
class Phantom:
    noisy: DWI
    truth: DWI
    mask: np.ndarray  # (X, Y, Z) bool: inside the head
    labels: np.ndarray  # (X, Y, Z) int: 0 background, 1 CSF, 2 GM, 3 WM (at voxel centres)
    fa: np.ndarray  # (X, Y, Z) FA of the true tensors, partial volume averaged
    sigma: float  # Gaussian noise level of the Rician noise, in signal units


def default_gradient_table(n_b0: int = 2, n_directions: int = 30, b_value: float = 1000.0,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """b-values and unit directions: n_b0 b = 0 volumes first, then evenly spread directions
    (dipy's electrostatic repulsion on the hemisphere), interleaving one more b0 every 10 volumes is
    left to callers that want it."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    theta = np.arccos(rng.uniform(0, 1, n_directions))
    phi = rng.uniform(0, 2 * np.pi, n_directions)
    directions, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 2000)
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_directions, b_value)])
    bvecs = np.concatenate([np.zeros((n_b0, 3)), directions.vertices])
    return bvals, bvecs


def dipy_gradient_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A gradient table shipped with dipy (no download), e.g. 'small_64D', 'small_101D' or '55dir_grad'."""
    from dipy.data import get_fnames
    from dipy.io import read_bvals_bvecs

    files = get_fnames(name=name)
    bvals, bvecs = read_bvals_bvecs(*files[-2:])  # (image, bval, bvec), or only the table
    return bvals, np.nan_to_num(bvecs)  # some of dipy's tables write NaN for the b = 0 direction


def noise_level(truth: np.ndarray, bvals: np.ndarray, mask: np.ndarray, snr: float) -> float:
    """The Gaussian sigma that gives ``snr`` = mean b = 0 signal inside ``mask`` / sigma."""
    b0 = truth[..., np.asarray(bvals) <= B0_THRESHOLD].mean(axis=3)
    return float(b0[mask].mean() / snr)


def add_rician_noise(truth: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The magnitude of the truth plus complex Gaussian noise of standard deviation sigma per channel."""
    rng = np.random.default_rng(seed)
    real = truth + rng.normal(0.0, sigma, truth.shape)
    imaginary = rng.normal(0.0, sigma, truth.shape)
    return np.sqrt(real ** 2 + imaginary ** 2)


def _tissue_model(shape: tuple[int, int, int], supersample: int):
    """Labels and fibre directions on a grid supersampled in-plane."""
    nx, ny, nz = shape[0] * supersample, shape[1] * supersample, shape[2]
    x = (np.arange(nx) + 0.5) / nx * 2 - 1
    y = (np.arange(ny) + 0.5) / ny * 2 - 1
    z = (np.arange(nz) + 0.5) / nz * 2 - 1 if nz > 1 else np.zeros(1)
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    height = np.sqrt(np.clip(1 - (0.8 * Z) ** 2, 0.2, 1))  # the head narrows towards top and bottom
    ax, ay = 0.78 * height, 0.9 * height
    radius = np.sqrt((X / ax) ** 2 + (Y / ay) ** 2)
    angle = np.arctan2(Y / ay, X / ax)
    folds = 0.06 * np.sin(9 * angle + 2.5 * Z) + 0.03 * np.sin(17 * angle - 4 * Z)

    labels = np.zeros(X.shape, dtype=np.int8)
    labels[radius < 1.0] = CSF  # CSF rim under the skull
    labels[radius < 0.94] = GM  # cortex
    labels[radius < 0.78 + folds] = WM
    ventricles = ((np.abs(X) - 0.16) / 0.1) ** 2 + ((Y + 0.05) / 0.32) ** 2 < 1.0
    labels[ventricles & (Z < 0.6)] = CSF

    # fibre directions: around the head by default, then the named bundles
    fibres = np.stack([-np.sin(angle) * ax, np.cos(angle) * ay, 0.3 * np.ones_like(X)], axis=-1)
    callosum = (np.abs(Y - 0.12) < 0.1 + 0.04 * np.cos(3 * X)) & (np.abs(X) < 0.55)
    lateral = (np.abs(np.abs(X) - 0.45) < 0.09) & (np.abs(Y) < 0.55)
    spinal = ((np.abs(X) - 0.3) ** 2 + (Y + 0.45) ** 2) < 0.12 ** 2
    fibres[callosum] = (1.0, 0.0, 0.0)
    fibres[lateral] = (0.0, 1.0, 0.0)
    fibres[spinal] = (0.0, 0.0, 1.0)
    fibres /= np.linalg.norm(fibres, axis=-1, keepdims=True)
    bias = 1.0 + 0.15 * X - 0.1 * Y + 0.1 * Z  # smooth coil sensitivity
    return labels, fibres, bias


def _downsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Average factor x factor in-plane blocks (partial volume)."""
    nx, ny = array.shape[0] // factor, array.shape[1] // factor
    blocks = array.reshape(nx, factor, ny, factor, *array.shape[2:])
    return blocks.mean(axis=(1, 3))


def make_phantom(shape: tuple[int, int, int] = (64, 64, 8), bvals: np.ndarray | None = None,
                 bvecs: np.ndarray | None = None, snr: float = 10.0, seed: int = 0,
                 voxel_size: float = 2.0) -> Phantom:
    """Build the phantom.

    Parameters
    ----------
    shape : (X, Y, Z) voxels.
    bvals, bvecs : gradient table (N,), (N, 3) with unit directions in RAS; default
        ``default_gradient_table()`` (2 b0 + 30 directions at b = 1000).
    snr : mean b = 0 signal inside the head divided by the Gaussian noise level sigma.
    seed : seeds the noise.
    """
    if bvals is None or bvecs is None:
        bvals, bvecs = default_gradient_table()
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    supersample = 2
    labels_fine, fibres, bias = _tissue_model(tuple(shape), supersample)

    signal = np.zeros(labels_fine.shape + (len(bvals),))
    fa_fine = np.zeros(labels_fine.shape)
    for label, name in ((CSF, "csf"), (GM, "gm"), (WM, "wm")):
        s0, (l1, l2, l3) = TISSUES[name]
        inside = labels_fine == label
        e1 = fibres[inside]
        # D g . g for an axially symmetric tensor: l2 + (l1 - l2) (e1 . g)^2
        projection = (e1 @ bvecs.T) ** 2
        adc = l2 + (l1 - l2) * projection
        signal[inside] = s0 * np.exp(-bvals[None, :] * adc)
        mean = (l1 + l2 + l3) / 3
        fa_fine[inside] = np.sqrt(1.5 * ((l1 - mean) ** 2 + (l2 - mean) ** 2 + (l3 - mean) ** 2)
                                  / (l1 ** 2 + l2 ** 2 + l3 ** 2))
    signal *= bias[..., None] * SIGNAL_SCALE

    truth_data = _downsample(signal, supersample)
    head = _downsample((labels_fine > 0).astype(np.float64), supersample)
    mask = head > 0.5
    labels = labels_fine[supersample // 2::supersample, supersample // 2::supersample]
    fa = _downsample(fa_fine, supersample)

    sigma = noise_level(truth_data, bvals, mask, snr)
    noisy_data = add_rician_noise(truth_data, sigma, seed)

    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -0.5 * voxel_size * (np.asarray(shape) - 1)
    truth = DWI(truth_data, affine, bvals, bvecs, source="phantom truth")
    noisy = DWI(noisy_data, affine, bvals, bvecs, source=f"phantom (SNR {snr:g})")
    return Phantom(noisy=noisy, truth=truth, mask=mask, labels=labels, fa=fa.astype(np.float32), sigma=sigma)
