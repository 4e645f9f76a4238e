"""Inference: the reverse chain from each slice's matched state (paper section 3.1).

Each noisy slice x is taken as the state S_t* itself (not rescaled, no noise added, as the authors
do) and walked back to state 0; the result is F's last prediction of S_0. Two samplers:

* ``ddpm``: every state t*, t* - 1, ..., 1 with the posterior variance (the paper's sampler);
* ``ddim``: a deterministic walk over ``steps`` evenly spaced states (DDIM, eta = 0), the
  acceleration the paper points to; far fewer network evaluations.

Both are the same update with eta = 1 and eta = 0: for a step from state k to k' < k,
``S' = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z`` with ``eps = (S - sqrt(ab) x0) / sqrt(1 - ab)``
and ``s = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')``; with eta = 1 and k' = k - 1 this is
exactly DDPM's posterior q(S_k-1 | S_k, x0).

Slices are sorted by state and run many per batch; each sample follows its own state sequence. A
conditioned F (``ddm2.stage3``) gets each slice's Stage I estimate as an input channel beside the state,
and a guided F the guide's slice (the mean b0), the same at every step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ddm2.schedule import DiffusionSchedule
from ddm2.training import Randomness, autocast

SAMPLERS = ("ddpm", "ddim")


def state_sequences(states: np.ndarray, sampler: str, steps: int | None) -> np.ndarray:
    """(B, J + 1) states visited by each sample, from t* down to 0, padded with repeats at the start
    (a repeated state is a step that does nothing)."""
    states = np.asarray(states, dtype=np.int64)
    if sampler == "ddpm":
        length = int(states.max())
        j = np.arange(length + 1)[None, :]
        return np.minimum(states[:, None], length - j)
    if sampler == "ddim":
        count = max(int(steps or 1), 1)
        fractions = 1.0 - np.arange(count + 1) / count
        return np.round(states[:, None] * fractions[None, :]).astype(np.int64)
    raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")


def predict_clean(model: nn.Module, state: torch.Tensor, level: torch.Tensor, flips: bool,
                  condition: torch.Tensor | None = None) -> torch.Tensor:
    """F's prediction of S_0, optionally averaged over the four flips (the authors' test-time ensemble);
    ``condition`` (B, C, H, W): F's condition channels, after the state's."""
    inputs = state if condition is None else torch.cat([state, condition], dim=1)
    if not flips:
        return model(inputs, noise_level=level).float()
    total = torch.zeros_like(state, dtype=torch.float32)
    for dims in ([], [-1], [-2], [-2, -1]):
        flipped = inputs.flip(dims) if dims else inputs
        output = model(flipped, noise_level=level).float()
        total += output.flip(dims) if dims else output
    return total / 4


def reverse_step(state: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor,
                 eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """One step of the chain from a state with cumulative alpha ``alpha_bar`` (per sample, float64) to one
    with ``alpha_bar_next`` given the prediction ``x0`` (the module docstring's update)."""
    ab = alpha_bar[:, None, None, None]
    ab_next = alpha_bar_next[:, None, None, None]
    eps = (state - ab.sqrt().float() * x0) / (1 - ab).sqrt().float()
    sigma = eta * torch.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
    direction = torch.sqrt(torch.clamp(1 - ab_next - sigma ** 2, min=0.0))
    step = ab_next.sqrt().float() * x0 + direction.float() * eps
    if noise is not None:
        step = step + sigma.float() * noise
    return step


@torch.no_grad()
def denoise_slices(model: nn.Module, noisy: np.ndarray, states: np.ndarray, schedule: DiffusionSchedule, *,
                   items: np.ndarray | None = None, sampler: str = "ddpm", steps: int | None = None,
                   flips: bool = False, batch_size: int = 64,
                   device: torch.device, randomness: Randomness,
                   condition: Callable[[np.ndarray], torch.Tensor] | None = None,
                   on_batch: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the reverse chain on slices.

    Parameters
    ----------
    noisy : (S, H, W) slices in normalised units.
    states : (S,) matched states, all >= 1.
    items : indices of the slices to denoise (default all), in the order of the returned rows.
    condition : for a conditioned or guided F, slice indices -> its condition channels (B, C, H, W) on
        ``device`` (their Stage I estimates, the guide's slices).
    on_batch : called with (slices done, slices total) after each batch (progress, cancellation).

    Returns
    -------
    denoised : (len(items), H, W) float32.
    rmse_curves : per denoised slice, the RMSE between the input and the state after each step (appendix F),
        led by 0 for the input itself, so that a one-step chain's curve shows how far the step moved.
    """
    model.eval()
    items = np.arange(len(noisy)) if items is None else np.asarray(items)
    states = np.asarray(states, dtype=np.int64)[items]
    if states.size and states.min() < 1:
        raise ValueError("every state must be >= 1; raise state-0 matches to 1 before sampling")
    eta = 1.0 if sampler == "ddpm" else 0.0
    alpha_bar = torch.as_tensor(schedule.alpha_bar, dtype=torch.float64, device=device)
    sqrt_alpha_bar = torch.as_tensor(schedule.sqrt_alpha_bar, dtype=torch.float32, device=device)
    denoised = np.empty((len(items), *noisy.shape[1:]), dtype=np.float32)
    curves: list[np.ndarray] = [np.empty(0)] * len(items)
    order = np.argsort(states, kind="stable")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        sequences = torch.as_tensor(state_sequences(states[batch], sampler, steps), device=device)
        initial = torch.as_tensor(noisy[items[batch]], device=device)[:, None]
        current = initial.clone()
        extra = condition(items[batch]) if condition is not None else None
        clean = initial.clone()
        batch_curves = [[0.0] for _ in batch]
        for j in range(sequences.shape[1] - 1):
            k, k_next = sequences[:, j], sequences[:, j + 1]
            active = torch.nonzero(k != k_next).flatten()
            if len(active) == 0:
                continue
            k, k_next, state = k[active], k_next[active], current[active]
            with autocast(device):
                x0 = predict_clean(model, state, sqrt_alpha_bar[k], flips,
                                   None if extra is None else extra[active]).clamp(-1.0, 1.0)
            noise = torch.randn(state.shape, generator=randomness.device, device=device) if eta > 0 else None
            step = reverse_step(state, x0, alpha_bar[k], alpha_bar[k_next], eta, noise)
            current[active] = step.float()
            clean[active] = x0
            rmse = torch.sqrt(torch.mean((current[active] - initial[active]) ** 2, dim=(1, 2, 3))).cpu().numpy()
            for position, value in zip(active.cpu().numpy(), rmse):
                batch_curves[position].append(float(value))
        denoised[batch] = clean[:, 0].cpu().numpy()
        for position, index in enumerate(batch):
            curves[index] = np.asarray(batch_curves[position], dtype=np.float32)
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return denoised, curves
