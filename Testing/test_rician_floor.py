"""bench/rician_floor.py's Rician mean and its inverse, the figures of bench/RESULTS.md's Rician floor."""

from __future__ import annotations

import sys

import numpy as np
from paths import ROOT

from ddm2.phantom import add_rician_noise

sys.path.insert(0, str(ROOT / "bench"))
from rician_floor import remove_rician_bias, rician_mean  # noqa: E402


def test_rician_mean_is_the_mean_of_simulated_magnitude_noise():
    sigma, count = 3.0, 200_000
    for nu in (0.0, 1.5, 6.0, 30.0):
        samples = add_rician_noise(np.full(count, nu), sigma, seed=1)
        standard_error = samples.std() / np.sqrt(count)
        assert abs(samples.mean() - rician_mean(np.array(nu), sigma)) < 4 * standard_error
    assert np.isclose(rician_mean(np.array(0.0), sigma), sigma * np.sqrt(np.pi / 2))


def test_removing_the_bias_inverts_the_rician_mean_and_floors_at_zero():
    sigma = 2.0
    nu = np.concatenate([np.linspace(0.0, 10 * sigma, 501), [50 * sigma, 200 * sigma]])
    np.testing.assert_allclose(remove_rician_bias(rician_mean(nu, sigma), sigma), nu, atol=1e-3 * sigma, rtol=1e-6)
    below_floor = np.array([0.0, 0.5 * sigma, sigma * np.sqrt(np.pi / 2)])
    np.testing.assert_array_equal(remove_rician_bias(below_floor, sigma), 0.0)
