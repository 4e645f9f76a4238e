"""The reverse chain: DDPM steps are the posterior, DDIM skips states, batches mix states."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddm2.sampler import denoise_slices, reverse_step, state_sequences
from ddm2.schedule import DiffusionSchedule
from ddm2.training import Randomness


class Oracle(nn.Module):
    """Predicts the clean slices it was given, whatever the state (an ideal F)."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean = clean
        self.calls = 0

    def forward(self, state, noise_level=None):
        self.calls += 1
        match = [int(torch.argmin(((self.clean - s) ** 2).mean(dim=(1, 2)))) for s in state[:, 0]]
        return self.clean[match][:, None]


def test_state_sequences_run_from_each_state_to_zero():
    ddpm = state_sequences(np.array([3, 5]), "ddpm", None)
    assert ddpm.tolist() == [[3, 3, 3, 2, 1, 0], [5, 4, 3, 2, 1, 0]]
    ddim = state_sequences(np.array([100, 7]), "ddim", 4)
    assert ddim[:, 0].tolist() == [100, 7] and ddim[:, -1].tolist() == [0, 0]
    assert ddim.shape == (2, 5)


def test_ddpm_step_is_the_posterior_of_the_chain():
    schedule = DiffusionSchedule()
    k = 250
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (1, 1, 8, 8))
    state = schedule.sqrt_alpha_bar[k] * x0 + schedule.noise_std[k] * rng.normal(size=x0.shape)
    noise = rng.normal(size=x0.shape)
    previous = schedule.alpha_bar[k - 1]
    mean = (schedule.betas[k] * np.sqrt(previous) * x0
            + (1 - previous) * np.sqrt(schedule.alphas[k]) * state) / (1 - schedule.alpha_bar[k])
    std = np.sqrt(schedule.betas[k] * (1 - previous) / (1 - schedule.alpha_bar[k]))
    alpha_bar = torch.tensor(schedule.alpha_bar, dtype=torch.float64)
    step = reverse_step(torch.tensor(state, dtype=torch.float32), torch.tensor(x0, dtype=torch.float32),
                        alpha_bar[[k]], alpha_bar[[k - 1]], 1.0, torch.tensor(noise, dtype=torch.float32))
    np.testing.assert_allclose(step.numpy(), mean + std * noise, atol=1e-5)
    deterministic = reverse_step(torch.tensor(state, dtype=torch.float32), torch.tensor(x0, dtype=torch.float32),
                                 alpha_bar[[k]], alpha_bar[[0]], 0.0, None)
    np.testing.assert_allclose(deterministic.numpy(), x0, atol=1e-6)  # a jump to state 0 lands on x0


def test_ideal_denoiser_recovers_the_clean_slices_with_mixed_states():
    schedule = DiffusionSchedule()
    rng = np.random.default_rng(1)
    clean = np.tanh(rng.normal(size=(5, 12, 12))).astype(np.float32)
    states = np.array([40, 5, 300, 40, 120])
    noisy = (schedule.sqrt_alpha_bar[states][:, None, None] * clean
             + schedule.noise_std[states][:, None, None] * rng.normal(size=clean.shape)).astype(np.float32)
    for sampler, steps in (("ddpm", None), ("ddim", 10)):
        oracle = Oracle(torch.tensor(clean))
        out, curves = denoise_slices(oracle, noisy, states, schedule, sampler=sampler, steps=steps, batch_size=2,
                                     device=torch.device("cpu"), randomness=Randomness.seeded(0, torch.device("cpu")))
        np.testing.assert_allclose(out, clean, atol=1e-6)
        lengths = [len(c) for c in curves]  # the input (RMSE 0), then one point per step
        assert lengths == [1 + (s if sampler == "ddpm" else min(10, s)) for s in states]
        assert all(c[0] == 0 and c[-1] > 0 for c in curves)


class ConditionEcho(nn.Module):
    """A conditioned F that answers with its condition channel (checks which slice's condition it got)."""

    def forward(self, inputs, noise_level=None):
        assert inputs.shape[1] == 2
        return inputs[:, 1:]


def test_a_conditioned_denoiser_gets_each_slice_its_own_condition_in_every_batch_order():
    schedule = DiffusionSchedule()
    rng = np.random.default_rng(2)
    noisy = rng.normal(size=(7, 6, 6)).astype(np.float32)
    condition = np.tanh(rng.normal(size=(7, 6, 6))).astype(np.float32)
    states = np.array([300, 5, 40, 300, 120, 7, 60])  # sorting by state reorders the slices
    items = np.array([6, 0, 3, 4])
    for flips in (False, True):
        out, _ = denoise_slices(ConditionEcho(), noisy, states, schedule, items=items, sampler="ddim", steps=3,
                                flips=flips, batch_size=3, device=torch.device("cpu"),
                                randomness=Randomness.seeded(0, torch.device("cpu")),
                                condition=lambda rows: torch.as_tensor(condition[rows])[:, None])
        np.testing.assert_array_equal(out, condition[items])


class FixedWeights(nn.Module):
    """An F whose answer depends on the orientation of its input: it multiplies each pixel by a fixed,
    asymmetric weight."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, inputs, noise_level=None):
        return inputs * self.weights


def test_flips_average_f_over_the_four_flips_of_each_slice():
    rng = np.random.default_rng(3)
    noisy = rng.uniform(-0.6, 0.6, size=(3, 4, 5)).astype(np.float32)  # inside F's clamp, [-1, 1]
    weights = torch.as_tensor(rng.uniform(0.5, 1.5, size=(4, 5)).astype(np.float32))
    # one ddim step returns F's prediction itself: each flip's answer flipped back, averaged
    symmetrised = (weights + weights.flip(-1) + weights.flip(-2) + weights.flip([-2, -1])).numpy() / 4
    for flips, expected in ((False, noisy * weights.numpy()), (True, noisy * symmetrised)):
        out, _ = denoise_slices(FixedWeights(weights), noisy, np.array([50, 120, 300]), DiffusionSchedule(),
                                sampler="ddim", steps=1, flips=flips, batch_size=2, device=torch.device("cpu"),
                                randomness=Randomness.seeded(0, torch.device("cpu")))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
