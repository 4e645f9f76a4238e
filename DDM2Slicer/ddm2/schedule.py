"""The diffusion Markov chain of DDM2: the reverse warm-up schedule, its tables and Stage II.

Index convention (used everywhere in ddm2): **state k = "k diffusion steps applied"**, k = 0 is
clean and k = T the last state. ``sqrt_alpha_bar[k]`` has T + 1 entries with ``sqrt_alpha_bar[0] = 1``;
``betas[k]`` is the variance added by step k (``betas[0] = 0``). A noisy slice matched to state t*
is treated as a sample of S_t* = sqrt(alpha_bar_t*) y + sqrt(1 - alpha_bar_t*) z.
"""

from __future__ import annotations

import numpy as np

T_STEPS = 1000


def reverse_warmup_betas(n_steps: int = T_STEPS, beta_start: float = 5e-5, beta_end: float = 1e-2,
                         ramp_fraction: float = 0.7) -> np.ndarray:
    """The paper's reverse warm-up: beta flat at ``beta_start``, then a linear ramp over the last
    ``ramp_fraction`` of the steps up to ``beta_end`` (Appendix D; the authors' ``rev_warmup70``).

    Returns betas for steps 1..n_steps (length n_steps, float64).
    """
    betas = np.full(n_steps, beta_start, dtype=np.float64)
    ramp = int(n_steps * ramp_fraction)
    betas[n_steps - ramp:] = np.linspace(beta_start, beta_end, ramp, dtype=np.float64)
    return betas


class DiffusionSchedule:
    """Every table of the chain, computed once in float64 (states 0..T)."""

    def __init__(self, betas: np.ndarray | None = None) -> None:
        step_betas = reverse_warmup_betas() if betas is None else np.asarray(betas, dtype=np.float64)
        self.betas = np.concatenate([[0.0], step_betas])
        self.alphas = 1.0 - self.betas
        self.alpha_bar = np.cumprod(self.alphas)
        self.sqrt_alpha_bar = np.sqrt(self.alpha_bar)
        self.noise_std = np.sqrt(1.0 - self.alpha_bar)  # std of the noise at state k

    # ------------------------------------------------------------------------------- Stage II
    def match_states(self, noisy: np.ndarray, estimate: np.ndarray) -> np.ndarray:
        """Stage II: the Markov-chain state of each slice (paper section 3.3, Eq. 4 and 5).

        For every candidate state k the residual ``noisy - sqrt_alpha_bar[k] * estimate`` is mean
        corrected (Eq. 4) and a zero-mean Gaussian is fitted to it over the whole slice (maximum
        likelihood: the population standard deviation). The state is the first local minimum, scanning
        k = 0, 1, ..., of ``|noise_std[k] - sigma_k|`` (Eq. 5 with the chain's own noise level, as the
        authors' code does).

        Parameters
        ----------
        noisy, estimate : (S, H, W) arrays of slices in the model's normalised units; ``estimate`` is
            Stage I's prediction of each noisy slice.

        Returns
        -------
        (S,) int array of states in 0..T. State 0 means no noise was found (an empty slice, or Stage I
        failed); the reverse chain needs at least one step, so callers raise it to 1 and report it.
        """
        if np.shape(noisy) != np.shape(estimate):
            raise ValueError(f"noisy {np.shape(noisy)} and estimate {np.shape(estimate)} differ in shape")
        # The residual's variance is quadratic in the scale a = sqrt_alpha_bar[k], so every candidate
        # state is evaluated from three moments instead of one pass over the pixels per state.
        var_noisy, var_estimate, covariance = slice_moments(noisy, estimate)
        scale = self.sqrt_alpha_bar[None, :]
        variance = var_noisy[:, None] - 2 * scale * covariance[:, None] + scale ** 2 * var_estimate[:, None]
        distance = np.abs(self.noise_std[None, :] - np.sqrt(np.clip(variance, 0.0, None)))
        return first_local_minimum(distance)


def slice_moments(noisy: np.ndarray, estimate: np.ndarray,
                  chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice of (S, H, W) pairs: the variances of both and their covariance (population, float64).
    Computed ``chunk`` slices at a time: a shell of a large scan is gigabytes in float64."""
    moments = np.empty((3, len(noisy)))
    for start in range(0, len(noisy), chunk):
        part = slice(start, start + chunk)
        x = np.array(noisy[part], dtype=np.float64).reshape(-1, np.prod(np.shape(noisy)[1:], dtype=int))
        y = np.array(estimate[part], dtype=np.float64).reshape(x.shape)  # copies: centred in place below
        x -= x.mean(axis=1, keepdims=True)
        y -= y.mean(axis=1, keepdims=True)
        moments[:, part] = (x ** 2).mean(axis=1), (y ** 2).mean(axis=1), (x * y).mean(axis=1)
    return moments[0], moments[1], moments[2]


def first_local_minimum(distance: np.ndarray) -> np.ndarray:
    """Index of the first local minimum of each row, scanning from index 0.

    The scan stops at the first index whose value exceeds the previous one; the answer is the first
    position of the smallest value seen before it (the authors' early-stopping linear search).
    """
    distance = np.asarray(distance)
    rises = np.diff(distance, axis=1) > 0
    # first k >= 1 with d[k] > d[k-1]; rows that never rise scan the whole chain
    stop = np.where(rises.any(axis=1), rises.argmax(axis=1) + 1, distance.shape[1])
    columns = np.arange(distance.shape[1])[None, :]
    seen = np.where(columns < stop[:, None], distance, np.inf)
    return seen.argmin(axis=1)
