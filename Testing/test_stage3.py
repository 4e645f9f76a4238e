"""Stage III's training inputs: the paper's F and the conditioned F."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddm2.schedule import DiffusionSchedule
from ddm2.stage1 import SliceSampler
from ddm2.stage3 import held_out_squared_error_sum, stage3_batch_loss, target_error, training_error
from ddm2.training import Randomness

FLIPS = ([], [-1], [-2], [-2, -1])


class Recorder(nn.Module):
    """Keeps the inputs F was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs, self.levels = None, None
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, inputs, noise_level=None):
        self.inputs, self.levels = inputs, noise_level
        return inputs[:, :1] * self.weight


def shell(seed: int = 0):
    rng = np.random.default_rng(seed)
    noisy = torch.as_tensor(rng.normal(size=(3, 2, 8, 8)), dtype=torch.float32)
    estimate = torch.as_tensor(rng.normal(size=(3, 2, 8, 8)), dtype=torch.float32)
    second = torch.as_tensor(rng.normal(size=(3, 2, 8, 8)), dtype=torch.float32)
    states = torch.full((3, 2), 200)
    return noisy, estimate, second, states


def test_the_papers_f_sees_only_the_state_built_from_stage1s_estimate():
    noisy, estimate, _, states = shell()
    model = Recorder()
    loss = stage3_batch_loss(model, SliceSampler(noisy, 4), estimate, states, DiffusionSchedule())
    loss(Randomness.seeded(0, torch.device("cpu")))
    assert model.inputs.shape == (4, 1, 8, 8)


def test_the_conditioned_f_sees_stage1s_estimate_beside_a_state_built_from_the_independent_one():
    noisy, estimate, second, states = shell()
    schedule = DiffusionSchedule()
    model = Recorder()
    loss = stage3_batch_loss(model, SliceSampler(noisy, 6), estimate, states, schedule,
                             lambda volumes, slices: second[volumes, slices][:, None])
    loss(Randomness.seeded(3, torch.device("cpu")))
    assert model.inputs.shape == (6, 2, 8, 8)
    a_m = schedule.sqrt_alpha_bar[200]
    sigma_m = np.sqrt(1 - a_m ** 2)
    for state, condition, c in zip(model.inputs[:, 0], model.inputs[:, 1], model.levels.numpy()):
        # which slice and which flip: the condition channel is that slice's Stage I estimate, flipped
        (v, z, dims), = [(v, z, dims) for v in range(3) for z in range(2) for dims in FLIPS
                         if torch.equal(condition, estimate[v, z].flip(dims) if dims else estimate[v, z])]
        x, y_b = (t[v, z].flip(dims) if dims else t[v, z] for t in (noisy, second))
        residual = (x - a_m * y_b) / sigma_m  # the noise of x around the *independent* estimate ...
        mean = residual.mean()
        base = y_b + mean * sigma_m / a_m  # ... mean corrected (Eq. 4)
        shuffled = (state - c * base) / np.sqrt(1 - c ** 2)  # ... and shuffled into the state
        np.testing.assert_allclose(np.sort(shuffled.flatten().numpy()), np.sort((residual - mean).flatten().numpy()),
                                   atol=1e-4)


def test_a_guided_f_sees_the_guides_slice_beside_a_state_built_from_stage1s_estimate():
    noisy, estimate, _, states = shell()
    guide = torch.as_tensor(np.random.default_rng(5).normal(size=(2, 8, 8)), dtype=torch.float32)  # (Z, H, W)
    schedule = DiffusionSchedule()
    model = Recorder()
    loss = stage3_batch_loss(model, SliceSampler(noisy, 6), estimate, states, schedule, guide=guide)
    loss(Randomness.seeded(3, torch.device("cpu")))
    assert model.inputs.shape == (6, 2, 8, 8)
    a_m = schedule.sqrt_alpha_bar[200]
    sigma_m = np.sqrt(1 - a_m ** 2)
    for state, condition, c in zip(model.inputs[:, 0], model.inputs[:, 1], model.levels.numpy()):
        (z, dims), = [(z, dims) for z in range(2) for dims in FLIPS
                      if torch.equal(condition, guide[z].flip(dims) if dims else guide[z])]
        # the state is built from this slice's own Stage I estimate, in one of the three volumes, same flip
        matches = []
        for v in range(3):
            x, y_b = (t[v, z].flip(dims) if dims else t[v, z] for t in (noisy, estimate))
            residual = (x - a_m * y_b) / sigma_m
            mean = residual.mean()
            shuffled = (state - c * (y_b + mean * sigma_m / a_m)) / np.sqrt(1 - c ** 2)
            matches.append(np.allclose(np.sort(shuffled.flatten().numpy()),
                                       np.sort((residual - mean).flatten().numpy()), atol=1e-4))
        assert sum(matches) == 1


def test_the_held_out_error_of_f_is_taken_at_the_matched_state_with_the_same_shuffles_at_every_call():
    noisy, estimate, second, _ = shell()
    states = torch.as_tensor([[50, 120], [200, 260], [300, 340]])
    schedule = DiffusionSchedule()
    items = np.array([1, 2, 5])  # (volume, slice) = (0, 1), (1, 0), (2, 1)
    zero = Recorder()  # its weight is 0: it predicts zeros
    total = held_out_squared_error_sum(zero, noisy, estimate, states, schedule, items, 2, seed=0)
    expected = sum(float(torch.mean(noisy[v, z] ** 2)) for v, z in ((0, 1), (1, 0), (2, 1)))
    assert np.isclose(total, expected, rtol=1e-6)
    assert zero.inputs.shape == (1, 1, 8, 8) and np.allclose(zero.levels.numpy(), schedule.sqrt_alpha_bar[340])

    identity = Recorder()  # returns its state: the error depends on the shuffled noise in it
    with torch.no_grad():
        identity.weight.fill_(1.0)
    errors = [held_out_squared_error_sum(identity, noisy, estimate, states, schedule, items, 2, seed=seed,
                                         independent_estimate=lambda v, z: second[v, z][:, None])
              for seed in (0, 0, 1)]
    assert identity.inputs.shape == (1, 2, 8, 8)  # the conditioned F: the state and Stage I's estimate
    assert errors[0] == errors[1] and errors[0] != errors[2]


def best_answer(noisy: torch.Tensor, reference: torch.Tensor, sigma: torch.Tensor | None, upper: float) -> float:
    """The one value in [0, upper] that F would answer for every noisy sample, in units of the volume's
    maximum: the minimiser of the mean target error (unimodal there in both targets)."""
    from scipy.optimize import minimize_scalar

    def mean_error(value: float) -> float:
        answer = torch.full_like(noisy, 2 * value - 1)
        return float(torch.mean(target_error(answer, noisy, reference, sigma)))

    return float(minimize_scalar(mean_error, bounds=(0.0, upper), method="bounded",
                                 options={"xatol": 1e-7}).x)


def test_the_signal_target_is_learned_as_the_signal_where_the_noisy_slices_mean_lies_above_it():
    """Rician samples M of a signal nu: the paper's target leads F to their mean (sigma sqrt(pi / 2) at
    nu = 0), the signal target to nu itself, at every signal-to-noise ratio."""
    sigma = 0.04
    rng = np.random.default_rng(0)
    for nu in (0.0, 0.5 * sigma, sigma, 3 * sigma, 10 * sigma):
        magnitude = np.abs(nu + sigma * (rng.normal(size=400_000) + 1j * rng.normal(size=400_000)))
        noisy = torch.as_tensor(2 * magnitude - 1, dtype=torch.float64)[:, None, None, None]
        reference = torch.full_like(noisy, 2 * nu - 1)  # Stage I's estimate: only scales the error
        signal = best_answer(noisy, reference, torch.full((len(noisy),), sigma, dtype=torch.float64), nu + 5 * sigma)
        mean = best_answer(noisy, reference, None, nu + 5 * sigma)
        assert abs(signal - nu) < 0.06 * sigma, nu
        assert mean == pytest.approx(magnitude.mean(), abs=1e-3 * sigma), nu
    assert mean > nu + 0.04 * sigma  # still above at nu = 10 sigma (bias sigma^2 / (2 nu) = 0.05 sigma)


def gradient_descent_answer(loss, noisy: torch.Tensor, reference: torch.Tensor, steps: int,
                            step_size: float) -> tuple[float, float]:
    """(F's answer in units of the maximum, the first step's gradient) after plain gradient descent on
    one output value shared by every sample, started at 0.5 (a network's output 0 at initialisation)."""
    output = torch.zeros((), dtype=torch.float64, requires_grad=True)
    first = None
    for _ in range(steps):
        value = torch.mean(loss(output.expand(noisy.shape), noisy, reference))
        (gradient,) = torch.autograd.grad(value, output)
        first = float(gradient) if first is None else first
        with torch.no_grad():
            output -= step_size * gradient
    return (float(output.detach()) + 1) / 2, first


def test_the_signal_targets_training_loss_reaches_the_signal_from_far_off_with_the_papers_step_size():
    """From F's first answer (0.5 of the maximum), far above a dark signal: gradient descent on the
    training loss reaches nu at the step size that suits the paper's loss, at every signal-to-noise
    ratio, its first gradient no larger than the paper's. The loss whose value the held-out criterion
    takes (target_error) has a first gradient more than 40 times the paper's in the background (87)."""
    sigma = 0.04
    rng = np.random.default_rng(1)
    for nu in (0.0, sigma, 3 * sigma, 10 * sigma):
        magnitude = np.abs(nu + sigma * (rng.normal(size=200_000) + 1j * rng.normal(size=200_000)))
        noisy = torch.as_tensor(2 * magnitude - 1, dtype=torch.float64)[:, None, None, None]
        reference = torch.full_like(noisy, 2 * max(nu, sigma) - 1)
        levels = torch.full((len(noisy),), sigma, dtype=torch.float64)
        signal, first = gradient_descent_answer(lambda o, x, r: training_error(o, x, r, levels), noisy, reference,
                                                steps=300, step_size=0.1)
        mean, paper_first = gradient_descent_answer(lambda o, x, r: training_error(o, x, r, None), noisy, reference,
                                                    steps=300, step_size=0.1)
        assert abs(signal - nu) < 0.1 * sigma, nu  # at nu = 0, the samples' error is about 0.07 sigma
        assert mean == pytest.approx(magnitude.mean(), abs=0.01 * sigma), nu
        assert 0.3 * paper_first < first <= paper_first, nu
    background = torch.as_tensor(2 * np.abs(sigma * (rng.normal(size=1000) + 1j * rng.normal(size=1000))) - 1,
                                 dtype=torch.float64)[:, None, None, None]
    reference = torch.full_like(background, 2 * sigma - 1)
    _, held_out_first = gradient_descent_answer(lambda o, x, r: target_error(o, x, r, levels[:1000]), background,
                                                reference, steps=1, step_size=0.0)
    _, paper_first = gradient_descent_answer(lambda o, x, r: training_error(o, x, r, None), background, reference,
                                             steps=1, step_size=0.0)
    assert held_out_first > 40 * paper_first
