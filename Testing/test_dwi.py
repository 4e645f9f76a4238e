"""Reading and writing DWIs: values, geometry and gradients round-trip exactly; bad input is refused."""

from __future__ import annotations

import numpy as np
import nrrd
import pytest

from ddm2 import dwi as dwi_io
from ddm2.dwi import DWI, InputError
from paths import PHILIPS, needs_philips



def rotation(angle_deg: float, axis: int) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def oblique_affine(flip_x: bool) -> np.ndarray:
    affine = np.eye(4)
    block = rotation(20, 2) @ rotation(-10, 0) @ np.diag([2.0, 2.5, 3.0])
    if flip_x:
        block = block @ np.diag([-1.0, 1.0, 1.0])
    affine[:3, :3] = block
    affine[:3, 3] = (10.0, -20.0, 5.0)
    return affine


def random_dwi(seed: int = 0, flip_x: bool = False) -> DWI:
    rng = np.random.default_rng(seed)
    bvecs = rng.normal(size=(9, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    bvals = np.array([0, 1000, 1000, 1000, 1000, 2000, 2000, 2000, 2000], dtype=float)
    data = rng.uniform(0, 500, size=(5, 6, 4, 9)).astype(np.float32)
    return DWI(data, oblique_affine(flip_x), bvals, bvecs)


@pytest.mark.parametrize("flip_x", [False, True])
def test_nifti_round_trip_keeps_values_geometry_and_gradients(tmp_path, flip_x):
    original = random_dwi(flip_x=flip_x)
    dwi_io.save_nifti(original, tmp_path / "x.nii.gz")
    loaded = dwi_io.load(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(loaded.data, original.data)
    np.testing.assert_allclose(loaded.affine, original.affine, atol=1e-6)
    np.testing.assert_array_equal(loaded.bvals, original.bvals)
    np.testing.assert_allclose(loaded.bvecs, original.bvecs, atol=1e-6)


def test_nrrd_round_trip_keeps_values_geometry_gradients_and_bvalues(tmp_path):
    original = random_dwi(seed=1)
    dwi_io.save_nrrd(original, tmp_path / "x.nrrd")
    loaded = dwi_io.load(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(loaded.data, original.data)
    np.testing.assert_allclose(loaded.affine, original.affine, atol=1e-9)
    np.testing.assert_allclose(loaded.bvals, original.bvals, atol=1e-6)
    np.testing.assert_allclose(loaded.bvecs, original.bvecs, atol=1e-9)
    _, header = nrrd.read(str(tmp_path / "x.nrrd"))
    assert header["modality"] == "DWMRI"
    assert header["kinds"][0] == "list"
    assert float(header["DWMRI_b-value"]) == 2000
    # NA-MIC convention: a b = 1000 gradient of a b_max = 2000 file has norm sqrt(1/2)
    norm = np.linalg.norm([float(v) for v in header["DWMRI_gradient_0001"].split()])
    assert norm == pytest.approx(np.sqrt(0.5), abs=1e-9)


def test_nrrd_measurement_frame_rotates_gradients_into_ras(tmp_path):
    frame = rotation(90, 2)  # columns are the frame's axes in LPS space
    data = np.ones((3, 3, 2, 8), dtype=np.float32)
    header = {"type": "float", "dimension": 4, "space": "left-posterior-superior",
              "kinds": ["space", "space", "space", "list"],
              "space directions": np.vstack([np.eye(3), np.full(3, np.nan)]), "space origin": np.zeros(3),
              "measurement frame": frame.T,  # pynrrd writes one header vector per row: the columns
              "modality": "DWMRI", "DWMRI_b-value": "1000"}
    gradients = np.zeros((8, 3))
    gradients[1:] = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]]
    gradients[1:] /= np.linalg.norm(gradients[1:], axis=1, keepdims=True)
    for i, g in enumerate(gradients):
        header[f"DWMRI_gradient_{i:04d}"] = " ".join(map(str, g))
    nrrd.write(str(tmp_path / "f.nrrd"), data, header)
    loaded = dwi_io.load(tmp_path / "f.nrrd")
    expected = (np.diag([-1, -1, 1]) @ frame @ gradients.T).T  # MF g in LPS, then LPS -> RAS
    np.testing.assert_allclose(loaded.bvecs, expected, atol=1e-12)
    np.testing.assert_array_equal(loaded.data.shape, (3, 3, 2, 8))
    np.testing.assert_allclose(loaded.affine[:3, :3], np.diag([-1, -1, 1]))


@needs_philips
def test_fsl_bvecs_of_the_real_scan_map_back_to_the_file():
    scan = dwi_io.load(PHILIPS)
    file_bvecs = np.loadtxt(str(PHILIPS).replace(".nii.gz", ".bvec")).T
    back = dwi_io.bvecs_to_fsl(scan.bvecs, scan.affine)
    unit = file_bvecs / np.linalg.norm(file_bvecs, axis=1, keepdims=True)
    np.testing.assert_allclose(back, unit, atol=1e-9)
    assert scan.data.shape == (112, 112, 32, 17)
    assert scan.b0_mask.sum() == 5


def _write_nifti_with_gradients(tmp_path, data, bvals, bvecs):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "in.nii.gz"))
    np.savetxt(tmp_path / "in.bval", np.atleast_2d(bvals))
    np.savetxt(tmp_path / "in.bvec", np.asarray(bvecs).T)
    return tmp_path / "in.nii.gz"


GOOD_BVALS = [0, 1000, 1000, 1000, 1000]
GOOD_BVECS = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("three_d", "4-D"),
    ("count", "5 volumes but 4 b-values"),
    ("nan", "NaN"),
    ("no_b0", "no b = 0 volume"),
    ("zero_gradient", "zero gradient"),
    ("no_bval", "no .bval file"),
    ("not_an_image", "neither NIfTI"),
])
def test_bad_input_is_refused_with_the_fix(tmp_path, case, message):
    data = np.ones((4, 4, 3, 5), dtype=np.float32)
    bvals, bvecs = list(GOOD_BVALS), [list(v) for v in GOOD_BVECS]
    if case == "three_d":
        data = data[..., 0]
    if case == "count":
        bvals, bvecs = bvals[:4], bvecs[:4]
    if case == "nan":
        data[1, 1, 1, 1] = np.nan
    if case == "no_b0":
        bvals[0], bvecs[0] = 1000, [1, 1, 0]
    if case == "zero_gradient":
        bvecs[2] = [0, 0, 0]
    path = _write_nifti_with_gradients(tmp_path, data, bvals, bvecs)
    if case == "missing":
        path = tmp_path / "nothing.nii.gz"
    if case == "no_bval":
        (tmp_path / "in.bval").unlink()
    if case == "not_an_image":
        path = tmp_path / "in.bval"
    with pytest.raises(InputError, match=message):
        dwi_io.load(path)


def test_fewer_volumes_than_n_plus_one_is_refused():
    dwi = random_dwi()
    with pytest.raises(InputError, match="lower --n"):
        dwi_io.validate(dwi, n_neighbours=9)


def test_atomic_path_leaves_no_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with dwi_io.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []
