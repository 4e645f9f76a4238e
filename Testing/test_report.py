"""ddm2.report: the QC figure and the self-contained HTML page."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from ddm2.dwi import DWI
from ddm2.report import choose_slices, write_report


def small_dwi(seed: int = 0) -> tuple[DWI, DWI]:
    """(noisy, denoised): a 20 x 20 x 10 sphere of anisotropic tissue, 2 b = 0 + 12 weighted volumes."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(12, 3))
    bvecs = np.vstack([np.zeros((2, 3)), directions / np.linalg.norm(directions, axis=1, keepdims=True)])
    bvals = np.r_[0.0, 0.0, np.full(12, 1000.0)]
    x, y, z = np.meshgrid(np.arange(20), np.arange(20), np.arange(10), indexing="ij")
    brain = (x - 10) ** 2 + (y - 10) ** 2 + 2 * (z - 5) ** 2 <= 64
    tensor = np.diag([1.5e-3, 0.4e-3, 0.4e-3])
    clean = np.where(brain[..., None], 1000 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, tensor, bvecs)), 0)
    noisy = np.abs(clean + rng.normal(0, 40, clean.shape) + 1j * rng.normal(0, 40, clean.shape))
    affine = np.diag([-2.0, 2.0, 2.5, 1.0])  # LAS, like many scanners
    return (DWI(noisy, affine, bvals, bvecs, source="/data/scan.nii.gz"),
            DWI(clean + 5.0, affine, bvals, bvecs))


def test_report_writes_a_png_and_a_self_contained_html_page(tmp_path):
    noisy, denoised = small_dwi()
    rng = np.random.default_rng(1)
    scores = {"PSNR (dB)": np.linspace(20, 30, 10), "SSIM": np.linspace(0.5, 0.9, 10)}
    curves = [np.linspace(0, 1, n) for n in (8, 10, 12)] + [np.full(9, 0.02)]
    flags = np.array([False, False, False, True])
    stage1 = denoised.data + rng.normal(0, 10, denoised.data.shape)
    paths = write_report(noisy, denoised, tmp_path / "qc.png", tmp_path / "qc.html", slice_scores=scores,
                         outlier_curves=curves, outlier_flags=flags, stage1=stage1,
                         title="Phantom <test>", table="method  PSNR\nnoisy   21.0")
    assert paths == [tmp_path / "qc.png", tmp_path / "qc.html"]
    png = paths[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000
    from matplotlib.image import imread

    height, width = imread(paths[0]).shape[:2]
    assert width > 1200 and height > 900  # 6 columns x 3 slices plus the plots row
    page = paths[1].read_text(encoding="utf-8")
    embedded = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert embedded and base64.b64decode(embedded.group(1)) == png
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from elsewhere
    assert "Phantom &lt;test&gt;" in page and "noisy   21.0" in page
    assert "1 of 4 RMSE curves stay flat: curves 3." in page
    assert page.count("<tr>") == 1 + 10  # header + one row per slice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc.html", "qc.png"]  # no temporary left


def test_report_without_optional_parts_is_smaller_but_complete(tmp_path):
    noisy, denoised = small_dwi()
    png, page = write_report(noisy, denoised, tmp_path / "a.png", tmp_path / "a.html")
    assert png.stat().st_size > 15_000
    assert "<pre>" not in page.read_text() and "data:image/png;base64," in page.read_text()


def test_report_rejects_mismatched_inputs(tmp_path):
    noisy, denoised = small_dwi()
    with pytest.raises(ValueError, match="denoised has shape"):
        write_report(noisy, denoised.with_data(denoised.data[..., :5]), tmp_path / "a.png", tmp_path / "a.html")
    with pytest.raises(ValueError, match=r"slice_scores\['PSNR'\] must hold one value per axial slice \(10,\)"):
        write_report(noisy, denoised, tmp_path / "a.png", tmp_path / "a.html", slice_scores={"PSNR": np.ones(3)})
    assert not any(tmp_path.iterdir())


def test_three_slices_are_spread_through_the_brain():
    mask = np.zeros((4, 4, 20), dtype=bool)
    mask[:, :, 5:15] = True
    assert choose_slices(mask) == [8, 9, 11]  # 30, 50, 70 % of slices 5..14 (numpy rounds 4.5 to 4)


def test_one_step_chains_are_drawn_as_each_slices_distance_from_its_input_against_the_threshold():
    from matplotlib.figure import Figure

    from ddm2.report import _plot_outliers

    curves = [np.array([0.0, rmse]) for rmse in (0.16, 0.15, 0.17, 0.02)]  # input, then the one step
    axes = Figure().add_subplot()
    _plot_outliers(axes, curves, np.array([False, False, False, True]))
    kept, flagged = (collection.get_offsets() for collection in axes.collections)
    np.testing.assert_allclose(kept, [[0, 0.16], [1, 0.15], [2, 0.17]])
    np.testing.assert_allclose(flagged, [[3, 0.02]])
    np.testing.assert_allclose(axes.lines[0].get_ydata(), 0.25 * 0.155)  # a quarter of the median distance
