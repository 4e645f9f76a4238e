"""dipy's Patch2Self and MP-PCA behind one call, for side-by-side comparisons with DDM2."""

from __future__ import annotations

import numpy as np

from ddm2.dwi import B0_THRESHOLD

BASELINES = ("mppca", "patch2self")
BASELINE_LABELS = {"mppca": "MP-PCA", "patch2self": "Patch2Self"}



def denoise_baseline(name: str, data: np.ndarray, bvals: np.ndarray,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Denoise a DWI with one of dipy's self-supervised baselines.

    Parameters
    ----------
    name : ``"mppca"`` or ``"patch2self"`` (case-insensitive).
    data : (X, Y, Z, N) DWI, all volumes in acquisition order.
    bvals : (N,) b-values (s/mm^2).
    mask : optional (X, Y, Z) boolean mask. MP-PCA denoises only inside it and returns 0 outside, as
        dipy does; Patch2Self has no mask in dipy, so its output is set to 0 outside the mask afterwards.
        Leave it None to keep the background (SNR/CNR measure noise there).

    Returns
    -------
    (X, Y, Z, N) float32 array, volumes in the input order and intensity units.

    Notes
    -----
    b = 0 handling is dipy's own: MP-PCA treats the b = 0 volumes like the others (one local PCA over
    all volumes); Patch2Self (version 3, ordinary least squares, patch radius 0) denoises the b = 0
    volumes among themselves and the weighted volumes among themselves (``b0_denoising=True``), with
    its default intensity shift and no clipping of negative values.

    * Veraart J. et al., Denoising of diffusion MRI using random matrix theory. NeuroImage 142, 2016.
    * Fadnavis S. et al., Patch2Self: denoising diffusion MRI with self-supervised learning.
      NeurIPS 2020; version 3: Fadnavis S. et al., Patch2Self2, CVPR 2024.
    """
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in BASELINES:
        raise ValueError(f"name must be one of {', '.join(BASELINES)}; got {name!r}")
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be 4-D (X, Y, Z, N); got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("data contains NaN or infinite values: replace them before denoising")
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    if bvals.shape[0] != data.shape[3]:
        raise ValueError(f"bvals must have one entry per volume ({data.shape[3]}); got {bvals.shape[0]}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape[:3]:
            raise ValueError(f"mask must have shape {data.shape[:3]}; got {mask.shape}")

    if key == "mppca":
        from dipy.denoise.localpca import mppca

        # dipy's default 5 x 5 x 5 patch, grown when there are more volumes than patch voxels
        # (the PCA needs more samples than dimensions).
        radius = 2
        while (2 * radius + 1) ** 3 <= data.shape[3]:
            radius += 1
        # a thin stack (few slices) gets a flatter patch along that axis: dipy needs it to fit
        radii = np.minimum(radius, (np.asarray(data.shape[:3]) - 1) // 2)
        denoised = mppca(data.astype(np.float64), mask=mask, patch_radius=radii)
    else:
        denoised = _patch2self(data, bvals)
        if mask is not None:
            denoised = np.where(mask[..., None], denoised, 0.0)
    return np.asarray(denoised, dtype=np.float32)


def _patch2self(data: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    """dipy's Patch2Self version 3, made deterministic and with two dipy 1.12 defects worked around.

    * Its count sketch draws from numpy's global random state, so two runs differ (by up to twice the
      noise level on small phantoms): the state is seeded for the call and restored afterwards.
    * It writes the volumes in chunks of N // 5 and copies the last ``N % 5`` volumes from the wrong
      part of its buffer (stale results of earlier volumes). Those volumes are taken from a second run
      on the reversed volume order, where they come first and are written correctly.
    """
    try:
        import sklearn.linear_model  # noqa: F401  (dipy's Patch2Self v3 fits its b = 0 model with it)
    except ImportError:
        raise RuntimeError("Patch2Self needs scikit-learn: install it with "
                           "`python -m pip install scikit-learn`") from None
    from dipy.denoise.patch2self import patch2self

    n = data.shape[3]
    if n < 5:
        raise ValueError(f"Patch2Self needs at least 5 volumes; data has {n}")

    def run(volumes: np.ndarray, values: np.ndarray) -> np.ndarray:
        saved = np.random.get_state()
        np.random.seed(0)
        try:
            # dipy draws a tqdm progress bar on stderr whatever `verbose` says; stderr is the log channel.
            return np.asarray(patch2self(volumes.astype(np.float64), values, model="ols",
                                         b0_threshold=B0_THRESHOLD, verbose=False, version=3))
        finally:
            np.random.set_state(saved)

    denoised = np.array(run(data, bvals))
    misplaced = n % 5
    if misplaced:
        reversed_run = run(data[..., ::-1], bvals[::-1])[..., ::-1]
        denoised[..., n - misplaced:] = reversed_run[..., n - misplaced:]
    return denoised
