"""Write a DWI as a NRRD file the engine (and Slicer) reads, from plain numpy arrays.

Written by hand rather than through a storage node so that what reaches the engine is exactly the
node's voxels, geometry and gradient table, independent of the node's attributes (a DWI loaded from a
file carries its header keys as attributes, and Slicer's writer would re-emit stale ones).

Conventions written: LPS space; the measurement frame maps the stored gradients into LPS; NA-MIC
b-values (one ``DWMRI_b-value`` = the largest b, each gradient scaled by sqrt(b_i / b_max)); the
gradient axis first (``kinds: list domain domain domain``), raw little-endian float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _vector(values) -> str:
    return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"


def writeDwiNrrd(path: str | os.PathLike, voxels: np.ndarray, ijkToRas: np.ndarray,
                 gradients: np.ndarray, bValues: np.ndarray, measurementFrame: np.ndarray) -> Path:
    """Write a DWI NRRD.

    Parameters
    ----------
    voxels : (K, J, I, N) array, the layout of ``slicer.util.arrayFromVolume`` for a DWI node.
    ijkToRas : (4, 4) voxel index -> RAS (mm).
    gradients : (N, 3) unit (or zero) gradient directions in the measurement frame.
    bValues : (N,) b-values in s/mm^2.
    measurementFrame : (3, 3) measurement frame -> RAS (Slicer stores it RAS-based).
    """
    voxels = np.asarray(voxels, dtype="<f4")
    gradients = np.asarray(gradients, dtype=np.float64).reshape(-1, 3)
    bValues = np.asarray(bValues, dtype=np.float64).reshape(-1)
    if voxels.ndim != 4 or not (voxels.shape[3] == len(gradients) == len(bValues)):
        raise ValueError(f"a DWI needs voxels (K, J, I, N) with N gradients and b-values; got voxels "
                         f"{voxels.shape}, {len(gradients)} gradients, {len(bValues)} b-values")
    bMax = float(bValues.max())
    if bMax <= 0:
        raise ValueError("a DWI needs at least one diffusion-weighted volume (all b-values are 0)")
    scaled = gradients * np.sqrt(np.clip(bValues / bMax, 0.0, None))[:, None]

    ijkToLps = RAS_TO_LPS @ np.asarray(ijkToRas, dtype=np.float64)[:3, :]
    frameToLps = RAS_TO_LPS @ np.asarray(measurementFrame, dtype=np.float64)
    kSize, jSize, iSize, nSize = voxels.shape
    lines = [
        "NRRD0005",
        "# written by DDM2Slicer",
        "type: float",
        "dimension: 4",
        "space: left-posterior-superior",
        f"sizes: {nSize} {iSize} {jSize} {kSize}",
        # NRRD lists axis vectors; each one is a column of the matrix.
        "space directions: none " + " ".join(_vector(ijkToLps[:, axis]) for axis in range(3)),
        "kinds: list domain domain domain",
        "endian: little",
        "encoding: raw",
        f"space origin: {_vector(ijkToLps[:, 3])}",
        "measurement frame: " + " ".join(_vector(frameToLps[:, axis]) for axis in range(3)),
        "modality:=DWMRI",
        f"DWMRI_b-value:={bMax:.10g}",
    ]
    lines += [f"DWMRI_gradient_{index:04d}:={g[0]:.17g} {g[1]:.17g} {g[2]:.17g}" for index, g in enumerate(scaled)]
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as stream:
        stream.write(("\n".join(lines) + "\n\n").encode("ascii"))
        # C order of (K, J, I, N) puts the gradient index fastest, as "sizes" says.
        stream.write(np.ascontiguousarray(voxels).tobytes())
    os.replace(partial, path)
    return path
