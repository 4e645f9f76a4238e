"""Stage I: the J-invariant noise model (paper section 3.2).

A U-Net learns to predict slice z of volume v from slice z of n other volumes of the same shell. The
target volume's own noise never enters the input, so the best prediction of the noisy target is its
clean signal (Noise2Self's J-invariance); the training target is the raw noisy slice.

With gradient conditioning (our default) the network is also told the gradient encodings of the
target and of the neighbours (``ddm2.data.gradient_features``) and the neighbours are the closest in
angle. Without it (``method='paper'``), the neighbours are the adjacent volumes and the network has to
guess which direction it predicts, which averages the anisotropy away.

Through-plane context (``context`` = 1, our default): the input also holds slices z - 1 and z + 1 of
each neighbour and of the target volume itself. Those carry the target direction's own contrast, and
their noise is independent of slice z's, so the prediction stays J-invariant. Edge slices are mirrored
(slice -1 is slice 1), which never lands on z itself; wider context would, so K is at most 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddm2.training import Randomness, autocast


class SliceSampler:
    """Draws random (volume, slice) training samples of one shell, flipped jointly at random; from
    every slice, or only from ``items`` (flat indices volume * Z + slice)."""

    def __init__(self, slices: torch.Tensor, batch_size: int, items: np.ndarray | None = None) -> None:
        self.slices = slices  # (V, Z, H, W) on the compute device
        self.batch_size = batch_size
        self.items = None if items is None else torch.as_tensor(items, dtype=torch.int64)

    def draw(self, randomness: Randomness) -> tuple[torch.Tensor, torch.Tensor]:
        n_volumes, n_slices = self.slices.shape[:2]
        count = n_volumes * n_slices if self.items is None else len(self.items)
        index = torch.randint(0, count, (self.batch_size,), generator=randomness.cpu)
        if self.items is not None:
            index = self.items[index]
        volumes, slice_index = index // n_slices, index % n_slices
        return volumes.to(self.slices.device), slice_index.to(self.slices.device)


def held_out_items(n_items: int, share: float, seed: int) -> np.ndarray:
    """A fixed random ``share`` of the flat slice indices (at least one when ``share`` > 0), sorted.

    Stage I is never trained to output these slices, so its error on them, against their noisy
    values, is its error against the clean signal plus the noise variance (the noise is independent of
    its input): a held-out loss that rises when the network starts to learn its targets' noise."""
    if not 0 <= share < 1:
        raise ValueError(f"the held-out share must be in [0, 1); got {share}")
    count = min(max(1, round(share * n_items)), n_items - 1) if share > 0 else 0
    return np.sort(np.random.default_rng(seed).permutation(n_items)[:count])


def squared_error_sum(model: nn.Module, slices: torch.Tensor, neighbours: torch.Tensor,
                      conditions: torch.Tensor | None, items: np.ndarray, batch_size: int, context: int = 0,
                      guide: torch.Tensor | None = None) -> float:
    """Sum over the slices ``items`` of the mean squared error of Stage I's estimate against the noisy
    slice (0 for no items); divided by the number of slices, the held-out loss."""
    n_slices = slices.shape[1]
    total = 0.0
    for start in range(0, len(items), batch_size):
        batch = torch.as_tensor(items[start:start + batch_size], device=slices.device)
        volumes, slice_index = batch // n_slices, batch % n_slices
        estimate = estimate_batch(model, slices, neighbours, conditions, volumes, slice_index, context, guide)
        total += float(torch.sum(torch.mean((estimate[:, 0] - slices[volumes, slice_index]) ** 2, dim=(1, 2))))
    return total


def random_flips(tensors: list[torch.Tensor], randomness: Randomness) -> list[torch.Tensor]:
    """Flip every tensor (B, C, H, W) of a batch the same way (the authors' augmentation)."""
    flip_h, flip_w = torch.rand(2, generator=randomness.cpu) < 0.5
    dims = [d for d, flip in ((-2, flip_h), (-1, flip_w)) if flip]
    return [t.flip(dims) for t in tensors] if dims else tensors


def input_channels(n: int, context: int, guided: bool = False) -> int:
    """Channels of Stage I's input: n neighbours x (2K + 1) slices, plus 2K slices of the target, plus
    2K + 1 slices of the guide when there is one."""
    return (n + guided) * (2 * context + 1) + 2 * context


def usable_context(context: int, n_slices: int) -> int:
    """K in {0, 1}; a single-slice stack has no neighbours to mirror, so it gets none."""
    if context not in (0, 1):
        raise ValueError(f"context must be 0 or 1 slices; got {context}")
    return context if n_slices > 1 else 0


def _mirror(index: torch.Tensor, n_slices: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > n_slices - 1, 2 * (n_slices - 1) - index, index)


def stage1_inputs(slices: torch.Tensor, neighbours: torch.Tensor, volumes: torch.Tensor,
                  slice_index: torch.Tensor, context: int = 0, guide: torch.Tensor | None = None) -> torch.Tensor:
    """(B, input_channels(n, context, guide is not None), H, W): the neighbours' slices z - K..z + K,
    then the target volume's slices z - K, z + K (never slice z of the target; K <= 1, see
    ``usable_context``), then the guide's (Z, H, W) slices z - K..z + K."""
    n_slices = slices.shape[1]
    offsets = torch.arange(-context, context + 1, device=slices.device)
    around = _mirror(slice_index[:, None] + offsets[None, :], n_slices)  # (B, 2K + 1)
    neighbour_volumes = neighbours[volumes]  # (B, n)
    parts = [slices[neighbour_volumes[:, :, None], around[:, None, :]].flatten(1, 2)]
    if context:
        own = around[:, offsets != 0]
        parts.append(slices[volumes[:, None], own])
    if guide is not None:
        parts.append(guide[around])
    return torch.cat(parts, dim=1)


def stage1_batch_loss(model: nn.Module, sampler: SliceSampler, neighbours: torch.Tensor,
                      conditions: torch.Tensor | None, context: int = 0, guide: torch.Tensor | None = None):
    """The loss closure of one Stage I step: MSE(Phi(neighbours), noisy target)."""

    def batch_loss(randomness: Randomness) -> torch.Tensor:
        volumes, slice_index = sampler.draw(randomness)
        inputs = stage1_inputs(sampler.slices, neighbours, volumes, slice_index, context, guide)
        target = sampler.slices[volumes, slice_index][:, None]
        inputs, target = random_flips([inputs, target], randomness)
        condition = conditions[volumes] if conditions is not None else None
        return torch.mean((model(inputs, condition=condition).float() - target) ** 2)

    return batch_loss


@torch.no_grad()
def estimate_batch(model: nn.Module, slices: torch.Tensor, neighbours: torch.Tensor, conditions: torch.Tensor | None,
                   volumes: torch.Tensor, slice_index: torch.Tensor, context: int = 0,
                   guide: torch.Tensor | None = None) -> torch.Tensor:
    """Stage I's estimate (B, 1, H, W) of the slices (volumes, slice_index) from the neighbours in
    ``neighbours`` (any table of the shell: Stage III also asks for a second, disjoint one)."""
    inputs = stage1_inputs(slices, neighbours, volumes, slice_index, context, guide)
    condition = conditions[volumes] if conditions is not None else None
    with autocast(slices.device):
        return model(inputs, condition=condition).float()


@torch.no_grad()
def predict(model: nn.Module, slices: torch.Tensor, neighbours: torch.Tensor, conditions: torch.Tensor | None,
            batch_size: int, context: int = 0, items: np.ndarray | None = None,
            guide: torch.Tensor | None = None) -> np.ndarray:
    """Stage I's estimate of the slices ``items`` (flat indices volume * Z + slice; default every slice
    of the shell), (len(items), H, W) float32, computed once."""
    model.eval()
    n_volumes, n_slices = slices.shape[:2]
    index = torch.as_tensor(np.arange(n_volumes * n_slices) if items is None else items, device=slices.device)
    estimate = np.empty((len(index), *slices.shape[2:]), dtype=np.float32)
    for start in range(0, len(index), batch_size):
        batch = index[start:start + batch_size]
        output = estimate_batch(model, slices, neighbours, conditions, batch // n_slices, batch % n_slices, context,
                                guide)
        estimate[start:start + len(batch)] = output[:, 0].cpu().numpy()
    return estimate
