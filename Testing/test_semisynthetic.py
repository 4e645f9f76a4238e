"""Semi-synthetic input (the benchmark's real-anatomy cases): tensors fitted to the real scan and
re-synthesised on another gradient table, with a known truth and a known noise level."""

from __future__ import annotations

import numpy as np
import pytest
from paths import PHILIPS, needs_philips

from dipy.reconst.dti import fractional_anisotropy

from ddm2 import dwi as dwi_io
from ddm2.maps import dti_maps
from ddm2.phantom import dipy_gradient_table
from ddm2.semisynthetic import resynthesise, two_fibre_signal, with_b0_volumes


@pytest.fixture(scope="module")
def scan():
    return dwi_io.load(PHILIPS)


def test_two_fibres_keep_the_tensor_at_low_b_and_cross_at_high_b():
    evecs = np.eye(3)[None].repeat(2, axis=0)  # e1 = x, e2 = y, e3 = z
    evals = np.array([[1.7e-3, 0.3e-3, 0.3e-3],    # prolate: one fibre along x
                      [1.0e-3, 1.0e-3, 0.3e-3]])   # oblate: two fibres at 90 degrees, along x +- y
    along_fibre = np.array([[1.0, 1.0, 0.0]]) / np.sqrt(2)
    b = np.array([3000.0])
    signal = two_fibre_signal(evals, evecs, along_fibre, b)
    # the prolate tensor is its own single fibre: exp(-b g^T D g) with g^T D g = (1.7 + 0.3) / 2 e-3
    assert signal[0, 0] == pytest.approx(np.exp(-3000 * 1.0e-3), rel=1e-12)
    # the oblate one: one fibre along g (diffusivity 0.3 + 1.4), the other across it (0.3), half each;
    # a single tensor would give exp(-3000 * 1.0e-3) = 0.0498
    assert signal[1, 0] == pytest.approx(0.5 * (np.exp(-3000 * 1.7e-3) + np.exp(-3000 * 0.3e-3)), rel=1e-12)
    assert signal[1, 0] > 3.5 * np.exp(-3000 * 1.0e-3)

    # at low b (the log's second-order term b^2 var(D) / 2 negligible) the mixture's tensor fit is the
    # given tensor: FA and MD as the tensor's own
    bvals, bvecs = dipy_gradient_table("55dir_grad")
    low_b = np.where(bvals > 0, 10.0, 0.0)
    data = np.concatenate([np.ones((2, 1)), two_fibre_signal(evals, evecs, bvecs[bvals > 0], low_b[bvals > 0])], 1)
    maps = dti_maps(data[:, None, None, :], np.concatenate([[0.0], low_b[bvals > 0]]),
                    np.concatenate([np.zeros((1, 3)), bvecs[bvals > 0]]), b0_threshold=1.0)
    np.testing.assert_allclose(maps["md"][:, 0, 0], evals.mean(axis=1), rtol=5e-3)
    np.testing.assert_allclose(maps["fa"][:, 0, 0], fractional_anisotropy(evals), rtol=5e-3)


@needs_philips
def test_cropped_keeps_every_voxel_at_its_world_position(scan):
    box = scan.cropped((10, 20, 5), (60, 70, 9))
    assert box.data.shape == (50, 50, 4, scan.data.shape[3])
    np.testing.assert_array_equal(box.data[3, 4, 2], scan.data[13, 24, 7])
    world = lambda affine, ijk: affine[:3, :3] @ np.asarray(ijk, dtype=float) + affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(world(box.affine, (3, 4, 2)), world(scan.affine, (13, 24, 7)), atol=1e-9)
    np.testing.assert_array_equal(box.bvecs, scan.bvecs)


@needs_philips
def test_resynthesised_truth_is_the_fitted_tensors_on_the_new_table(scan):
    source = scan.cropped((16, 8, 14), (96, 104, 17))
    before = source.data.copy()
    bvals, bvecs = with_b0_volumes(*dipy_gradient_table("55dir_grad"), n_b0=3)
    assert bvals.shape == (58,) and (bvals[:3] == 0).all() and (bvals[3:] == 2000).all()
    case = resynthesise(source, bvals, bvecs, snr=10, seed=1)
    np.testing.assert_array_equal(source.data, before)  # the source is read, never written
    truth, noisy, mask = case.truth, case.noisy, case.mask
    assert truth.data.shape == noisy.data.shape == source.data.shape[:3] + (58,)
    np.testing.assert_array_equal(truth.bvals, bvals)
    assert 0.2 < mask.mean() < 0.9 and not truth.data[~mask].any()

    # the truth is noise-free single tensors: a WLS fit on the new table gives back the fitted FA exactly
    maps = dti_maps(truth.data, truth.bvals, truth.bvecs_voxel(), mask=mask)
    np.testing.assert_allclose(maps["fa"][mask], case.fa[mask], atol=2e-3)
    assert 0.15 < case.fa[mask].mean() < 0.5  # real brain: neither isotropic nor all white matter
    assert (case.labels[mask] > 0).all() and len(np.unique(case.labels[mask])) == 3

    # the noise: SNR = mean b0 in the brain / sigma; outside the head the magnitude is Rayleigh(sigma)
    b0 = truth.data[..., :3].mean(axis=3)
    assert b0[mask].mean() / case.sigma == pytest.approx(10, rel=1e-6)
    background = noisy.data[~mask]
    assert background.mean() / np.sqrt(np.pi / 2) == pytest.approx(case.sigma, rel=0.03)


@needs_philips
def test_two_fibre_truth_differs_from_the_tensors_at_high_b_only(scan):
    source = scan.cropped((16, 8, 14), (96, 104, 16))
    bvals, bvecs = with_b0_volumes(*dipy_gradient_table("55dir_grad"), n_b0=1)
    tensors, crossing = (resynthesise(source, bvals, bvecs, snr=10, seed=1, fibres=f) for f in (1, 2))
    mask = tensors.mask
    np.testing.assert_array_equal(crossing.mask, mask)
    np.testing.assert_array_equal(crossing.truth.data[..., 0], tensors.truth.data[..., 0])  # the same b0
    weighted = tensors.truth.data[mask][:, 1:]
    difference = crossing.truth.data[mask][:, 1:] - weighted
    # at b = 2000 the two fibres' signal lies above the tensor's (Jensen), by about a tenth on this brain
    assert difference.mean() > 0
    assert 0.05 < np.sqrt((difference ** 2).mean()) / weighted.mean() < 0.3
    with pytest.raises(ValueError, match="fibres must be 1 or 2"):
        resynthesise(source, bvals, bvecs, snr=10, fibres=3)
