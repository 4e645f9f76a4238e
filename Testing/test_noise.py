"""The scan's noise level for Stage III's signal target, measured on the background."""

from __future__ import annotations

import numpy as np
import pytest

from ddm2.dwi import InputError
from ddm2.noise import NoBackground, background_sigma
from ddm2.phantom import make_phantom


@pytest.mark.parametrize("snr", [5.0, 20.0])
def test_the_background_gives_the_rician_noise_sigma(snr):
    phantom = make_phantom((48, 48, 4), snr=snr, seed=1)
    sigma = background_sigma(phantom.noisy.data, phantom.noisy.bvals)
    assert sigma == pytest.approx(phantom.sigma, rel=0.03)


def test_a_background_masked_to_zero_asks_for_sigma():
    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    masked = np.where(phantom.mask[..., None], phantom.noisy.data, 0.0)
    with pytest.raises(NoBackground, match="--noise-sigma") as raised:
        background_sigma(masked, phantom.noisy.bvals)
    assert isinstance(raised.value, InputError)  # the CLI's one-line error and bad-input exit code


@pytest.mark.parametrize("target", ["auto", "signal", "mean"])
def test_the_target_falls_back_to_the_mean_only_when_asked_for_auto(target):
    from ddm2.pipeline import Settings, scan_noise_sigma

    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    masked = phantom.noisy.with_data(np.where(phantom.mask[..., None], phantom.noisy.data, 0.0))
    settings = Settings(target=target)
    measured, _ = scan_noise_sigma(phantom.noisy, settings)
    assert (measured is None) == (target == "mean")
    if target == "signal":
        with pytest.raises(NoBackground):
            scan_noise_sigma(masked, settings)
    else:
        sigma, note = scan_noise_sigma(masked, settings)
        assert sigma is None
        assert ("fewer than the 1000 needed" in note) == (target == "auto")
    given, _ = scan_noise_sigma(masked, Settings(target=target, noise_sigma=12.5))
    assert given == (None if target == "mean" else 12.5)


def test_a_large_background_is_measured_on_an_even_sample_of_it(monkeypatch):
    """Past MAX_BACKGROUND_SAMPLES values the median is taken on a strided sample, volume by volume."""
    from ddm2 import noise

    phantom = make_phantom((48, 48, 4), snr=10.0, seed=1)
    everything = noise.background_values(phantom.noisy.data, phantom.noisy.bvals)
    monkeypatch.setattr(noise, "MAX_BACKGROUND_SAMPLES", 20_000)
    sample = noise.background_values(phantom.noisy.data, phantom.noisy.bvals)
    assert everything.size > 100_000 and 10_000 < sample.size <= 20_000
    assert background_sigma(phantom.noisy.data, phantom.noisy.bvals) == pytest.approx(phantom.sigma, rel=0.03)
