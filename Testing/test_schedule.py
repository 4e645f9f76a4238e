"""The reverse warm-up chain and Stage II's state matching."""

from __future__ import annotations

import numpy as np
import pytest

from ddm2.schedule import DiffusionSchedule, first_local_minimum, reverse_warmup_betas, slice_moments


def test_reverse_warmup_is_flat_then_a_ramp_over_the_last_700_steps():
    betas = reverse_warmup_betas()
    assert len(betas) == 1000
    assert np.all(betas[:301] == 5e-5)
    assert betas[-1] == pytest.approx(1e-2)
    assert np.all(np.diff(betas[300:]) > 0)


def test_chain_noise_levels_match_the_authors_tables():
    schedule = DiffusionSchedule()
    assert schedule.sqrt_alpha_bar[0] == 1.0 and len(schedule.sqrt_alpha_bar) == 1001
    for state, expected in [(1, 0.0071), (100, 0.071), (300, 0.122), (400, 0.294), (500, 0.515)]:
        assert schedule.noise_std[state] == pytest.approx(expected, abs=1e-3)
    assert schedule.alpha_bar[1000] == pytest.approx(0.029, abs=2e-3)


def test_first_local_minimum_stops_at_the_first_rise():
    rows = np.array([[5, 4, 3, 4, 0, 0], [3, 3, 2, 2, 1, 0], [1, 2, 0, 0, 0, 0]], dtype=float)
    assert first_local_minimum(rows).tolist() == [2, 5, 0]


@pytest.mark.parametrize("true_state", [60, 150, 320, 420])
def test_stage2_finds_the_state_of_a_known_noise_level(true_state):
    schedule = DiffusionSchedule()
    rng = np.random.default_rng(true_state)
    y = np.tanh(rng.normal(size=(4, 1, 1)) + np.linspace(-1, 1, 256)[None, :, None] * np.ones((1, 1, 256)))
    noisy = schedule.sqrt_alpha_bar[true_state] * y + schedule.noise_std[true_state] * rng.normal(size=y.shape)
    states = schedule.match_states(noisy, y)
    # the noise std is estimated from 65536 pixels (0.3 % error); a state of the ramp moves it by ~1 %
    assert np.all(np.abs(states - true_state) <= max(3, 0.03 * true_state)), states


def test_a_noiseless_slice_matches_state_zero():
    schedule = DiffusionSchedule()
    y = np.linspace(-1, 1, 64 * 64).reshape(1, 64, 64)
    assert schedule.match_states(y, y).tolist() == [0]


def test_slice_moments_in_chunks_equal_one_pass_and_leave_the_inputs_alone():
    rng = np.random.default_rng(5)
    noisy, estimate = rng.normal(size=(2, 11, 6, 7))
    kept = noisy.copy(), estimate.copy()
    one_pass = slice_moments(noisy, estimate, chunk=len(noisy))
    chunked = slice_moments(noisy, estimate, chunk=3)
    for whole, part in zip(one_pass, chunked):
        np.testing.assert_array_equal(part, whole)
    np.testing.assert_allclose(one_pass[0], noisy.reshape(11, -1).var(axis=1), rtol=1e-12)
    np.testing.assert_allclose(one_pass[2], [np.cov(a.ravel(), b.ravel(), bias=True)[0, 1]
                                             for a, b in zip(noisy, estimate)], rtol=1e-10)
    np.testing.assert_array_equal(noisy, kept[0])  # float64 input: centred on copies, not in place
    np.testing.assert_array_equal(estimate, kept[1])
