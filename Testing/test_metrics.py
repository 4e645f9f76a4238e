"""ddm2.maps (DTI maps of known tensors) and ddm2.metrics: PSNR/SSIM, SNR/CNR in the CC, outliers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ddm2 import maps, metrics

B_VALUE = 1000.0


def gradient_scheme(n_directions: int = 32, n_b0: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A repulsion-optimised hemisphere of unit directions at b = 1000 plus b = 0 volumes."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(0)
    theta, phi = np.arccos(rng.uniform(0, 1, n_directions)), rng.uniform(0, 2 * np.pi, n_directions)
    directions, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 2000)
    bvecs = np.vstack([np.zeros((n_b0, 3)), directions.vertices])
    bvals = np.r_[np.zeros(n_b0), np.full(n_directions, B_VALUE)]
    return bvals, bvecs


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


# eigenvalues (mm^2/s) and eigenvector frames (columns) of four tissue blocks
KNOWN_TENSORS = [
    (np.array([1.7e-3, 0.3e-3, 0.3e-3]), np.eye(3)),                                   # CC-like, along x
    (np.array([1.4e-3, 0.5e-3, 0.35e-3]), rotation([1, 1, 0], 0.7)),                  # oblique fibre
    (np.array([0.8e-3, 0.8e-3, 0.8e-3]), np.eye(3)),                                   # isotropic
    (np.array([1.1e-3, 0.9e-3, 0.2e-3]), rotation([0.2, -1, 0.5], 1.1)),              # planar
]


def known_tensor_dwi(s0: float = 1000.0):
    """(4, 4, 3, N) noise-free signal S0 exp(-b g^T D g); block k fills x index k."""
    bvals, bvecs = gradient_scheme()
    data = np.zeros((4, 4, 3, bvals.size))
    for k, (evals, evecs) in enumerate(KNOWN_TENSORS):
        tensor = evecs @ np.diag(evals) @ evecs.T
        data[k] = s0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, tensor, bvecs))
    return data, bvals, bvecs


def analytic_maps(evals: np.ndarray) -> dict[str, float]:
    md = evals.mean()
    fa = np.sqrt(1.5 * np.sum((evals - md) ** 2) / np.sum(evals ** 2))
    return {"fa": fa, "md": md, "ad": evals[0], "rd": evals[1:].mean()}


# ------------------------------------------------------------------------------- DTI maps (issue 4)

def test_dti_maps_of_known_tensors_match_the_analytic_values():
    data, bvals, bvecs = known_tensor_dwi()
    result = maps.dti_maps(data, bvals, bvecs)
    for k, (evals, _) in enumerate(KNOWN_TENSORS):
        expected = analytic_maps(evals)
        # noise-free signal: the WLS fit is exact up to float32 storage of the maps
        assert np.allclose(result["fa"][k], expected["fa"], rtol=0, atol=1e-5), k
        for name in ("md", "ad", "rd"):
            assert np.allclose(result[name][k], expected[name], rtol=1e-5, atol=0), (k, name)
    # the principal direction of the x-oriented block is pure red in colour FA
    assert np.allclose(result["color_fa"][0], [analytic_maps(KNOWN_TENSORS[0][0])["fa"], 0, 0], atol=1e-5)


def test_dti_maps_match_a_direct_dipy_tensor_fit_to_1e6():
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    data, bvals, bvecs = known_tensor_dwi()
    rng = np.random.default_rng(1)
    data = data + rng.normal(0, 20, data.shape)  # noise, so the comparison is not trivially exact
    result = maps.dti_maps(data, bvals, bvecs)
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method="WLS").fit(data)
    for name in ("fa", "md", "ad", "rd"):
        assert np.max(np.abs(result[name] - np.nan_to_num(getattr(fit, name)))) < 1e-6, name


def test_dti_maps_fitted_a_few_slices_at_a_time_equal_one_whole_fit(monkeypatch):
    """Large scans are fitted in chunks of slices (memory); the maps must not show where chunks meet."""
    rng = np.random.default_rng(4)
    data, bvals, bvecs = known_tensor_dwi()
    data = np.concatenate([data] * 5, axis=2) + rng.normal(0, 20, (data.shape[0], data.shape[1], 5 * data.shape[2],
                                                                     data.shape[3]))
    mask = rng.uniform(size=data.shape[:3]) > 0.2
    whole = maps.dti_maps(data, bvals, bvecs, mask=mask)
    monkeypatch.setattr(maps, "FIT_CHUNK_VALUES", data.shape[0] * data.shape[1] * data.shape[3] * 2)
    chunked = maps.dti_maps(data, bvals, bvecs, mask=mask)  # two slices per fit
    for name in maps.MAP_NAMES:
        np.testing.assert_array_equal(chunked[name], whole[name])
    assert whole["fa"][mask].min() > 0 and not whole["fa"][~mask].any()


# ------------------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_of_a_constant_offset_inside_the_mask_is_20_log10_range_over_offset():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 100, (12, 12, 5, 3))
    mask = np.zeros((12, 12, 5), dtype=bool)
    mask[2:10, 2:10, 1:4] = True
    estimate = truth + 2.0 * mask[..., None] + 50.0 * ~mask[..., None]  # outside must not count
    peak = truth[mask].max()
    assert metrics.psnr(estimate, truth, mask) == pytest.approx(20 * np.log10(peak / 2.0), abs=1e-9)
    assert metrics.psnr(estimate, truth, mask, data_range=100.0) == pytest.approx(20 * np.log10(50.0))
    assert metrics.psnr(truth, truth, mask) == float("inf")


def test_ssim_of_an_offset_constant_image_matches_the_closed_form():
    truth = np.full((16, 16, 3), 40.0)
    offset, peak = 10.0, 100.0
    # constant images: structure term is 1, luminance term is (2 mu (mu + c) + C1) / (mu^2 + (mu + c)^2 + C1)
    c1 = (0.01 * peak) ** 2
    expected = (2 * 40 * 50 + c1) / (40 ** 2 + 50 ** 2 + c1)
    assert metrics.ssim(truth + offset, truth, data_range=peak) == pytest.approx(expected, abs=1e-12)
    assert metrics.ssim(truth, truth, data_range=peak) == pytest.approx(1.0)


def test_ssim_falls_as_noise_grows_and_ignores_the_outside_of_the_mask():
    rng = np.random.default_rng(3)
    x, y = np.meshgrid(np.linspace(0, 6, 24), np.linspace(0, 6, 24), indexing="ij")
    truth = np.repeat((100 + 50 * np.sin(x) * np.cos(y))[..., None], 4, axis=2)
    scores = [metrics.ssim(truth + rng.normal(0, sigma, truth.shape), truth) for sigma in (1, 5, 20)]
    assert scores[0] > scores[1] > scores[2]
    assert scores[0] > 0.95 and scores[2] < 0.6
    mask = np.zeros(truth.shape, dtype=bool)
    mask[:12] = True
    spoiled = truth.copy()
    spoiled[16:] += rng.normal(0, 30, spoiled[16:].shape)  # beyond the 7 x 7 window's reach of the mask
    assert metrics.ssim(spoiled, truth, mask) == pytest.approx(1.0)


def test_psnr_and_ssim_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="estimate has shape"):
        metrics.psnr(np.zeros((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="mask must have the spatial shape"):
        metrics.ssim(np.ones((8, 8, 4)), np.ones((8, 8, 4)), mask=np.ones((8, 8), dtype=bool))


def test_score_against_truth_is_perfect_for_the_truth_and_worse_for_noise():
    data, bvals, bvecs = known_tensor_dwi()
    mask = np.ones(data.shape[:3], dtype=bool)
    perfect = metrics.score_against_truth(data, data, bvals, bvecs, mask)
    assert perfect["psnr_db"] == float("inf") and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["fa_rmse"] < 1e-6 and perfect["md_rmse"] < 1e-9
    noisy = data + np.random.default_rng(4).normal(0, 30, data.shape)
    scores = metrics.score_against_truth(noisy, data, bvals, bvecs, mask)
    weighted = bvals > 50
    expected_psnr = 10 * np.log10(data[..., weighted].max() ** 2
                                  / np.mean((noisy - data)[..., weighted] ** 2))
    assert scores["psnr_db"] == pytest.approx(expected_psnr)
    assert 0.01 < scores["fa_rmse"] < 0.5 and scores["ssim"] < 1.0


# ------------------------------------------------------------------------- SNR / CNR in the CC

def dipy_small_data_fixture():
    """dipy's shipped small_64D (10 x 10 x 10, 64 directions) in a 40^3 noisy background, with a
    left-right fibre block embedded so that the CC segmentation has voxels."""
    import nibabel as nib
    from dipy.data import get_fnames

    image_path, bval_path, bvec_path = get_fnames(name="small_64D")
    small = np.asarray(nib.load(image_path).dataobj, dtype=np.float64)
    bvals = np.loadtxt(bval_path)
    bvecs = np.nan_to_num(np.loadtxt(bvec_path))
    bvecs[bvals <= 50] = 0.0
    rng = np.random.default_rng(5)
    data = np.abs(rng.normal(0, 15, (40, 40, 40, bvals.size)) + 1j * rng.normal(0, 15, (40, 40, 40, bvals.size)))
    data[15:25, 15:25, 15:25] = small
    s0 = small[..., bvals <= 50].mean()
    tensor = np.diag([1.7e-3, 0.25e-3, 0.25e-3])
    fibre = s0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, tensor, bvecs))
    data[18:22, 19:21, 19:21] = fibre + rng.normal(0, 5, (4, 2, 2, bvals.size))
    return data, bvals, bvecs


def direct_dipy_snr_cnr(data, bvals, bvecs, denoised):
    """dipy's snr_in_cc example, written out, per volume, on raw and per-slice-normalised data."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel
    from dipy.segment.mask import bounding_box, median_otsu, segment_from_cfa
    from scipy.ndimage import binary_dilation

    _, mask = median_otsu(data, vol_idx=[0])
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(data, mask=mask)
    mins, maxs = bounding_box(mask)
    mins, maxs = np.array(mins), np.array(maxs)
    diff = (maxs - mins) // 4
    low, high = mins + diff, maxs - diff
    box = np.zeros(data.shape[:3])
    box[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = 1
    cc = segment_from_cfa(fit, box, (0.6, 1, 0, 0.1, 0, 0.1))
    noise = ~binary_dilation(mask, iterations=10)

    def per_volume(x, epsilon):
        signal, std = x[cc].mean(axis=0), x[noise].std(axis=0) + epsilon
        return signal / std, (signal - x[noise].mean(axis=0)) / std

    def normalised(x):
        x = x - x.min(axis=(0, 1), keepdims=True)
        return x / x.max(axis=(0, 1), keepdims=True)

    return ({"dipy": per_volume(data, 0.0), "normalised": per_volume(normalised(data), 0.0)},
            {"dipy": per_volume(denoised, 1e-7), "normalised": per_volume(normalised(denoised), 1e-7)},
            int(cc.sum()))


def test_snr_cnr_reproduces_a_direct_dipy_computation_on_dipy_shipped_data():
    from scipy.ndimage import uniform_filter

    data, bvals, bvecs = dipy_small_data_fixture()
    denoised = uniform_filter(data, size=(3, 3, 3, 1))
    raw_expected, denoised_expected, cc_voxels = direct_dipy_snr_cnr(data, bvals, bvecs, denoised)
    assert cc_voxels >= 8  # the embedded fibre block (16 voxels) is found, maybe not every voxel
    result = metrics.snr_cnr_in_cc(data, bvals, bvecs, denoised=denoised, exclude_zero_background=False)
    assert result["cc_voxels"] == cc_voxels
    weighted = bvals > 50
    for variant in ("dipy", "normalised"):
        entry = result["variants"][variant]
        np.testing.assert_allclose(entry["raw_snr"], raw_expected[variant][0], rtol=1e-10)
        np.testing.assert_allclose(entry["raw_cnr"], raw_expected[variant][1], rtol=1e-10)
        np.testing.assert_allclose(entry["denoised_snr"], denoised_expected[variant][0], rtol=1e-10)
        delta = denoised_expected[variant][0][weighted] - raw_expected[variant][0][weighted]
        assert entry["delta_snr"]["mean"] == pytest.approx(delta.mean(), rel=1e-10)
        assert entry["delta_snr"]["worst"] == pytest.approx(delta.min(), rel=1e-10)
        assert entry["raw_snr_summary"]["mean"] == pytest.approx(raw_expected[variant][0][weighted].mean())
    # smoothing lowers the background std: the SNR must rise in both variants
    assert result["variants"]["dipy"]["delta_snr"]["mean"] > 1.0


def test_zero_filled_background_is_left_out_of_the_noise_region():
    data, bvals, bvecs = dipy_small_data_fixture()
    data[0:4, 34:40, 0:6] = 0.0  # a zero-filled corner, as scanners write outside the reconstructed FOV
    kept = metrics.corpus_callosum_regions(data, bvals, bvecs, exclude_zero_background=False)
    dropped = metrics.corpus_callosum_regions(data, bvals, bvecs)
    assert kept.noise[0:4, 34:40, 0:6].all()
    assert kept.noise.sum() - dropped.noise.sum() == 4 * 6 * 6
    assert not dropped.noise[0:4, 34:40, 0:6].any()


def test_an_empty_corpus_callosum_raises_a_clear_error():
    data, bvals, bvecs = dipy_small_data_fixture()
    data[18:22, 19:21, 19:21] = data[18:22, 19:21, 19:21, :1]  # the fibre block becomes isotropic
    data[15:25, 15:25, 15:25] = data[15:25, 15:25, 15:25, :1]  # and so does all of dipy's tissue
    with pytest.raises(metrics.EmptyRegionError, match="no corpus-callosum voxel"):
        metrics.snr_cnr_in_cc(data, bvals, bvecs)


def test_per_slice_normalisation_maps_slices_to_unit_range_and_constant_slices_to_zero():
    data = np.random.default_rng(6).uniform(5, 9, (6, 5, 3, 2))
    data[:, :, 1, 0] = 7.0
    result = metrics.normalise_slices(data)
    assert np.allclose(result.min(axis=(0, 1))[[0, 2]], 0) and np.allclose(result.max(axis=(0, 1))[[0, 2]], 1)
    assert np.all(result[:, :, 1, 0] == 0)


# --------------------------------------------------------------------------- outliers (appendix F)

def test_flat_rmse_curves_are_flagged_relative_to_the_median_rise():
    rising = [np.linspace(0, rise, length) for rise, length in ((1.0, 12), (0.9, 30), (1.2, 7), (1.1, 20))]
    flat = [np.full(15, 0.05), np.linspace(0.1, 0.3, 9)]  # rises 0 and 0.2
    curves = rising + flat + [np.array([0.4])]  # a one-step chain cannot rise
    # median rise 0.9: threshold 0.225 flags both flat curves and the one-step chain
    assert metrics.flag_flat_curves(curves).tolist() == [False] * 4 + [True, True, True]
    # threshold 0.09 spares the curve that rises by 0.2
    assert metrics.flag_flat_curves(curves, fraction=0.1).tolist() == [False] * 4 + [True, False, True]
    assert metrics.flag_flat_curves([np.zeros(5), np.zeros(3)]).tolist() == [True, True]
    assert metrics.flag_flat_curves([]).shape == (0,)
    with pytest.raises(ValueError, match=r"curves\[1\]"):
        metrics.flag_flat_curves([np.ones(3), np.array([])])


def test_importing_ddm2_metrics_does_not_import_torch():
    code = "import sys, ddm2.metrics, ddm2.baselines, ddm2.report, ddm2.evaluation; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"
