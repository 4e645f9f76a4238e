"""The DWI container and its readers and writers (NIfTI + FSL bval/bvec, DWI NRRD).

Gradient frame
--------------
``DWI.bvecs`` holds unit gradient directions in **RAS world coordinates** (the frame of
``DWI.affine``), one row per volume; rows of b = 0 volumes may be zero. This frame is unambiguous
for both file formats and is what Slicer shows:

* FSL bvecs are given along the voxel axes, with the x axis flipped when the affine's determinant is
  positive (FSL's "radiological" voxel convention): ``g_ras = R @ F @ g_fsl`` where ``R`` is the
  affine's rotation (voxel sizes divided out) and ``F = diag(-1, 1, 1)`` if ``det(affine) > 0``.
* NRRD gradients are given in the measurement frame: ``g_space = MF @ g``, then LPS -> RAS.

b-values follow the NA-MIC NRRD convention on reading (``b_i = b_ref * |g_i|^2 / max |g|^2``) and on
writing (each gradient scaled by ``sqrt(b_i / b_max)``).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

B0_THRESHOLD = 50.0  # s/mm^2: volumes at or below this b-value count as b = 0
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class InputError(ValueError):
    """A problem with the user's input; its message names the problem and the fix."""


@dataclass
class DWI:
    """A diffusion-weighted image.

    Attributes
    ----------
    data : float32 array (X, Y, Z, N)
    affine : (4, 4) voxel index -> RAS world (mm), as in NIfTI.
    bvals : (N,) b-values in s/mm^2.
    bvecs : (N, 3) unit gradient directions in RAS world coordinates (zero rows allowed for b = 0).
    """

    data: np.ndarray
    affine: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    source: str = ""
    header_extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.bvals = np.asarray(self.bvals, dtype=np.float64).reshape(-1)
        self.bvecs = np.asarray(self.bvecs, dtype=np.float64).reshape(-1, 3)

    @property
    def n_volumes(self) -> int:
        return self.data.shape[3]

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= B0_THRESHOLD

    def bvecs_voxel(self) -> np.ndarray:
        """Gradient directions along the voxel axes of ``data`` (what dipy's fits expect)."""
        rotation = voxel_rotation(self.affine)
        return self.bvecs @ rotation  # rotation is orthogonal: R^T g for every row g

    def with_data(self, data: np.ndarray) -> "DWI":
        """The same geometry and gradients with other intensities."""
        return DWI(data, self.affine.copy(), self.bvals.copy(), self.bvecs.copy(), self.source)

    def cropped(self, first: tuple[int, int, int], stop: tuple[int, int, int]) -> "DWI":
        """The box of voxels first <= index < stop (all volumes), at the same place in the world."""
        affine = self.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.asarray(first, dtype=np.float64)
        box = tuple(slice(a, b) for a, b in zip(first, stop))
        return DWI(np.ascontiguousarray(self.data[box]), affine, self.bvals.copy(), self.bvecs.copy(), self.source)


def voxel_rotation(affine: np.ndarray) -> np.ndarray:
    """The orthogonal part of an affine's 3x3 block (voxel sizes and shear removed)."""
    u, _, vt = np.linalg.svd(np.asarray(affine, dtype=np.float64)[:3, :3])
    return u @ vt


def validate(dwi: DWI, n_neighbours: int | None = None) -> None:
    """Raise InputError for a DWI that the denoiser cannot work on, naming the fix."""
    data = dwi.data
    name = dwi.source or "the input"
    if data.ndim != 4:
        raise InputError(f"{name} is {data.ndim}-D; a DWI must be 4-D (x, y, z, volumes): "
                         "give the 4-D series, not a single volume")
    n = data.shape[3]
    if dwi.bvals.shape[0] != n or dwi.bvecs.shape[0] != n:
        raise InputError(f"{name} has {n} volumes but {dwi.bvals.shape[0]} b-values and "
                         f"{dwi.bvecs.shape[0]} gradient directions: give the bval/bvec files of this scan")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite voxels: replace them (e.g. with 0) "
                         "before denoising")
    if not np.isfinite(dwi.bvals).all() or (dwi.bvals < 0).any():
        raise InputError(f"{name} has negative or non-finite b-values: check the bval file")
    if not dwi.b0_mask.any():
        raise InputError(f"{name} has no b = 0 volume (all b-values > {B0_THRESHOLD:g}): "
                         "the DTI maps need one; include the b = 0 volumes of the scan")
    norms = np.linalg.norm(dwi.bvecs, axis=1)
    zero_dw = np.flatnonzero(~dwi.b0_mask & (norms < 1e-6))
    if zero_dw.size:
        raise InputError(f"{name}: volume(s) {zero_dw.tolist()} have b > 0 but a zero gradient "
                         "direction: fix the bvec file (or mark them b = 0 in the bval file)")
    if n_neighbours is not None and n < n_neighbours + 1:
        raise InputError(f"{name} has {n} volumes, fewer than n + 1 = {n_neighbours + 1}: "
                         f"lower --n to at most {n - 1}")


# ----------------------------------------------------------------------------------------- reading

def load(path: str | os.PathLike, bval: str | os.PathLike | None = None,
         bvec: str | os.PathLike | None = None) -> DWI:
    """Read a DWI from NIfTI (+ FSL bval/bvec, found beside it when not given) or a DWI NRRD."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path")
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path)
    if name.endswith((".nii", ".nii.gz")):
        return _load_nifti(path, bval, bvec)
    raise InputError(f"{path} is neither NIfTI (.nii, .nii.gz) nor NRRD (.nrrd, .nhdr): "
                     "convert it to one of those")


def _stem(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_suffix("")


def _find_beside(path: Path, suffix: str) -> Path:
    candidate = _stem(path).with_name(_stem(path).name + suffix)
    if candidate.exists():
        return candidate
    raise InputError(f"no {suffix} file beside {path}: pass --{suffix[1:]} FILE "
                     f"(expected {candidate.name})")


def _read_table(path: Path, what: str) -> np.ndarray:
    try:
        return np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {what} file {path} ({error}): give a whitespace-separated "
                         "FSL text file") from None


def _load_nifti(path: Path, bval, bvec) -> DWI:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for a damaged file
        raise InputError(f"cannot read {path} as NIfTI ({error}): check that the file is complete") from None
    affine = image.affine
    bval_path = Path(bval) if bval else _find_beside(path, ".bval")
    bvec_path = Path(bvec) if bvec else _find_beside(path, ".bvec")
    bvals = _read_table(bval_path, "bval").reshape(-1)
    table = _read_table(bvec_path, "bvec")
    if table.shape[0] != 3 and table.shape[1] == 3:
        table = table.T  # some tools write one row per volume
    if table.shape[0] != 3:
        raise InputError(f"{bvec_path} has shape {table.shape}; an FSL bvec file has 3 rows")
    dwi = DWI(data, affine, bvals, bvecs_from_fsl(table.T, affine), source=str(path))
    validate(dwi)
    return dwi


def bvecs_from_fsl(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL voxel-axis gradient directions (N, 3) -> unit RAS directions."""
    flip = np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(affine[:3, :3]) > 0 else np.eye(3)
    # some tools write NaN for the b = 0 direction; as zero, a b > 0 volume is then refused by validate()
    ras = np.nan_to_num(np.asarray(bvecs, dtype=np.float64)) @ (voxel_rotation(affine) @ flip).T
    return _unit_rows(ras)


def bvecs_to_fsl(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Unit RAS gradient directions (N, 3) -> FSL voxel-axis directions."""
    flip = np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(affine[:3, :3]) > 0 else np.eye(3)
    return np.asarray(bvecs, dtype=np.float64) @ (voxel_rotation(affine) @ flip)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.where(norms > 1e-12, vectors / np.where(norms > 1e-12, norms, 1.0), 0.0)


def _load_nrrd(path: Path) -> DWI:
    import nrrd

    try:
        array, header = nrrd.read(str(path))
    except Exception as error:  # pynrrd raises NRRDError, OSError, ValueError...
        raise InputError(f"cannot read {path} as NRRD ({error}): check that the file is complete") from None
    if header.get("modality", "").upper() != "DWMRI":
        raise InputError(f"{path} is a NRRD without 'modality:=DWMRI': it is not a DWI; "
                         "save the DWI node from Slicer as NRRD")
    kinds = [kind.lower() for kind in header.get("kinds", [])]
    list_axes = [i for i, kind in enumerate(kinds) if kind in ("list", "vector")]
    if array.ndim != 4 or len(list_axes) != 1:
        raise InputError(f"{path} is not a 4-D DWI NRRD (kinds {kinds}): save it with one gradient axis")
    data = np.moveaxis(np.asarray(array, dtype=np.float32), list_axes[0], 3)
    spatial_axes = [i for i in range(4) if i != list_axes[0]]

    directions = np.asarray(header["space directions"], dtype=np.float64)
    rows = [directions[i] for i in spatial_axes] if directions.shape[0] == 4 else list(directions)
    to_ras = _space_to_ras(header.get("space", "right-anterior-superior"), path)
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ np.stack(rows, axis=1)
    affine[:3, 3] = to_ras @ np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)

    frame = np.asarray(header.get("measurement frame", np.eye(3)), dtype=np.float64)
    # pynrrd returns the frame as written: row i of the header list is column i of the matrix
    frame = frame.T
    try:
        b_ref = float(header["DWMRI_b-value"])
        gradients = np.array([[float(v) for v in str(header[f"DWMRI_gradient_{i:04d}"]).split()]
                              for i in range(data.shape[3])])
    except KeyError as error:
        raise InputError(f"{path} lacks the DWMRI key {error}: every volume needs a gradient line") from None
    norms = np.linalg.norm(gradients, axis=1)
    bvals = b_ref * (norms / norms.max()) ** 2 if norms.max() > 0 else np.zeros(len(norms))
    bvecs = _unit_rows(gradients @ (to_ras @ frame).T)
    dwi = DWI(data, affine, bvals, bvecs, source=str(path))
    validate(dwi)
    return dwi


def _space_to_ras(space: str, path: Path) -> np.ndarray:
    space = space.lower()
    if space in ("right-anterior-superior", "ras"):
        return np.eye(3)
    if space in ("left-posterior-superior", "lps"):
        return _LPS_TO_RAS
    raise InputError(f"{path} uses NRRD space '{space}'; only RAS and LPS are supported: "
                     "resave it from Slicer")


# ----------------------------------------------------------------------------------------- writing

@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the body succeeds.

    A reader never sees a half-written file: it sees the old file, no file, or the complete new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)  # keep .nii.gz so writers pick the right format
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}",
                                         dir=target.parent)
    os.close(handle)
    temporary = Path(temporary)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would hide the output from other users
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def save_nifti(dwi: DWI, path: str | os.PathLike, write_gradients: bool = True) -> list[Path]:
    """Write data as NIfTI (float32, the DWI's affine) and, for 4-D data, FSL bval/bvec beside it."""
    import nibabel as nib

    path = Path(path)
    image = nib.Nifti1Image(np.asarray(dwi.data, dtype=np.float32), dwi.affine)
    image.set_qform(dwi.affine, code=1)
    image.set_sform(dwi.affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    written = [path]
    if write_gradients and np.asarray(dwi.data).ndim == 4:
        stem = _stem(path)
        bval_path, bvec_path = stem.with_name(stem.name + ".bval"), stem.with_name(stem.name + ".bvec")
        with atomic_path(bval_path) as temporary:
            np.savetxt(temporary, dwi.bvals[None, :], fmt="%.10g")
        with atomic_path(bvec_path) as temporary:
            np.savetxt(temporary, bvecs_to_fsl(dwi.bvecs, dwi.affine).T, fmt="%.17g")
        written += [bval_path, bvec_path]
    return written


def save_volume(volume: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 3-D (or 4-D) array as float32 NIfTI with the given affine."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return Path(path)


def save_nrrd(dwi: DWI, path: str | os.PathLike) -> Path:
    """Write a DWI NRRD that Slicer loads as a DWI node.

    LPS space (Slicer's file convention), identity measurement frame, gradients in LPS scaled by
    ``sqrt(b_i / b_max)`` (NA-MIC convention), gradient axis first with kinds ``list space space space``.
    """
    import nrrd

    b_max = float(dwi.bvals.max())
    scale = np.sqrt(np.clip(dwi.bvals / b_max, 0.0, None)) if b_max > 0 else np.zeros_like(dwi.bvals)
    gradients = (dwi.bvecs @ _LPS_TO_RAS.T) * scale[:, None]
    affine_lps = _LPS_TO_RAS @ dwi.affine[:3, :]
    header = {
        "type": "float",
        "dimension": 4,
        "space": "left-posterior-superior",
        "kinds": ["list", "space", "space", "space"],
        "space directions": np.vstack([np.full(3, np.nan), affine_lps[:, :3].T]),
        "space origin": affine_lps[:, 3],
        "measurement frame": np.eye(3),
        "endian": "little",
        "encoding": "gzip",
        "modality": "DWMRI",
        "DWMRI_b-value": f"{b_max:.10g}",
    }
    for i, gradient in enumerate(gradients):
        header[f"DWMRI_gradient_{i:04d}"] = " ".join(f"{value:.17g}" for value in gradient)
    array = np.ascontiguousarray(np.moveaxis(np.asarray(dwi.data, dtype=np.float32), 3, 0))
    with atomic_path(path) as temporary:
        nrrd.write(str(temporary), array, header, index_order="F")
    return Path(path)


def save(dwi: DWI, path: str | os.PathLike) -> list[Path]:
    """Write a DWI in the format its file name asks for (.nrrd/.nhdr or .nii/.nii.gz)."""
    name = str(path).lower()
    if name.endswith((".nrrd", ".nhdr")):
        return [save_nrrd(dwi, path)]
    return save_nifti(dwi, path)
