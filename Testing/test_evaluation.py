"""ddm2.evaluation: evaluate, the score tables and compare_methods."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddm2.dwi import DWI
from ddm2.evaluation import compare_methods, evaluate, format_evaluation, format_score_table


def head_phantom(sigma: float = 25.0, seed: int = 0) -> tuple[DWI, DWI]:
    """(noisy, truth): a 7-voxel-radius 'brain' of isotropic tissue with a left-right fibre block
    (the 'corpus callosum') at its centre, in a 32 x 32 x 24 field of view with Rician background."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    theta, phi = np.arccos(rng.uniform(0, 1, 30)), rng.uniform(0, 2 * np.pi, 30)
    directions, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 1000)
    bvecs = np.vstack([np.zeros((3, 3)), directions.vertices])
    bvals = np.r_[np.zeros(3), np.full(30, 1000.0)]
    x, y, z = np.meshgrid(np.arange(32), np.arange(32), np.arange(24), indexing="ij")
    brain = (x - 16) ** 2 + (y - 16) ** 2 + (z - 12) ** 2 <= 7 ** 2
    truth = np.zeros(brain.shape + (bvals.size,))
    truth[brain] = 1000.0 * np.exp(-bvals * 0.8e-3)
    fibre = np.diag([1.7e-3, 0.25e-3, 0.25e-3])
    truth[13:20, 15:18, 11:14] = 1000.0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, fibre, bvecs))
    noisy = np.abs(truth + rng.normal(0, sigma, truth.shape) + 1j * rng.normal(0, sigma, truth.shape))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return DWI(noisy, affine, bvals, bvecs, source="phantom.nii.gz"), DWI(truth, affine, bvals, bvecs)


@pytest.fixture(scope="module")
def phantom():
    return head_phantom()


def test_evaluate_reports_snr_cnr_and_truth_scores_that_favour_the_better_estimate(phantom):
    noisy, truth = phantom
    rng = np.random.default_rng(1)
    # a quieter acquisition of the same object stands in for a good denoiser (Rician, sigma 8 vs 25)
    better = noisy.with_data(np.abs(truth.data + rng.normal(0, 8, truth.data.shape)
                                    + 1j * rng.normal(0, 8, truth.data.shape)))
    result = evaluate(noisy, better, truth)
    json.dumps(result)  # JSON-ready
    snr = result["snr_cnr"]
    assert snr["available"] and snr["cc_voxels"] >= 40  # the 63-voxel fibre block, minus noisy voxels
    for variant in ("dipy", "normalised"):
        entry = snr["variants"][variant]
        assert len(entry["raw_snr"]) == noisy.n_volumes
        assert np.isfinite(entry["delta_snr"]["mean"]) and np.isfinite(entry["delta_cnr"]["worst"])
    # Raw intensities: a third of the noise, about three times the SNR. (The per-slice-normalised variant
    # barely moves here: most background voxels lie in slices without tissue, where min-max
    # normalisation makes noise of any level look the same.)
    dipy = snr["variants"]["dipy"]
    assert dipy["delta_snr"]["mean"] > 1.5 * dipy["raw_snr_summary"]["mean"]
    assert dipy["delta_cnr"]["worst"] > 0
    scores = result["truth"]
    assert scores["denoised"]["psnr_db"] > scores["noisy"]["psnr_db"] + 8  # 20 log10(25 / 8) = 9.9 dB
    assert scores["denoised"]["fa_rmse"] < 0.5 * scores["noisy"]["fa_rmse"]
    assert scores["denoised"]["ssim"] > scores["noisy"]["ssim"]
    text = format_evaluation(result)
    assert "delta SNR" in text and "PSNR (dB)" in text and "denoised" in text


def test_evaluate_explains_a_missing_corpus_callosum_instead_of_failing(phantom):
    noisy, _ = phantom
    isotropic = noisy.with_data(np.repeat(noisy.data[..., :1], noisy.n_volumes, axis=3))
    result = evaluate(isotropic, isotropic)
    assert result["snr_cnr"]["available"] is False
    assert "no corpus-callosum voxel" in result["snr_cnr"]["reason"]
    assert "not available" in format_evaluation(result)


def test_evaluate_rejects_a_denoised_dwi_of_another_shape(phantom):
    noisy, _ = phantom
    with pytest.raises(ValueError, match="denoised has shape"):
        evaluate(noisy, noisy.with_data(noisy.data[..., :-1]))


def test_score_table_has_one_row_per_method_and_the_four_columns():
    table = format_score_table({"noisy": {"psnr_db": 25.123, "ssim": 0.61234, "fa_rmse": 0.2, "md_rmse": 1.5e-4},
                                "DDM2": {"psnr_db": float("inf"), "ssim": 0.9}})
    lines = table.splitlines()
    assert lines[0].split() == ["method", "PSNR", "(dB)", "SSIM", "FA", "RMSE", "MD", "RMSE", "(1e-3", "mm2/s)"]
    assert lines[2].split() == ["noisy", "25.12", "0.6123", "0.2000", "0.1500"]
    assert lines[3].split() == ["DDM2", "inf", "0.9000", "-", "-"]
    with_snr = format_score_table({"noisy": {"delta_snr": 0.0}, "MP-PCA": {"delta_snr": 1.234, "delta_cnr": -0.5}})
    assert "dSNR (CC)" in with_snr and "+1.23" in with_snr and "-0.50" in with_snr


def test_compare_methods_adds_the_dipy_baselines_and_writes_the_four_files(phantom, tmp_path):
    noisy, truth = phantom
    rng = np.random.default_rng(2)
    results = {"Stage I": truth.data + rng.normal(0, 10, truth.data.shape),
               "DDM2": truth.data + rng.normal(0, 4, truth.data.shape)}
    summary = compare_methods(noisy, results, truth, tmp_path)
    assert list(summary["rows"]) == ["noisy", "MP-PCA", "Patch2Self", "Stage I", "DDM2"]
    rows = summary["rows"]
    assert rows["DDM2"]["psnr_db"] > rows["Stage I"]["psnr_db"] > rows["noisy"]["psnr_db"]
    assert rows["MP-PCA"]["psnr_db"] > rows["noisy"]["psnr_db"] + 3  # the baseline really ran
    for name in ("compare.json", "compare.txt", "compare.png", "compare.html"):
        assert (tmp_path / name).stat().st_size > 200, name
    assert json.loads((tmp_path / "compare.json").read_text())["rows"]["DDM2"]["ssim"] == pytest.approx(
        rows["DDM2"]["ssim"])
    text = (tmp_path / "compare.txt").read_text()
    assert all(name in text for name in rows) and "dSNR" in text


def test_compare_methods_uses_a_supplied_baseline_instead_of_running_it(phantom, tmp_path):
    noisy, truth = phantom
    summary = compare_methods(noisy, {"mppca": truth.data}, truth, tmp_path)
    assert list(summary["rows"]) == ["noisy", "mppca", "Patch2Self"]
    assert summary["rows"]["mppca"]["psnr_db"] is None  # identical to the truth: inf, stored as null
    assert summary["rows"]["mppca"]["fa_rmse"] < 1e-6
