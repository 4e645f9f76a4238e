"""The scan's noise level for Stage III's signal target, measured on the background."""

from __future__ import annotations

import numpy as np
import pytest

from ddm2.dwi import InputError
from ddm2.noise import NoBackground, measure_background
from ddm2.phantom import add_rician_noise, make_phantom


@pytest.mark.parametrize("snr", [5.0, 20.0])
def test_the_background_gives_the_rician_noise_sigma(snr):
    phantom = make_phantom((48, 48, 4), snr=snr, seed=1)
    background = measure_background(phantom.noisy.data, phantom.noisy.bvals)
    assert background.sigma == pytest.approx(phantom.sigma, rel=0.03)
    assert background.zero_share == 0.0 and background.doubt() == ""  # pure Rayleigh noise: no doubt
    assert background.b0_over_weighted == pytest.approx(1.0, abs=4 * background.ratio_standard_error)


def test_a_background_masked_to_zero_asks_for_sigma():
    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    masked = np.where(phantom.mask[..., None], phantom.noisy.data, 0.0)
    with pytest.raises(NoBackground, match="--noise-sigma") as raised:
        measure_background(masked, phantom.noisy.bvals)
    assert isinstance(raised.value, InputError)  # the CLI's one-line error and bad-input exit code


def _two_coil_sum_of_squares(truth: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Magnitude data combined over two coils as a root sum of squares, each coil seeing half the
    signal's power: noncentral chi with 4 degrees of freedom, not Rician."""
    rng = np.random.default_rng(seed)
    channels = rng.normal(0.0, sigma, size=(4,) + truth.shape)
    channels[0] += truth / np.sqrt(2.0)
    channels[2] += truth / np.sqrt(2.0)
    return np.sqrt((channels ** 2).sum(0))


def test_a_background_that_is_not_pure_noise_puts_sigma_in_doubt():
    """The log says when the background is not the Rayleigh sample that sigma is read from: masked in
    part, ghosted, holding scalp, or a sum of squares over coils (where the Rayleigh median reads sigma
    56 % high)."""
    from ddm2.pipeline import Settings, scan_noise_sigma

    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    data, bvals, outside = phantom.noisy.data, phantom.noisy.bvals, ~phantom.mask
    half_masked = data.copy()
    half_masked[:, ::2][outside[:, ::2]] = 0.0
    ghosted = data + 0.3 * np.roll(phantom.truth.data, data.shape[1] // 2, axis=1) * outside[..., None]
    coils = _two_coil_sum_of_squares(phantom.truth.data, phantom.sigma, seed=1)
    # scalp left outside the mask: signal of sigma at b = 0, attenuated by diffusion weighting (D 1e-3)
    scalp_signal = phantom.sigma * np.exp(-1e-3 * bvals) * outside[..., None]
    scalp = add_rician_noise(phantom.truth.data + scalp_signal, phantom.sigma, seed=1)

    masked_doubt = measure_background(half_masked, bvals)
    assert 0.4 < masked_doubt.zero_share < 0.6 and "of it is exactly 0" in masked_doubt.doubt()
    assert "times their median" not in masked_doubt.doubt()  # the non-zero half is still pure noise
    ghost = measure_background(ghosted, bvals)
    assert ghost.mean_over_median > 1.1 and "times their median" in ghost.doubt()
    two_coils = measure_background(coils, bvals)
    assert two_coils.sigma > 1.4 * phantom.sigma  # why it matters
    assert two_coils.mean_over_median < 1.04 and "times their median" in two_coils.doubt()
    with_scalp = measure_background(scalp, bvals)
    assert with_scalp.b0_over_weighted > 1.15 and "it holds signal" in with_scalp.doubt()
    for clean in (masked_doubt, two_coils):  # noise alone is the same in every volume
        assert abs(clean.b0_over_weighted - 1.0) < 0.05 and "it holds signal" not in clean.doubt()
    sigma, _, warnings = scan_noise_sigma(phantom.noisy.with_data(ghosted), Settings())
    assert sigma == ghost.sigma and warnings == [ghost.doubt()]
    assert warnings[0].endswith("give the scanner's noise level (--noise-sigma) if it is known")
    assert scan_noise_sigma(phantom.noisy, Settings())[2] == []


@pytest.mark.parametrize("target", ["auto", "signal", "mean"])
def test_the_target_falls_back_to_the_mean_only_when_asked_for_auto(target):
    from ddm2.pipeline import Settings, scan_noise_sigma

    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    masked = phantom.noisy.with_data(np.where(phantom.mask[..., None], phantom.noisy.data, 0.0))
    settings = Settings(target=target)
    measured, _, _ = scan_noise_sigma(phantom.noisy, settings)
    assert (measured is None) == (target == "mean")
    if target == "signal":
        with pytest.raises(NoBackground):
            scan_noise_sigma(masked, settings)
    else:
        sigma, note, _ = scan_noise_sigma(masked, settings)
        assert sigma is None
        assert ("fewer than the 1000 needed" in note) == (target == "auto")
    given, _, _ = scan_noise_sigma(masked, Settings(target=target, noise_sigma=12.5))
    assert given == (None if target == "mean" else 12.5)


def test_a_large_background_is_measured_on_an_even_sample_of_it(monkeypatch):
    """Past MAX_BACKGROUND_SAMPLES values the median is taken on a strided sample, volume by volume."""
    from ddm2 import noise

    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    everything = noise.background_values(phantom.noisy.data, phantom.noisy.bvals)
    monkeypatch.setattr(noise, "MAX_BACKGROUND_SAMPLES", 20_000)
    sample = noise.background_values(phantom.noisy.data, phantom.noisy.bvals)
    assert everything.size > 100_000 and 10_000 < sample.size <= 20_000
    assert measure_background(phantom.noisy.data, phantom.noisy.bvals).sigma == pytest.approx(phantom.sigma, rel=0.03)
