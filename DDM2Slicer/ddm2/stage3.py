"""Stage III: the diffusion denoiser F (paper section 3.4).

Training inputs are built from Stage I's estimate y-bar and its residual noise:
``S = c * y_bar + sqrt(1 - c^2) * shuffle(eps)`` where eps is the residual of the noisy slice x at its
matched state t* (normalised by sqrt(1 - alpha_bar_t*), mean corrected per Eq. 4) and shuffle
permutes its pixels (noise shuffle); the target is the raw noisy slice x (J-invariance objective).
In the paper F sees only the one-channel state and the noise level c = sqrt(alpha_bar).

Conditioned F (``--stage3-condition stage1``; by default in shells of 30 or more directions): F also
sees Stage I's estimate y_bar of the slice as a second channel, so that its answer can draw on the
neighbouring volumes as well as on the slice itself. Built from y_bar too, the training state would
hold nothing that y_bar does not, and F would learn to copy the condition (Stage I again). So the
state is built instead from a second Stage I estimate y_b from a disjoint set of neighbours
(``ddm2.data.neighbour_table`` ring 1): the noise of its inputs is independent of y_bar's, as the
noisy slice's is at inference, and F learns to weigh the two. (Stage I's own bias, which dominates
its error, is shared by both estimates; bench/RESULTS.md measures it.)

Our choice where the authors' code and the paper leave it open: the training state t of each sample
is drawn from 1..t* of that slice (the states inference visits), not from the whole chain; the
continuous level c is uniform between the chain values of t - 1 and t, as in SR3. Measured against
the whole chain and against t* alone, 1..t* scored best (bench/RESULTS.md, fourth session).

Signal target (``--target signal``): for Rician noise the mean of the noisy slice lies above the
signal nu, by sigma sqrt(pi / 2) where nu = 0, so an F trained against the noisy slice learns that
bias. Trained instead against m^2 - 2 sigma^2 (m: the noisy magnitude), whose mean is nu^2 whatever
nu is, F estimates the signal itself (``target_error``); sigma is the scan's (``ddm2.noise``). F is
trained on a loss with the same minimiser and the gradient of a damped Newton step (``training_error``),
since the error of s |s| itself trains F first on the background and then too slowly.

Like Stage I, F can learn its targets' noise on a small scan (6 directions: 48 target slices). The
pipeline holds Stage I's held-out slices out of Stage III as well and keeps the step of lowest
``held_out_squared_error_sum``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ddm2.schedule import DiffusionSchedule
from ddm2.stage1 import SliceSampler, random_flips
from ddm2.training import Randomness, autocast


def shuffle_pixels(noise: torch.Tensor, randomness: Randomness) -> torch.Tensor:
    """Permute the pixels of each sample (B, 1, H, W) independently."""
    b = noise.shape[0]
    flat = noise.reshape(b, -1)
    keys = torch.rand(flat.shape, generator=randomness.device, device=noise.device)
    return torch.gather(flat, 1, keys.argsort(dim=1)).reshape(noise.shape)


def stage3_batch_loss(model: nn.Module, sampler: SliceSampler, estimate: torch.Tensor, states: torch.Tensor,
                      schedule: DiffusionSchedule,
                      independent_estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      sigma: torch.Tensor | None = None, guide: torch.Tensor | None = None):
    """The loss closure of one Stage III step.

    Parameters
    ----------
    sampler : draws (volume, slice) pairs of the noisy shell slices (V, Z, H, W).
    estimate : Stage I's estimate of every slice (V, Z, H, W), fixed.
    states : matched state t* of every slice (V, Z), int64, all >= 1.
    independent_estimate : for a conditioned F, (volumes, slice_index) -> (B, 1, H, W) Stage I estimate
        from the disjoint neighbours; the state is built from it and ``estimate`` is F's second channel.
    sigma : (V,) noise level of each volume in units of its maximum, for the signal target
        (``target_error``); None: the noisy slice is the target, as in the paper.
    guide : (Z, H, W) slices whose noise is independent of every target's (the mean b0,
        ``ddm2.data.b0_guide_slices``): slice z is F's last channel.
    """
    sqrt_alpha_bar = torch.as_tensor(schedule.sqrt_alpha_bar, dtype=torch.float32, device=estimate.device)

    def batch_loss(randomness: Randomness) -> torch.Tensor:
        volumes, slice_index = sampler.draw(randomness)
        noisy, y_bar, condition = slice_triplet(sampler.slices, estimate, volumes, slice_index, independent_estimate,
                                                guide)
        if condition is None:
            noisy, y_bar = random_flips([noisy, y_bar], randomness)
        else:
            noisy, y_bar, condition = random_flips([noisy, y_bar, condition], randomness)
        inputs, level = training_inputs(noisy, y_bar, condition, states[volumes, slice_index], sqrt_alpha_bar,
                                        randomness)
        output = model(inputs, noise_level=level).float()
        return torch.mean(training_error(output, noisy, y_bar, None if sigma is None else sigma[volumes]))

    return batch_loss


def target_error(output: torch.Tensor, noisy: torch.Tensor, reference: torch.Tensor,
                 sigma: torch.Tensor | None) -> torch.Tensor:
    """F's squared error per pixel (B, 1, H, W) against its target, in normalised units.

    sigma None: the target is the noisy slice (the paper), and F learns the mean of the noisy data.
    sigma (B,): each sample's noise level in units of its volume's maximum. With m = (x + 1) / 2 the
    noisy slice and s = (o + 1) / 2 F's answer in those units, the error is that of s |s| against
    m^2 - 2 sigma^2, whose mean is the squared signal nu^2, so F learns to answer the signal nu. It is
    divided by max(r, sigma)^2, r = (reference + 1) / 2 being Stage I's estimate, which does not depend
    on the target's noise: about 4 (s - nu)^2, as the paper's error is 4 (s - m)^2 in these units,
    and not weighted towards bright pixels as an error of squares would be.
    """
    if sigma is None:
        return (output - noisy) ** 2
    answer, squared_signal, level = signal_target_terms(output, noisy, sigma)
    scale = torch.maximum((reference + 1) / 2, level)
    return ((answer * answer.abs() - squared_signal) / scale) ** 2


def training_error(output: torch.Tensor, noisy: torch.Tensor, reference: torch.Tensor,
                   sigma: torch.Tensor | None) -> torch.Tensor:
    """The per-pixel loss F is trained on: ``target_error`` for the paper's target; for the signal
    target, a loss with the same minimiser whose gradient is a damped Newton step on s |s| = target.

    The gradient of ``target_error`` itself grows with the cube of F's answer where the signal is
    small (its error is divided by Stage I's estimate, about sigma there): F's first answers, far off
    in the background, made its first losses 60 to 400 times the mean target's on a real scan, and F
    spent its early steps on the background and over-smoothed (bench/RESULTS.md, eighth session).
    Here the error s |s| - target is divided by w = max(|s|, r, sigma), taken as a constant
    (detached): the loss's gradient in s is 4 (s |s| - target) / w, which is about 8 (s - nu) near the
    answer, as the paper's is 8 (s - m), and about 4 s when F is far above a dark target, half the
    paper's. Since w does not depend on the target's noise, the mean gradient vanishes where s |s| is
    the target's mean, nu^2, as with ``target_error``.
    """
    if sigma is None:
        return (output - noisy) ** 2
    answer, squared_signal, level = signal_target_terms(output, noisy, sigma)
    current = answer.detach()
    slope = torch.maximum(torch.maximum(current.abs(), (reference + 1) / 2), level)
    return (2 * (answer - current) + (current * current.abs() - squared_signal) / slope) ** 2


def signal_target_terms(output: torch.Tensor, noisy: torch.Tensor,
                        sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F's answer s, the target m^2 - 2 sigma^2, sigma as (B, 1, 1, 1)), in units of the volume's maximum."""
    level = sigma.to(output.dtype)[:, None, None, None]
    return (output + 1) / 2, ((noisy + 1) / 2) ** 2 - 2 * level ** 2, level


def slice_triplet(slices: torch.Tensor, estimate: torch.Tensor, volumes: torch.Tensor, slice_index: torch.Tensor,
                  independent_estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                  guide: torch.Tensor | None = None):
    """(noisy slice, the estimate its state is built from, each (B, 1, H, W); F's condition (B, C, H, W)
    or None): conditioned on Stage I, the state comes from the independent estimate and the estimate
    is a condition channel; the guide's slice, if any, is the last."""
    noisy = slices[volumes, slice_index][:, None]
    y_bar = estimate[volumes, slice_index][:, None]
    condition = []
    if independent_estimate is not None:
        condition.append(y_bar)
        y_bar = independent_estimate(volumes, slice_index)
    if guide is not None:
        condition.append(guide[slice_index][:, None])
    return noisy, y_bar, torch.cat(condition, dim=1) if condition else None


def training_inputs(noisy: torch.Tensor, y_bar: torch.Tensor, condition: torch.Tensor | None,
                    matched: torch.Tensor, sqrt_alpha_bar: torch.Tensor, randomness: Randomness,
                    at_matched_state: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """F's input (the state, and the condition as a second channel) and noise level for noisy slices
    (B, 1, H, W) matched to states ``matched``: at a state drawn from 1..t*, or at t* itself."""
    a_m = sqrt_alpha_bar[matched][:, None, None, None]
    sigma_m = torch.sqrt(1 - a_m ** 2)
    eps = (noisy - a_m * y_bar) / sigma_m
    mean = eps.mean(dim=(1, 2, 3), keepdim=True)  # Eq. 4: the residual gets zero mean ...
    eps = eps - mean
    y_bar = y_bar + mean * sigma_m / a_m  # ... and y_bar absorbs it, so x = a y_bar + sigma eps holds
    if at_matched_state:
        level = sqrt_alpha_bar[matched]
    else:
        u = torch.rand(len(matched), generator=randomness.device, device=matched.device)
        t = 1 + torch.floor(u * matched.float()).long().clamp(max=matched - 1)  # uniform in 1..t*
        v = torch.rand(len(matched), generator=randomness.device, device=matched.device)
        level = sqrt_alpha_bar[t] + v * (sqrt_alpha_bar[t - 1] - sqrt_alpha_bar[t])
    c = level[:, None, None, None]
    state = c * y_bar + torch.sqrt(1 - c ** 2) * shuffle_pixels(eps, randomness)
    return (state if condition is None else torch.cat([state, condition], dim=1)), level


@torch.no_grad()
def held_out_squared_error_sum(model: nn.Module, slices: torch.Tensor, estimate: torch.Tensor, states: torch.Tensor,
                               schedule: DiffusionSchedule, items: np.ndarray, batch_size: int, seed: int,
                               independent_estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                               sigma: torch.Tensor | None = None, guide: torch.Tensor | None = None) -> float:
    """Sum over the slices ``items`` of F's mean error against its target (``target_error``), from a training
    input at the slice's matched state t* (where inference starts) with pixel shuffles drawn from
    ``seed`` (the same at every call, so that calls during training compare). On slices F never
    trained on, it rises when F starts to learn its targets' noise."""
    sqrt_alpha_bar = torch.as_tensor(schedule.sqrt_alpha_bar, dtype=torch.float32, device=slices.device)
    randomness = Randomness.seeded(seed, slices.device)
    n_slices = slices.shape[1]
    total = 0.0
    for start in range(0, len(items), batch_size):
        batch = torch.as_tensor(items[start:start + batch_size], device=slices.device)
        volumes, slice_index = batch // n_slices, batch % n_slices
        noisy, y_bar, condition = slice_triplet(slices, estimate, volumes, slice_index, independent_estimate, guide)
        inputs, level = training_inputs(noisy, y_bar, condition, states[volumes, slice_index], sqrt_alpha_bar,
                                        randomness, at_matched_state=True)
        with autocast(slices.device):
            output = model(inputs, noise_level=level).float()
        error = target_error(output, noisy, y_bar, None if sigma is None else sigma[volumes])
        total += float(torch.sum(torch.mean(error, dim=(1, 2, 3))))
    return total
