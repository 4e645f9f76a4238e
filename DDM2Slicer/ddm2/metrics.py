"""Image-quality numbers: PSNR/SSIM against a truth, SNR/CNR in the corpus callosum, outlier slices.

Arrays in, numbers out; nothing here reads or writes files.

* :func:`psnr`, :func:`ssim` and :func:`score_against_truth` need a noise-free truth (phantoms).
* :func:`snr_cnr_in_cc` follows dipy's ``snr_in_cc`` example and the DDM2 authors' notebook built on it
  (``quantitative_metrics.ipynb``): it needs no truth, so it is the number reported for real scans.
* :func:`flag_flat_curves` is the per-slice outlier score of the DDM2 paper's appendix F.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

B0_THRESHOLD = 50.0  # s/mm^2, the same rule as ddm2.dwi: volumes at or below are b = 0
CC_THRESHOLD = (0.6, 1.0, 0.0, 0.1, 0.0, 0.1)  # colour-FA bounds (R min, R max, G ..., B ...): "very red"
NOISE_DILATION_ITERATIONS = 10
DENOISED_EPSILON = 1e-7  # the DDM2 notebook's guard for a denoiser that flattens the background
FLAT_CURVE_FRACTION = 0.25  # appendix F check: a rise below this share of the median rise is flat


class EmptyRegionError(ValueError):
    """The corpus-callosum or background region is empty, so SNR/CNR cannot be computed."""


# ------------------------------------------------------------------------------- against a truth

def _check_pair(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if truth.ndim not in (3, 4):
        raise ValueError(f"truth must be 3-D (X, Y, Z) or 4-D (X, Y, Z, N); got shape {truth.shape}")
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate has shape {estimate.shape} but truth has {truth.shape}: "
                         "they must match")
    if mask is None:
        mask = np.ones(truth.shape[:3], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != truth.shape[:3]:
        raise ValueError(f"mask must have the spatial shape {truth.shape[:3]}; got {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: give a mask with at least one voxel (or None for all voxels)")
    return estimate, truth, mask


def _default_range(truth: np.ndarray, mask: np.ndarray, data_range: float | None) -> float:
    if data_range is None:
        data_range = float(truth[mask].max())
    if not data_range > 0:
        raise ValueError(f"data_range must be positive; got {data_range} (the truth's maximum inside "
                         "the mask): pass data_range explicitly")
    return float(data_range)


def psnr(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``estimate`` against ``truth`` inside a mask, in dB.

    Parameters
    ----------
    estimate, truth : (X, Y, Z) or (X, Y, Z, N) arrays of the same shape. For 4-D arrays every volume
        given counts (select the volumes before calling, e.g. the diffusion-weighted ones).
    mask : optional (X, Y, Z) boolean array; all voxels when None. A 3-D mask applies to every volume.
    data_range : peak value; default the truth's maximum inside the mask.

    Returns
    -------
    float
        ``10 log10(data_range^2 / MSE)`` with the MSE over the masked voxels of all volumes;
        ``inf`` when the estimate equals the truth there.
    """
    estimate, truth, mask = _check_pair(estimate, truth, mask)
    peak = _default_range(truth, mask, data_range)
    mse = float(np.mean((estimate[mask] - truth[mask]) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(peak ** 2 / mse))


def ssim(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None) -> float:
    """Mean structural similarity inside a mask, computed slice by slice on axial (X, Y) slices.

    Parameters
    ----------
    estimate, truth : (X, Y, Z) or (X, Y, Z, N) arrays of the same shape.
    mask : optional (X, Y, Z) boolean array; all voxels when None.
    data_range : peak-to-peak range for the SSIM constants; default the truth's maximum inside the mask.

    Returns
    -------
    float
        The SSIM map of every axial slice of every volume (``skimage.metrics.structural_similarity``
        with its default 7 x 7 uniform window, smaller on slices narrower than 7 voxels) averaged over the
        masked voxels. Averaging the map inside the mask, rather than averaging whole-slice SSIMs over
        slices that touch the mask, keeps the background, which dominates the field of view and is
        trivially similar after any smoothing, out of the score.

    Notes
    -----
    Wang Z. et al., Image quality assessment: from error visibility to structural similarity.
    IEEE TIP 13(4), 2004.
    """
    from skimage.metrics import structural_similarity

    estimate, truth, mask = _check_pair(estimate, truth, mask)
    peak = _default_range(truth, mask, data_range)
    if truth.ndim == 3:
        estimate, truth = estimate[..., None], truth[..., None]
    window = min(7, *truth.shape[:2])
    window -= 1 - window % 2  # skimage needs an odd window
    if window < 3:
        raise ValueError(f"axial slices of shape {truth.shape[:2]} are too small for SSIM (need >= 3 x 3)")
    total, count = 0.0, 0
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        inside = mask[:, :, z]
        for v in range(truth.shape[3]):
            _, similarity = structural_similarity(estimate[:, :, z, v], truth[:, :, z, v], win_size=window,
                                                  data_range=peak, full=True)
            total += float(similarity[inside].sum())
            count += int(inside.sum())
    return total / count


def score_against_truth(estimate: np.ndarray, truth: np.ndarray, bvals: np.ndarray,
                        bvecs_voxel: np.ndarray, mask: np.ndarray,
                        truth_maps: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """PSNR and SSIM on the diffusion-weighted volumes and FA/MD errors, all inside a brain mask.

    Parameters
    ----------
    estimate, truth : (X, Y, Z, N) arrays of the same shape (all volumes, b = 0 included).
    bvals : (N,) b-values (s/mm^2); volumes above 50 s/mm^2 are the diffusion-weighted ones scored.
    bvecs_voxel : (N, 3) gradient directions along the voxel axes (``DWI.bvecs_voxel()``).
    mask : (X, Y, Z) boolean brain mask.
    truth_maps : optional output of ``ddm2.maps.dti_maps`` on the truth (saves one fit when scoring
        several estimates); fitted from ``truth`` when None.

    Returns
    -------
    dict
        ``psnr_db``, ``ssim`` (data range: the truth's maximum on the diffusion-weighted volumes inside
        the mask), ``fa_rmse`` (unitless), ``md_rmse`` (mm^2/s) and ``mask_voxels``.
    """
    from ddm2.maps import dti_maps

    estimate, truth, mask = _check_pair(estimate, truth, mask)
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    if truth.ndim != 4 or bvals.shape[0] != truth.shape[3]:
        raise ValueError(f"truth must be 4-D with one b-value per volume; got shape {truth.shape} and "
                         f"{bvals.shape[0]} b-values")
    bvecs_voxel = np.asarray(bvecs_voxel, dtype=np.float64)
    if bvecs_voxel.shape != (truth.shape[3], 3):
        raise ValueError(f"bvecs_voxel must have shape ({truth.shape[3]}, 3); got {bvecs_voxel.shape}")
    weighted = bvals > B0_THRESHOLD
    if not weighted.any():
        raise ValueError("bvals has no diffusion-weighted volume (all <= 50 s/mm^2): nothing to score")

    peak = float(truth[..., weighted][mask].max())
    if truth_maps is None:
        truth_maps = dti_maps(truth, bvals, bvecs_voxel, mask=mask)
    estimate_maps = dti_maps(estimate, bvals, bvecs_voxel, mask=mask)

    def rmse(name: str) -> float:
        difference = estimate_maps[name][mask].astype(np.float64) - truth_maps[name][mask]
        return float(np.sqrt(np.mean(difference ** 2)))

    return {
        "psnr_db": psnr(estimate[..., weighted], truth[..., weighted], mask, data_range=peak),
        "ssim": ssim(estimate[..., weighted], truth[..., weighted], mask, data_range=peak),
        "fa_rmse": rmse("fa"),
        "md_rmse": rmse("md"),
        "mask_voxels": int(mask.sum()),
    }


# ---------------------------------------------------------------------- SNR/CNR in the corpus callosum

@dataclass
class CorpusCallosumRegions:
    """The regions of dipy's ``snr_in_cc`` protocol, all (X, Y, Z) boolean arrays.

    Attributes
    ----------
    brain : brain mask (median_otsu on the first b = 0 volume, or the mask given).
    box : central box of the brain's bounding box, shrunk by a quarter of its size on each side.
    cc : corpus-callosum voxels: "very red" colour-FA voxels inside ``box``.
    noise : background: outside the brain mask dilated 10 times.
    """

    brain: np.ndarray
    box: np.ndarray
    cc: np.ndarray
    noise: np.ndarray


def corpus_callosum_regions(raw: np.ndarray, bvals: np.ndarray, bvecs_voxel: np.ndarray,
                            mask: np.ndarray | None = None,
                            exclude_zero_background: bool = True) -> CorpusCallosumRegions:
    """Segment the corpus callosum and the background noise region of a raw DWI (dipy's protocol).

    Parameters
    ----------
    raw : (X, Y, Z, N) raw (not denoised) DWI; the tensor fit that finds the CC uses it.
    bvals : (N,) b-values (s/mm^2).
    bvecs_voxel : (N, 3) gradient directions along the voxel axes.
    mask : optional (X, Y, Z) brain mask; default dipy's ``median_otsu`` on the first b = 0 volume with
        its default parameters, as in dipy's example and the DDM2 notebook.
    exclude_zero_background : drop from the noise region the voxels that are exactly 0 in every raw
        volume. Some scanners (Philips among them) zero-fill outside the reconstructed field of view;
        those voxels hold no noise and would bias the noise standard deviation. They cannot occur with
        real noise, so the option changes nothing on data without zero-filling.

    Returns
    -------
    CorpusCallosumRegions

    Raises
    ------
    EmptyRegionError
        If the corpus-callosum or the noise region is empty.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel
    from dipy.segment.mask import bounding_box, median_otsu, segment_from_cfa
    from scipy.ndimage import binary_dilation

    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 4:
        raise ValueError(f"raw must be 4-D (X, Y, Z, N); got shape {raw.shape}")
    n = raw.shape[3]
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    bvecs = np.array(bvecs_voxel, dtype=np.float64)
    if bvals.shape != (n,) or bvecs.shape != (n, 3):
        raise ValueError(f"bvals must have shape ({n},) and bvecs_voxel ({n}, 3); got {bvals.shape} "
                         f"and {bvecs.shape}")
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise ValueError("bvals has no b = 0 volume: the brain mask and the tensor fit need one")
    if mask is None:
        _, mask = median_otsu(raw, vol_idx=[int(np.flatnonzero(b0)[0])])
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != raw.shape[:3]:
        raise ValueError(f"mask must have shape {raw.shape[:3]}; got {mask.shape}")
    if not mask.any():
        raise EmptyRegionError("the brain mask is empty: SNR/CNR in the corpus callosum cannot be computed")

    bvecs[b0] = 0.0
    table = gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)
    fit = TensorModel(table).fit(raw, mask=mask)

    mins, maxs = (np.array(bound) for bound in bounding_box(mask))
    margin = (maxs - mins) // 4
    low, high = mins + margin, maxs - margin
    box = np.zeros(mask.shape, dtype=bool)
    box[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    cc = segment_from_cfa(fit, box, CC_THRESHOLD)
    if not cc.any():
        raise EmptyRegionError(
            "no corpus-callosum voxel found: no voxel in the central box of the brain mask has a colour FA "
            "with red 0.6-1 and green, blue 0-0.1 (left-right fibres with FA >= 0.6). This happens with "
            "noisy data, few gradient directions, a field of view without the corpus callosum, or a scan "
            "whose voxel x axis is not left-right; SNR/CNR in the CC cannot be computed for it")

    noise = ~binary_dilation(mask, iterations=NOISE_DILATION_ITERATIONS)
    if exclude_zero_background:
        noise &= ~(raw == 0).all(axis=3)
    if not noise.any():
        raise EmptyRegionError(
            "no background voxel is left outside the brain mask dilated 10 times (the field of view is "
            "too tight around the head, or the background is zero-filled): SNR/CNR need a noise region")
    return CorpusCallosumRegions(brain=mask, box=box, cc=cc, noise=noise)


def normalise_slices(data: np.ndarray) -> np.ndarray:
    """Min-max normalise every axial slice of every volume to [0, 1] (the DDM2 notebook's step).

    Constant slices (e.g. zero-filled ones) become 0 instead of NaN.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 4:
        raise ValueError(f"data must be 4-D (X, Y, Z, N); got shape {data.shape}")
    low = data.min(axis=(0, 1), keepdims=True)
    spread = data.max(axis=(0, 1), keepdims=True) - low
    return np.divide(data - low, spread, out=np.zeros_like(data), where=spread > 0)


def snr_cnr(data: np.ndarray, regions: CorpusCallosumRegions, epsilon: float = 0.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume SNR and CNR: ``mean(CC) / std(noise)`` and ``(mean(CC) - mean(noise)) / std(noise)``.

    Parameters
    ----------
    data : (X, Y, Z, N) array, raw or denoised, in the units to score.
    regions : the regions from :func:`corpus_callosum_regions` (always found on the raw data).
    epsilon : added to the noise standard deviation (the notebook uses 1e-7 on denoised data).

    Returns
    -------
    snr, cnr : (N,) float64 arrays.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 4 or data.shape[:3] != regions.cc.shape:
        raise ValueError(f"data must have shape {regions.cc.shape} + (N,); got {data.shape}")
    signal = data[regions.cc].mean(axis=0)
    background = data[regions.noise]
    spread = background.std(axis=0) + epsilon
    with np.errstate(divide="ignore", invalid="ignore"):
        return signal / spread, (signal - background.mean(axis=0)) / spread


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "best": float(np.max(values)), "worst": float(np.min(values))}


def snr_cnr_in_cc(raw: np.ndarray, bvals: np.ndarray, bvecs_voxel: np.ndarray,
                  denoised: np.ndarray | None = None, mask: np.ndarray | None = None,
                  exclude_zero_background: bool = True,
                  regions: CorpusCallosumRegions | None = None) -> dict:
    """SNR and CNR in the corpus callosum per volume, in dipy's and in the DDM2 authors' variant.

    Parameters
    ----------
    raw : (X, Y, Z, N) raw DWI. The brain mask, the tensor fit and both regions come from it.
    bvals : (N,) b-values (s/mm^2).
    bvecs_voxel : (N, 3) gradient directions along the voxel axes.
    denoised : optional (X, Y, Z, N) denoised DWI, volumes in the raw order (b = 0 included).
    mask : optional brain mask; see :func:`corpus_callosum_regions`.
    exclude_zero_background : see :func:`corpus_callosum_regions`.
    regions : optional regions from :func:`corpus_callosum_regions` on this raw DWI; found when None
        (pass them to score several denoised outputs with one tensor fit).

    Returns
    -------
    dict
        ``cc_voxels``, ``noise_voxels``, ``brain_voxels``, ``weighted_volumes`` (indices of the b > 50
        volumes that the summaries use) and ``variants``: ``{"dipy": ..., "normalised": ...}``, each
        with per-volume ``raw_snr``, ``raw_cnr`` arrays (N,), summaries ``raw_snr_summary`` and
        ``raw_cnr_summary`` (mean/std/best/worst over the weighted volumes) and, with ``denoised``,
        ``denoised_snr``, ``denoised_cnr``, ``delta_snr`` and ``delta_cnr`` (denoised - raw on the
        weighted volumes, as a summary).

    Raises
    ------
    EmptyRegionError
        If the corpus callosum or the background region is empty.

    Notes
    -----
    * ``"dipy"``: raw intensities, as in dipy's ``snr_in_cc`` example (Descoteaux 2011, Jones 2013).
    * ``"normalised"``: every axial slice of every volume min-max normalised to [0, 1] first, and 1e-7
      added to the denoised data's noise std, as in the DDM2 notebook (Xiang et al., ICLR 2023), whose
      Stanford HARDI figures (raw SNR 5.11 +/- 2.50) are quoted in the paper.
    * Both variants use one noise standard deviation per volume, as the DDM2 notebook does; dipy's
      example pools it over all volumes and also drops the inferior half of the slices from the noise
      region. Keeping one region and one estimator makes the two variants differ only in normalisation.
    """
    if regions is None:
        regions = corpus_callosum_regions(raw, bvals, bvecs_voxel, mask=mask,
                                          exclude_zero_background=exclude_zero_background)
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 4 or raw.shape[:3] != regions.cc.shape:
        raise ValueError(f"raw must have shape {regions.cc.shape} + (N,); got {raw.shape}")
    if denoised is not None:
        denoised = np.asarray(denoised, dtype=np.float64)
        if denoised.shape != raw.shape:
            raise ValueError(f"denoised has shape {denoised.shape} but raw has {raw.shape}: give all "
                             "volumes of the denoised DWI in the raw order")
    weighted = np.flatnonzero(np.asarray(bvals, dtype=np.float64).reshape(-1) > B0_THRESHOLD)
    if weighted.size == 0:
        raise ValueError("bvals has no diffusion-weighted volume: the SNR/CNR summaries need one")

    result: dict = {"cc_voxels": int(regions.cc.sum()), "noise_voxels": int(regions.noise.sum()),
                    "brain_voxels": int(regions.brain.sum()), "weighted_volumes": weighted.tolist(),
                    "variants": {}}
    for variant, prepare in (("dipy", lambda x: x), ("normalised", normalise_slices)):
        raw_snr, raw_cnr = snr_cnr(prepare(raw), regions)
        entry = {"raw_snr": raw_snr, "raw_cnr": raw_cnr,
                 "raw_snr_summary": _summary(raw_snr[weighted]),
                 "raw_cnr_summary": _summary(raw_cnr[weighted])}
        if denoised is not None:
            snr, cnr = snr_cnr(prepare(denoised), regions, epsilon=DENOISED_EPSILON)
            entry.update(denoised_snr=snr, denoised_cnr=cnr,
                         delta_snr=_summary(snr[weighted] - raw_snr[weighted]),
                         delta_cnr=_summary(cnr[weighted] - raw_cnr[weighted]))
        result["variants"][variant] = entry
    return result


# ------------------------------------------------------------------------- outlier slices (app. F)

def curve_rises(curves: list[np.ndarray]) -> np.ndarray:
    """Final minus initial value of each curve (0 for a curve of one point)."""
    rises = []
    for index, curve in enumerate(curves):
        curve = np.asarray(curve, dtype=np.float64).reshape(-1)
        if curve.size == 0 or not np.isfinite(curve).all():
            raise ValueError(f"curves[{index}] must be a non-empty 1-D array of finite RMSE values")
        rises.append(curve[-1] - curve[0])
    return np.asarray(rises, dtype=np.float64)


def flag_flat_curves(curves: list[np.ndarray], fraction: float = FLAT_CURVE_FRACTION) -> np.ndarray:
    """Flag the slices whose RMSE curve along the reverse chain stays flat (DDM2 paper, appendix F).

    Parameters
    ----------
    curves : one 1-D array per slice: the RMSE between the initial noisy input and each intermediate
        estimate of the reverse chain, in chain order, led by the input itself (0), as
        ``ddm2.sampler.denoise_slices`` returns them. Lengths may differ (each slice has its own matched
        state t*).
    fraction : a slice is flagged when its rise is below ``fraction`` times the median rise of all slices.

    Returns
    -------
    (len(curves),) bool array, True for flagged slices.

    Notes
    -----
    The rise of a curve is its last value minus its first: with the input leading, how far the chain
    moved the slice from the noisy input, which is the paper's measure ("the poorly denoised slice
    cannot achieve as high RMSE value") and works for a one-step chain too. On a slice the model
    denoises, the estimate moves away from the noisy input as the chain runs, so the RMSE grows; on a
    failed slice the chain hardly changes the input and the curve stays flat. The rule is relative to
    the median so that it does not depend on the intensity scale or the noise level. When the median
    rise is not positive, the typical slice is itself flat, there is no reference, and every slice is
    flagged: the whole run needs a look, not a few slices.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    if len(curves) == 0:
        return np.zeros(0, dtype=bool)
    rises = curve_rises(curves)
    reference = float(np.median(rises))
    if reference <= 0:
        return np.ones(len(rises), dtype=bool)
    return rises < fraction * reference
