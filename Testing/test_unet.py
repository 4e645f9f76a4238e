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


def test_a_compiled_network_computes_the_same_and_keeps_its_checkpoint_keys():
    """``ddm2 --compile``: torch.compile in place, so checkpoints load into a plain network and back."""
    from ddm2.training import prepare_model

    torch.manual_seed(0)
    plain = UNet(preset_config("small", in_channels=1, noise_embedding=True))
    compiled = UNet(preset_config("small", in_channels=1, noise_embedding=True))
    compiled.load_state_dict(plain.state_dict())
    compiled = prepare_model(compiled, torch.device("cpu"), compile_network=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x, level = torch.randn(2, 1, 24, 24), torch.tensor([0.99, 0.9])
    with torch.no_grad():
        expected, got = plain(x, noise_level=level), compiled(x, noise_level=level)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
