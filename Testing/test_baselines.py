"""ddm2.baselines: dipy's MP-PCA and Patch2Self behind one call."""

from __future__ import annotations

import numpy as np
import pytest

from ddm2.baselines import denoise_baseline

SIGMA = 40.0  # Rician noise level; S0 = 800-1200, so SNR 20-30 on b = 0 and about 5-15 weighted


def noisy_phantom(seed: int = 0, shape: tuple[int, int, int] = (16, 16, 6)):
    """A smooth tensor phantom, 3 b = 0 + 30 weighted volumes (b = 1000), with Rician noise.

    The fibre direction sweeps through the plane along x and the anisotropy grows along y, so that the
    voxels hold many different signal profiles, as a brain does (Patch2Self regresses each volume on
    the others over voxels and needs that variety).
    """
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    theta, phi = np.arccos(rng.uniform(0, 1, 30)), rng.uniform(0, 2 * np.pi, 30)
    directions, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 1000)
    bvecs = np.vstack([np.zeros((3, 3)), directions.vertices])
    bvals = np.r_[np.zeros(3), np.full(30, 1000.0)]
    x, y, z = np.meshgrid(*(np.linspace(0, 1, size) for size in shape), indexing="ij")
    angle = np.pi * (x + 0.3 * z)
    axial, radial = 0.9e-3 + 0.9e-3 * y, 0.7e-3 - 0.4e-3 * y
    fibre = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=-1)
    cosine = np.einsum("xyzi,ni->xyzn", fibre, bvecs)
    adc = radial[..., None] + (axial - radial)[..., None] * cosine ** 2
    truth = (800.0 + 400.0 * z[..., None]) * np.exp(-bvals * adc)
    noisy = np.abs(truth + rng.normal(0, SIGMA, truth.shape) + 1j * rng.normal(0, SIGMA, truth.shape))
    return noisy.astype(np.float32), truth, bvals


def rmse(estimate, truth, volumes):
    return float(np.sqrt(np.mean((estimate[..., volumes] - truth[..., volumes]) ** 2)))


@pytest.mark.parametrize("name, margin", [("mppca", 0.5), ("patch2self", 0.3)])
def test_baselines_cut_the_error_of_a_noisy_phantom_by_a_stated_margin(name, margin):
    noisy, truth, bvals = noisy_phantom()
    denoised = denoise_baseline(name, noisy, bvals)
    assert denoised.shape == noisy.shape and denoised.dtype == np.float32
    weighted = bvals > 50
    before, after = rmse(noisy, truth, weighted), rmse(denoised, truth, weighted)
    # measured: MP-PCA removes 62 %, Patch2Self 42 % of the RMSE here (40.1 -> 15.3 and 23.2)
    assert after < (1 - margin) * before, (name, before, after)
    # every volume improves, b = 0 included (dipy 1.12 alone leaves stale results in the last N % 5
    # Patch2Self volumes, up to 4 times the noise level)
    per_volume = np.sqrt(np.mean((denoised - truth) ** 2, axis=(0, 1, 2)))
    assert per_volume.max() < 0.85 * SIGMA, (name, per_volume.round(1))


def test_patch2self_is_deterministic():
    noisy, _, bvals = noisy_phantom()
    np.testing.assert_array_equal(denoise_baseline("patch2self", noisy, bvals),
                                  denoise_baseline("patch2self", noisy, bvals))


def test_names_are_case_and_punctuation_insensitive_and_unknown_names_are_rejected():
    noisy, _, bvals = noisy_phantom()
    np.testing.assert_array_equal(denoise_baseline("MP-PCA", noisy, bvals), denoise_baseline("mppca", noisy, bvals))
    with pytest.raises(ValueError, match="name must be one of mppca, patch2self"):
        denoise_baseline("bm4d", noisy, bvals)


def test_inputs_are_validated_with_the_expected_shapes():
    noisy, _, bvals = noisy_phantom()
    with pytest.raises(ValueError, match="data must be 4-D"):
        denoise_baseline("mppca", noisy[..., 0], bvals)
    with pytest.raises(ValueError, match="one entry per volume"):
        denoise_baseline("mppca", noisy, bvals[:-1])
    with pytest.raises(ValueError, match=r"mask must have shape \(16, 16, 6\)"):
        denoise_baseline("patch2self", noisy, bvals, mask=np.ones((16, 16), dtype=bool))


def test_a_mask_zeroes_the_outside_for_both_baselines():
    noisy, _, bvals = noisy_phantom()
    mask = np.zeros(noisy.shape[:3], dtype=bool)
    mask[2:14, 2:14, 1:5] = True
    for name in ("mppca", "patch2self"):
        denoised = denoise_baseline(name, noisy, bvals, mask=mask)
        assert np.all(denoised[~mask] == 0), name
        assert np.all(denoised[mask].mean(axis=0) > 0), name
