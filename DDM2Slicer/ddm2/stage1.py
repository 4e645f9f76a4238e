"""Stage I: the J-invariant noise model (paper section 3.2).

A U-Net learns to predict slice z of volume v from slice z of n other volumes of the same shell. The
target volume's own noise never enters the input, so the best prediction of the noisy target is its
clean signal (Noise2Self's J-invariance); the training target is the raw noisy slice.

With gradient conditioning (our default) the network is also told the gradient encodings of the
target and of the neighbours (``ddm2.data.gradient_features``) and the neighbours are the closest in
angle. Without it (``method='paper'``), the neighbours are the adjacent volumes and the network has to
guess which direction it predicts, which averages the anisotropy away.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddm2.training import Randomness, autocast


class SliceSampler:
    """Draws random (volume, slice) training samples of one shell, flipped jointly at random."""

    def __init__(self, slices: torch.Tensor, batch_size: int) -> None:
        self.slices = slices  # (V, Z, H, W) on the compute device
        self.batch_size = batch_size

    def draw(self, randomness: Randomness) -> tuple[torch.Tensor, torch.Tensor]:
        n_volumes, n_slices = self.slices.shape[:2]
        index = torch.randint(0, n_volumes * n_slices, (self.batch_size,), generator=randomness.cpu)
        volumes, slice_index = index // n_slices, index % n_slices
        return volumes.to(self.slices.device), slice_index.to(self.slices.device)


def random_flips(tensors: list[torch.Tensor], randomness: Randomness) -> list[torch.Tensor]:
    """Flip every tensor (B, C, H, W) of a batch the same way (the authors' augmentation)."""
    flip_h, flip_w = torch.rand(2, generator=randomness.cpu) < 0.5
    dims = [d for d, flip in ((-2, flip_h), (-1, flip_w)) if flip]
    return [t.flip(dims) for t in tensors] if dims else tensors


def stage1_inputs(slices: torch.Tensor, neighbours: torch.Tensor, volumes: torch.Tensor,
                  slice_index: torch.Tensor) -> torch.Tensor:
    """(B, n, H, W): slice ``slice_index`` of each target volume's neighbours."""
    neighbour_volumes = neighbours[volumes]  # (B, n)
    return slices[neighbour_volumes, slice_index[:, None]]


def stage1_batch_loss(model: nn.Module, sampler: SliceSampler, neighbours: torch.Tensor,
                      conditions: torch.Tensor | None):
    """The loss closure of one Stage I step: MSE(Phi(neighbours), noisy target)."""

    def batch_loss(randomness: Randomness) -> torch.Tensor:
        volumes, slice_index = sampler.draw(randomness)
        inputs = stage1_inputs(sampler.slices, neighbours, volumes, slice_index)
        target = sampler.slices[volumes, slice_index][:, None]
        inputs, target = random_flips([inputs, target], randomness)
        condition = conditions[volumes] if conditions is not None else None
        return torch.mean((model(inputs, condition=condition).float() - target) ** 2)

    return batch_loss


@torch.no_grad()
def predict(model: nn.Module, slices: torch.Tensor, neighbours: torch.Tensor, conditions: torch.Tensor | None,
            batch_size: int, device: torch.device) -> np.ndarray:
    """Stage I's estimate of every slice of the shell, (V, Z, H, W) float32, computed once."""
    model.eval()
    n_volumes, n_slices = slices.shape[:2]
    estimate = np.empty(tuple(slices.shape), dtype=np.float32)
    index = torch.arange(n_volumes * n_slices, device=slices.device)
    for start in range(0, len(index), batch_size):
        batch = index[start:start + batch_size]
        volumes, slice_index = batch // n_slices, batch % n_slices
        inputs = stage1_inputs(slices, neighbours, volumes, slice_index)
        condition = conditions[volumes] if conditions is not None else None
        with autocast(device):
            output = model(inputs, condition=condition).float()
        estimate[volumes.cpu().numpy(), slice_index.cpu().numpy()] = output[:, 0].cpu().numpy()
    return estimate
