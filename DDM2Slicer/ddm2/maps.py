"""Brain mask and DTI maps (FA, MD, AD, RD, colour FA) through dipy."""

from __future__ import annotations

import numpy as np

MAP_NAMES = ("fa", "md", "ad", "rd", "color_fa")
FIT_CHUNK_VALUES = 4_000_000  # voxel values per tensor fit (about 32 MB in float64)


def brain_mask(data: np.ndarray, bvals: np.ndarray, b0_threshold: float = 50.0) -> np.ndarray:
    """Brain mask by dipy's median_otsu on the mean b = 0 volume.

    Parameters
    ----------
    data : (X, Y, Z, N) array
    bvals : (N,) b-values; volumes at or below ``b0_threshold`` are averaged.
    """
    from dipy.segment.mask import median_otsu

    b0 = np.asarray(data)[..., np.asarray(bvals) <= b0_threshold].mean(axis=3)
    _, mask = median_otsu(b0, median_radius=2, numpass=1)
    return mask.astype(bool)


def dti_maps(data: np.ndarray, bvals: np.ndarray, bvecs_voxel: np.ndarray,
             mask: np.ndarray | None = None, b0_threshold: float = 50.0) -> dict[str, np.ndarray]:
    """Weighted-least-squares tensor fit and its scalar maps.

    Parameters
    ----------
    data : (X, Y, Z, N) array in any intensity units.
    bvals : (N,) b-values (s/mm^2).
    bvecs_voxel : (N, 3) gradient directions along the voxel axes of ``data`` (``DWI.bvecs_voxel()``).
    mask : optional (X, Y, Z) boolean mask; maps are 0 outside it.

    Returns
    -------
    dict with float32 ``fa``, ``md``, ``ad``, ``rd`` (X, Y, Z; diffusivities in mm^2/s) and
    ``color_fa`` (X, Y, Z, 3), FA times the principal eigenvector's absolute components.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel, color_fa

    bvecs = np.asarray(bvecs_voxel, dtype=np.float64).copy()
    bvecs[np.asarray(bvals) <= b0_threshold] = 0.0  # dipy wants unit vectors on DW volumes only
    table = gradient_table(np.asarray(bvals, dtype=np.float64), bvecs=bvecs, b0_threshold=b0_threshold)
    model = TensorModel(table, fit_method="WLS")
    shape = np.shape(data)[:3]
    maps = {name: np.zeros(shape + ((3,) if name == "color_fa" else ()), dtype=np.float32) for name in MAP_NAMES}
    # a few slices at a time: the fit works in float64 with several copies of its voxels, which for a
    # whole large scan would be many times the input's size (voxel-wise fits: the same result)
    chunk = max(1, FIT_CHUNK_VALUES // int(np.prod(np.shape(data)[:2]) * np.shape(data)[3]))
    for start in range(0, shape[2], chunk):
        part = np.s_[:, :, start:start + chunk]
        # Negative intensities (possible after denoising) have no log; dipy clips to its min_signal.
        fit = model.fit(np.asarray(data[part], dtype=np.float64), mask=None if mask is None else mask[part])
        fa = np.clip(np.nan_to_num(fit.fa), 0.0, 1.0)
        maps["fa"][part] = fa
        maps["md"][part] = np.nan_to_num(fit.md)
        maps["ad"][part] = np.nan_to_num(fit.ad)
        maps["rd"][part] = np.nan_to_num(fit.rd)
        maps["color_fa"][part] = np.nan_to_num(color_fa(fa, fit.evecs))
    return maps
