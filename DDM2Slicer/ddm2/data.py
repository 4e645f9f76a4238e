"""Normalisation, shells, neighbour volumes and gradient encodings: what the stages are fed.

Slices are axial: slice z of volume v is ``data[:, :, z, v]``. Inside the stages a shell is held as
an array of shape (V, Z, H, W) = (volumes, slices, x, y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddm2.dwi import B0_THRESHOLD

SHELL_TOLERANCE = 100.0  # s/mm^2: b-values closer than this belong to one shell


# ----------------------------------------------------------------------------------- normalisation

def normalise_volumes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map each volume to [-1, 1] by its own maximum, as the authors do: u = 2 v / max - 1.

    Parameters
    ----------
    data : (X, Y, Z, N) array, non-negative magnitudes.

    Returns
    -------
    normalised : float32 array of the same shape.
    scales : (N,) float64 maxima (1 for an all-zero volume), the argument of ``denormalise_volumes``.
    """
    data = np.asarray(data)
    scales = volume_scales(data)
    return (2.0 * data / scales - 1.0).astype(np.float32), scales


def volume_scales(data: np.ndarray) -> np.ndarray:
    """(N,) float64 maximum of each volume of (X, Y, Z, N) data, 1 for an all-zero volume."""
    scales = np.asarray(data).reshape(-1, data.shape[-1]).max(axis=0).astype(np.float64)
    scales[scales <= 0] = 1.0
    return scales


def denormalise_volumes(normalised: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The exact inverse of ``normalise_volumes``: back to the input's intensity units (float32)."""
    return ((np.asarray(normalised, dtype=np.float64) + 1.0) * 0.5 * np.asarray(scales)).astype(np.float32)


# ------------------------------------------------------------------------------------------ shells

@dataclass(frozen=True)
class Shell:
    """Volumes denoised together by one set of models."""

    name: str  # "b0", "b1000", ...
    b_value: float
    indices: tuple[int, ...]  # volume indices in the input's order

    @property
    def is_b0(self) -> bool:
        return self.b_value <= B0_THRESHOLD


def group_shells(bvals: np.ndarray, tolerance: float = SHELL_TOLERANCE) -> list[Shell]:
    """Group volumes into the b = 0 set and shells of similar b-value, in ascending b."""
    bvals = np.asarray(bvals, dtype=np.float64)
    order = np.argsort(bvals, kind="stable")
    groups: list[list[int]] = []
    for index in order:
        b = bvals[index]
        same_as_last = groups and (b <= B0_THRESHOLD) == (bvals[groups[-1][0]] <= B0_THRESHOLD) and \
            b - bvals[groups[-1][-1]] <= tolerance
        if same_as_last:
            groups[-1].append(int(index))
        else:
            groups.append([int(index)])
    shells = []
    for members in groups:
        b = float(np.round(np.median(bvals[members])))
        name = "b0" if b <= B0_THRESHOLD else f"b{int(round(b, -1)) if b >= 100 else int(b)}"
        shells.append(Shell(name, b, tuple(sorted(members))))
    return shells


# ---------------------------------------------------------------------------------- neighbours

def adjacent_neighbours(n_volumes: int, n: int, ring: int = 0) -> np.ndarray:
    """The authors' neighbours: volumes v-p..v-1, v+1..v+p in acquisition order, wrapping around
    (one more on the left when n is odd, so n = 1 is volume v - 1). Ring 1 is the next n out on each
    side (v-2p..v-p-1, v+p+1..v+2p): a second set that shares no volume with the first."""
    left = (n + 1) // 2
    right = n // 2
    offsets = [-(ring * left + k) for k in range(left, 0, -1)] + [ring * right + k for k in range(1, right + 1)]
    return np.array([[(v + o) % n_volumes for o in offsets] for v in range(n_volumes)], dtype=np.int64)


def angular_neighbours(bvecs: np.ndarray, n: int, ring: int = 0) -> np.ndarray:
    """For each volume, the n other volumes whose gradient directions are closest in angle (ring 0),
    or the next n closest after those (ring 1).

    Diffusion signal is antipodally symmetric, so the angle between g and -g is zero: closeness is
    |g_v . g_u|. Ties are broken by acquisition order, so the table is deterministic.
    """
    bvecs = np.asarray(bvecs, dtype=np.float64)
    similarity = np.abs(bvecs @ bvecs.T)
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")
    return order[:, ring * n:(ring + 1) * n].astype(np.int64)


# "auto" n (Settings.n 0) takes as many neighbours as leave Stage III a second, disjoint set (2n + 1 <= V),
# up to this many: on the 55-direction bench case n = 8 scored 1.1-1.6 dB above n = 2, on the phantom's
# 30 directions 0.4-0.6 dB, on 6 directions n = 4 no better than 2 (bench/RESULTS.md, tenth session)
AUTO_MAX_NEIGHBOURS = 8


def shell_neighbour_count(n: int, n_volumes: int) -> int:
    """The neighbours each volume of a shell of ``n_volumes`` is predicted from: ``n``, or for n = 0
    ("auto") (V - 1) // 2, between 1 and ``AUTO_MAX_NEIGHBOURS``."""
    return n or max(1, min(AUTO_MAX_NEIGHBOURS, (n_volumes - 1) // 2))


def neighbour_table(bvecs: np.ndarray, n: int, mode: str, ring: int = 0) -> np.ndarray:
    """(V, n) indices (within the shell) of the volumes that predict each volume in Stage I. Ring 1 is a
    second set with none of ring 0's volumes (Stage III's independent estimate); it needs 2n + 1 volumes."""
    n_volumes = len(bvecs)
    if not 1 <= n * (ring + 1) <= n_volumes - 1:
        raise ValueError(f"n = {n} needs 1 <= {ring + 1} n <= {n_volumes - 1} for a shell of {n_volumes} volumes")
    has_directions = np.linalg.norm(bvecs, axis=1).min() > 0.5
    if mode == "angular" and has_directions:
        return angular_neighbours(bvecs, n, ring)
    if mode in ("angular", "adjacent"):
        return adjacent_neighbours(n_volumes, n, ring)
    raise ValueError(f"unknown neighbour mode {mode!r}; use 'angular' or 'adjacent'")


def gradient_features(bvecs: np.ndarray, bvals: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Encode the gradients of each target volume and of its neighbours for Stage I's condition.

    Each gradient becomes the 6 unique entries of q q^T with q = sqrt(b / b_max) g: sign-invariant
    (g and -g measure the same signal) and what the tensor model's exponent b g^T D g is linear in.

    Returns
    -------
    (V, 6 * (n + 1)) float32: the target's encoding first, then each neighbour's in table order.
    """
    bvecs = np.asarray(bvecs, dtype=np.float64)
    bvals = np.asarray(bvals, dtype=np.float64)
    q = bvecs * np.sqrt(bvals / max(bvals.max(), 1e-12))[:, None]
    root2 = np.sqrt(2.0)
    encoded = np.stack([q[:, 0] ** 2, q[:, 1] ** 2, q[:, 2] ** 2,
                        root2 * q[:, 0] * q[:, 1], root2 * q[:, 0] * q[:, 2], root2 * q[:, 1] * q[:, 2]], axis=1)
    per_volume = [encoded] + [encoded[neighbours[:, k]] for k in range(neighbours.shape[1])]
    return np.concatenate(per_volume, axis=1).astype(np.float32)


def shell_slices(normalised: np.ndarray, shell: Shell) -> np.ndarray:
    """The shell's volumes as (V, Z, H, W) slices (a copy, contiguous)."""
    return np.ascontiguousarray(np.transpose(normalised[..., list(shell.indices)], (3, 2, 0, 1)))


def normalised_shell_slices(data: np.ndarray, shell: Shell, scales: np.ndarray) -> np.ndarray:
    """``shell_slices(normalise_volumes(data)[0], shell)``, bit for bit, without a normalised copy of
    the whole input: one volume at a time into the shell's (V, Z, H, W) array."""
    slices = np.empty((len(shell.indices), data.shape[2], data.shape[0], data.shape[1]), dtype=np.float32)
    for position, volume in enumerate(shell.indices):
        normalised = (2.0 * data[..., volume] / scales[volume] - 1.0).astype(np.float32)
        slices[position] = np.transpose(normalised, (2, 0, 1))
    return slices


def mean_b0(data: np.ndarray, b0_indices: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float64: the mean of the volumes ``b0_indices`` of ``data``."""
    mean = np.zeros(data.shape[:3])
    for volume in b0_indices:  # one volume at a time: no copy of the b0s
        mean += data[..., int(volume)]
    return mean / len(b0_indices)


def b0_guide_slices(data: np.ndarray, b0_indices: np.ndarray) -> np.ndarray:
    """(Z, H, W) float32: the mean of the b = 0 volumes, mapped to [-1, 1] by its maximum like a volume.

    Stage I's and Stage III's guide for the diffusion-weighted shells: the b0s' noise is independent of
    every diffusion-weighted volume's, so both stay J-invariant, and S0 sets the scale of the signal
    along every direction (S = S0 exp(-b g'Dg)), at a higher SNR than any one weighted volume has."""
    mean = mean_b0(data, b0_indices)
    peak = mean.max() if mean.max() > 0 else 1.0
    return np.transpose(2.0 * mean / peak - 1.0, (2, 0, 1)).astype(np.float32)


def restore_shell_volumes(target: np.ndarray, slices: np.ndarray, shell: Shell, scales: np.ndarray) -> None:
    """Write a shell's normalised (V, Z, H, W) slices into its volumes of ``target`` (X, Y, Z, N), in the
    input's units (``denormalise_volumes``), one volume at a time (no whole-input temporaries)."""
    for position, volume in enumerate(shell.indices):
        target[..., volume] = denormalise_volumes(np.transpose(slices[position], (1, 2, 0)), scales[volume])
