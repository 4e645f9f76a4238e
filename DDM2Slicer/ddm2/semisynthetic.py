"""Semi-synthetic DWI: a real scan's anatomy on any gradient table, with a known truth.

A diffusion tensor and a b = 0 signal are fitted (dipy, WLS) in every brain voxel of a real scan;
the truth is the signal those tensors give on the new gradient table, S0 exp(-b g^T D g), and the
noisy input adds Rician noise of a chosen SNR. The benchmark uses it to score denoisers on real
anatomy (folded cortex, CSF, crossing tracts at the scan's resolution) rather than on the phantom's
piecewise-constant tissue.
"""

from __future__ import annotations

import numpy as np

from ddm2.dwi import B0_THRESHOLD, DWI
from ddm2.phantom import BACKGROUND, CSF, GM, WM, Phantom, add_rician_noise, noise_level

# eigenvalues outside this range are fitting noise (negative, or above free water at body temperature)
DIFFUSIVITY_RANGE = (1e-5, 3.2e-3)
CSF_MD, WM_FA = 2.0e-3, 0.35  # tissue labels of the fitted tensors (for reports only)


def resynthesise(source: DWI, bvals: np.ndarray, bvecs: np.ndarray, snr: float, seed: int = 0) -> Phantom:
    """The anatomy of ``source`` on the table (bvals, bvecs), noise-free and with Rician noise.

    Parameters
    ----------
    source : a real DWI with at least 6 directions and one b = 0 volume.
    bvals, bvecs : the new table: (N,) s/mm^2 and (N, 3) unit directions in RAS (as ``DWI.bvecs``).
    snr : mean b = 0 truth inside the brain mask divided by the noise's sigma.

    Returns
    -------
    Phantom with the brain mask of ``source``, labels CSF (MD > 2e-3 mm^2/s), WM (FA > 0.35) and GM
    (the rest of the brain), and the FA of the fitted tensors.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel, fractional_anisotropy, mean_diffusivity

    from ddm2.maps import brain_mask

    data = np.asarray(source.data, dtype=np.float64)
    mask = brain_mask(data, source.bvals)
    table = gradient_table(source.bvals, bvecs=source.bvecs_voxel(), b0_threshold=B0_THRESHOLD)
    fit = TensorModel(table, fit_method="WLS", return_S0_hat=True).fit(data, mask=mask)
    evals = np.clip(np.nan_to_num(fit.evals), *DIFFUSIVITY_RANGE)
    tensors = np.einsum("...ij,...j,...kj->...ik", fit.evecs, evals, fit.evecs)
    # a b = 0 signal above any measured one is a failed fit: keep it within the scan's own range
    s0 = np.clip(np.nan_to_num(fit.S0_hat), 0.0, data[..., source.bvals <= B0_THRESHOLD].max()) * mask

    target = DWI(np.zeros(data.shape[:3] + (len(bvals),), dtype=np.float32), source.affine,
                 np.asarray(bvals, dtype=np.float64), np.asarray(bvecs, dtype=np.float64))
    directions = target.bvecs_voxel()  # the fitted tensors live in voxel axes
    exponent = np.einsum("...ij,ni,nj->...n", tensors, directions, directions) * target.bvals
    truth_data = (s0[..., None] * np.exp(-exponent)).astype(np.float32)

    sigma = noise_level(truth_data, target.bvals, mask, snr)
    noisy_data = add_rician_noise(truth_data, sigma, seed).astype(np.float32)
    fa = np.where(mask, np.nan_to_num(fractional_anisotropy(evals)), 0.0).astype(np.float32)
    md = mean_diffusivity(evals)
    labels = np.full(mask.shape, BACKGROUND, dtype=np.int8)
    labels[mask] = GM
    labels[mask & (fa > WM_FA)] = WM
    labels[mask & (md > CSF_MD)] = CSF
    truth = DWI(truth_data, source.affine, target.bvals, target.bvecs, source=f"{source.source}, resynthesised truth")
    noisy = DWI(noisy_data, source.affine, target.bvals, target.bvecs,
                source=f"{source.source}, resynthesised at SNR {snr:g}")
    return Phantom(noisy=noisy, truth=truth, mask=mask, labels=labels, fa=fa, sigma=sigma)


def with_b0_volumes(bvals: np.ndarray, bvecs: np.ndarray, n_b0: int) -> tuple[np.ndarray, np.ndarray]:
    """The table with its b = 0 volumes replaced by ``n_b0`` of them at the start."""
    weighted = np.asarray(bvals) > B0_THRESHOLD
    return (np.concatenate([np.zeros(n_b0), np.asarray(bvals, dtype=np.float64)[weighted]]),
            np.concatenate([np.zeros((n_b0, 3)), np.asarray(bvecs, dtype=np.float64)[weighted]]))
