"""The U-Net: sizes, presets and conditioning."""

from __future__ import annotations

import torch

from ddm2.unet import UNet, parameter_count, preset_config


def test_paper_preset_has_the_authors_24_million_parameters():
    model = UNet(preset_config("paper", in_channels=1, noise_embedding=True))
    assert 24.0e6 < parameter_count(model) < 25.0e6


def test_odd_slice_sizes_come_back_at_their_size():
    model = UNet(preset_config("small", in_channels=2, condition_dim=18))
    out = model(torch.randn(2, 2, 37, 53), condition=torch.randn(2, 18))
    assert out.shape == (2, 1, 37, 53)


def test_noise_level_and_condition_change_the_output():
    torch.manual_seed(0)
    model = UNet(preset_config("small", in_channels=1, noise_embedding=True))
    x = torch.randn(1, 1, 16, 16)
    a = model(x, noise_level=torch.tensor([0.99]))
    b = model(x, noise_level=torch.tensor([0.5]))
    assert (a - b).abs().max() > 1e-4
    conditioned = UNet(preset_config("small", in_channels=1, condition_dim=6))
    c = conditioned(x, condition=torch.zeros(1, 6))
    d = conditioned(x, condition=torch.ones(1, 6))
    assert (c - d).abs().max() > 1e-4
