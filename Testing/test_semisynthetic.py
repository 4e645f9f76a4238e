"""Semi-synthetic input (the benchmark's real-anatomy cases): tensors fitted to the real scan and
re-synthesised on another gradient table, with a known truth and a known noise level."""

from __future__ import annotations

import numpy as np
import pytest
from paths import PHILIPS, needs_philips

from ddm2 import dwi as dwi_io
from ddm2.maps import dti_maps
from ddm2.phantom import dipy_gradient_table
from ddm2.semisynthetic import resynthesise, with_b0_volumes

pytestmark = needs_philips


@pytest.fixture(scope="module")
def scan():
    return dwi_io.load(PHILIPS)


def test_cropped_keeps_every_voxel_at_its_world_position(scan):
    box = scan.cropped((10, 20, 5), (60, 70, 9))
    assert box.data.shape == (50, 50, 4, scan.data.shape[3])
    np.testing.assert_array_equal(box.data[3, 4, 2], scan.data[13, 24, 7])
    world = lambda affine, ijk: affine[:3, :3] @ np.asarray(ijk, dtype=float) + affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(world(box.affine, (3, 4, 2)), world(scan.affine, (13, 24, 7)), atol=1e-9)
    np.testing.assert_array_equal(box.bvecs, scan.bvecs)


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
