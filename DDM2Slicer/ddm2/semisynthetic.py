"""Semi-synthetic DWI: a real scan's anatomy on any gradient table, with a known truth.

A diffusion tensor and a b = 0 signal are fitted (dipy, WLS) in every brain voxel of a real scan;
the truth is the signal those tensors give on the new gradient table, S0 exp(-b g^T D g), and the
noisy input adds Rician noise of a chosen SNR. The benchmark uses it to score denoisers on real
anatomy (folded cortex, CSF, crossing tracts at the scan's resolution) rather than on the phantom's
piecewise-constant tissue.

A single tensor per voxel is the model MP-PCA's low-rank patches fit best (99.7 % of a 5 x 5 x 5
patch's centred energy in 7 of 60 components on hardi55). ``fibres=2`` explains each fitted tensor
as two crossing fibres instead, which real white matter holds in most of its voxels: the same
apparent tensor at low b, a different signal at high b.
"""

from __future__ import annotations

import numpy as np

from ddm2.dwi import B0_THRESHOLD, DWI
from ddm2.phantom import BACKGROUND, CSF, GM, WM, Phantom, add_rician_noise, noise_level

# eigenvalues outside this range are fitting noise (negative, or above free water at body temperature)
DIFFUSIVITY_RANGE = (1e-5, 3.2e-3)
CSF_MD, WM_FA = 2.0e-3, 0.35  # tissue labels of the fitted tensors (for reports only)


def two_fibre_signal(evals: np.ndarray, evecs: np.ndarray, directions: np.ndarray,
                     bvals: np.ndarray) -> np.ndarray:
    """exp(-b g^T D g) of two equal, axially symmetric fibres whose mean tensor is the given one.

    The fibres lie in the plane of the first two eigenvectors e1, e2 at +-theta from e1, with radial
    diffusivity l3 and axial l3 + delta: their mean tensor l3 I + delta (cos^2 theta e1 e1^T +
    sin^2 theta e2 e2^T) has the eigenvalues (l1, l2, l3) when delta = l1 + l2 - 2 l3 and
    cos^2 theta = (l1 - l3) / delta. A prolate tensor (l2 = l3) stays one fibre (theta = 0); an oblate
    one (l1 = l2) becomes two crossing at 90 degrees. Since the signal's log is linear in b only to
    first order, the two agree at low b and differ at high b.

    evals (..., 3) descending and evecs (..., 3, 3) in columns, as dipy's fit gives; directions (N, 3)
    unit vectors in the tensors' axes; bvals (N,). Returns (..., N).
    """
    l1, l2, l3 = np.moveaxis(evals, -1, 0)
    delta = l1 + l2 - 2 * l3
    cos2 = np.divide(l1 - l3, delta, out=np.ones_like(delta), where=delta > 0)
    cosine, sine = np.sqrt(cos2)[..., None], np.sqrt(1 - cos2)[..., None]
    signal = 0.0
    for side in (1.0, -1.0):
        axis = cosine * evecs[..., :, 0] + side * sine * evecs[..., :, 1]
        diffusivity = l3[..., None] + delta[..., None] * np.einsum("...i,ni->...n", axis, directions) ** 2
        signal = signal + 0.5 * np.exp(-diffusivity * bvals)
    return signal


def resynthesise(source: DWI, bvals: np.ndarray, bvecs: np.ndarray, snr: float, seed: int = 0,
                 fibres: int = 1) -> Phantom:
    """The anatomy of ``source`` on the table (bvals, bvecs), noise-free and with Rician noise.

    Parameters
    ----------
    source : a real DWI with at least 6 directions and one b = 0 volume.
    bvals, bvecs : the new table: (N,) s/mm^2 and (N, 3) unit directions in RAS (as ``DWI.bvecs``).
    snr : mean b = 0 truth inside the brain mask divided by the noise's sigma.
    fibres : 1, each voxel's fitted tensor; 2, that tensor as two crossing fibres (``two_fibre_signal``).

    Returns
    -------
    Phantom with the brain mask of ``source``, labels CSF (MD > 2e-3 mm^2/s), WM (FA > 0.35) and GM
    (the rest of the brain), and the FA of the fitted tensors.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel, fractional_anisotropy, mean_diffusivity

    from ddm2.maps import brain_mask

    if fibres not in (1, 2):
        raise ValueError(f"fibres must be 1 or 2, not {fibres}")
    data = np.asarray(source.data, dtype=np.float64)
    mask = brain_mask(data, source.bvals)
    table = gradient_table(source.bvals, bvecs=source.bvecs_voxel(), b0_threshold=B0_THRESHOLD)
    fit = TensorModel(table, fit_method="WLS", return_S0_hat=True).fit(data, mask=mask)
    evals = np.clip(np.nan_to_num(fit.evals), *DIFFUSIVITY_RANGE)
    # a b = 0 signal above any measured one is a failed fit: keep it within the scan's own range
    s0 = np.clip(np.nan_to_num(fit.S0_hat), 0.0, data[..., source.bvals <= B0_THRESHOLD].max()) * mask

    target = DWI(np.zeros(data.shape[:3] + (len(bvals),), dtype=np.float32), source.affine,
                 np.asarray(bvals, dtype=np.float64), np.asarray(bvecs, dtype=np.float64))
    directions = target.bvecs_voxel()  # the fitted tensors live in voxel axes
    if fibres == 1:
        tensors = np.einsum("...ij,...j,...kj->...ik", fit.evecs, evals, fit.evecs)
        attenuation = np.exp(-np.einsum("...ij,ni,nj->...n", tensors, directions, directions) * target.bvals)
    else:
        attenuation = two_fibre_signal(evals, fit.evecs, directions, target.bvals)
    truth_data = (s0[..., None] * attenuation).astype(np.float32)

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
