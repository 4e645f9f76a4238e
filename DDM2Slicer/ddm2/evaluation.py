"""Evaluation workflows on DWI objects: `ddm2 evaluate` and `ddm2 compare` without the argument parsing.

The numbers come from :mod:`ddm2.metrics`; this module picks the masks, runs the baselines, turns
results into JSON-ready dicts and readable tables, and writes the compare files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ddm2.dwi import DWI, atomic_path

SCORE_COLUMNS = (("psnr_db", "PSNR (dB)", 1.0, "{:.2f}"), ("ssim", "SSIM", 1.0, "{:.4f}"),
                 ("fa_rmse", "FA RMSE", 1.0, "{:.4f}"), ("md_rmse", "MD RMSE (1e-3 mm2/s)", 1e3, "{:.4f}"))
SNR_COLUMNS = (("delta_snr", "dSNR (CC)", 1.0, "{:+.2f}"), ("delta_cnr", "dCNR (CC)", 1.0, "{:+.2f}"))
MISSING = "-"


def _jsonable(value):
    """numpy arrays and scalars -> lists and floats; inf/NaN -> None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value


def _check_same_acquisition(reference: DWI, other: DWI, name: str) -> None:
    if other.data.shape != reference.data.shape:
        raise ValueError(f"{name} has shape {other.data.shape} but the noisy DWI has "
                         f"{reference.data.shape}: give the same acquisition, all volumes")
    if not np.allclose(other.bvals, reference.bvals, atol=1.0):
        raise ValueError(f"{name} has other b-values than the noisy DWI: give the same acquisition")


def _snr_section(noisy: DWI, denoised: dict[str, np.ndarray], regions=None) -> dict:
    """SNR/CNR of each denoised output against the raw data, or the reason it cannot be computed."""
    from ddm2.metrics import EmptyRegionError, corpus_callosum_regions, snr_cnr_in_cc

    try:
        if regions is None:
            regions = corpus_callosum_regions(noisy.data, noisy.bvals, noisy.bvecs_voxel())
    except EmptyRegionError as error:
        return {"available": False, "reason": str(error)}
    section = {"available": True, "methods": {}}
    for name, data in denoised.items():
        result = snr_cnr_in_cc(noisy.data, noisy.bvals, noisy.bvecs_voxel(), denoised=data,
                               regions=regions)
        section["methods"][name] = result
    return section


def evaluate(noisy: DWI, denoised: DWI, truth: DWI | None = None) -> dict:
    """Score a denoised DWI: SNR/CNR in the corpus callosum and, with a truth, PSNR/SSIM/FA/MD errors.

    Parameters
    ----------
    noisy : the raw DWI (X, Y, Z, N) that was denoised; regions and tensor fit for SNR/CNR come from it.
    denoised : the denoised DWI, same shape and volume order.
    truth : optional noise-free DWI (phantoms); the brain mask for its scores is
        ``ddm2.maps.brain_mask`` of the truth.

    Returns
    -------
    dict (JSON-ready)
        ``input`` (shape, volumes), ``snr_cnr`` (see ``ddm2.metrics.snr_cnr_in_cc``; both variants,
        per-volume lists and summaries; ``{"available": False, "reason": ...}`` when the corpus
        callosum or the background cannot be found) and ``truth`` (None, or PSNR/SSIM/FA/MD errors of
        the ``noisy`` and the ``denoised`` data, so that the gain is visible).
    """
    from ddm2.maps import brain_mask, dti_maps
    from ddm2.metrics import score_against_truth

    _check_same_acquisition(noisy, denoised, "denoised")
    snr = _snr_section(noisy, {"denoised": denoised.data})
    if snr["available"]:
        snr = {"available": True, **snr["methods"]["denoised"]}
    result = {
        "input": {"source": noisy.source, "shape": list(noisy.data.shape),
                  "weighted_volumes": int((~noisy.b0_mask).sum())},
        "snr_cnr": snr,
        "truth": None,
    }
    if truth is not None:
        _check_same_acquisition(noisy, truth, "truth")
        mask = brain_mask(truth.data, truth.bvals)
        truth_maps = dti_maps(truth.data, truth.bvals, truth.bvecs_voxel(), mask=mask)
        result["truth"] = {
            name: score_against_truth(data, truth.data, truth.bvals, truth.bvecs_voxel(), mask,
                                      truth_maps=truth_maps)
            for name, data in (("noisy", noisy.data), ("denoised", denoised.data))}
    return _jsonable(result)


def _cell(row: dict, key: str, scale: float, pattern: str) -> str:
    value = row.get(key)
    if value is None or not np.isfinite(value):
        return "inf" if value is not None and value > 0 else MISSING
    return pattern.format(value * scale)


def format_score_table(rows: dict[str, dict]) -> str:
    """A plain-text table, one row per method, columns PSNR (dB), SSIM, FA RMSE, MD RMSE.

    Parameters
    ----------
    rows : ``{method name: {"psnr_db", "ssim", "fa_rmse", "md_rmse"}}`` (e.g. from
        ``ddm2.metrics.score_against_truth``); missing values print as "-". When any row has
        ``delta_snr`` / ``delta_cnr`` (mean change of the normalised SNR/CNR in the corpus callosum
        against the noisy input), two more columns show them.

    Returns
    -------
    str
        The table, MD RMSE in 1e-3 mm^2/s.
    """
    columns = list(SCORE_COLUMNS)
    if any(key in row for row in rows.values() for key, *_ in SNR_COLUMNS):
        columns += SNR_COLUMNS
    header = ["method"] + [title for _, title, _, _ in columns]
    body = [[name] + [_cell(row, key, scale, pattern) for key, _, scale, pattern in columns]
            for name, row in rows.items()]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0])] + [cell.rjust(width)
                                                        for cell, width in zip(line[1:], widths[1:])])

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule] + [render(line) for line in body])


def _summary_text(summary: dict) -> str:
    return (f"{summary['mean']:+.2f} +/- {summary['std']:.2f}  "
            f"(best {summary['best']:+.2f}, worst {summary['worst']:+.2f})")


def format_evaluation(result: dict) -> str:
    """A readable text report of :func:`evaluate`'s result."""
    lines = []
    snr = result["snr_cnr"]
    if not snr.get("available"):
        lines += ["SNR/CNR in the corpus callosum: not available", f"  {snr.get('reason', '')}"]
    else:
        lines.append(f"SNR/CNR in the corpus callosum (dipy's snr_in_cc protocol): {snr['cc_voxels']} CC "
                     f"voxels, {snr['noise_voxels']} background voxels, "
                     f"{len(snr['weighted_volumes'])} weighted volumes")
        for variant, label in (("dipy", "dipy example, raw intensities"),
                               ("normalised", "DDM2 notebook, per-slice min-max normalised")):
            entry = snr["variants"][variant]
            raw_snr, raw_cnr = entry["raw_snr_summary"], entry["raw_cnr_summary"]
            lines += [f"  {label}:",
                      f"    raw SNR   {raw_snr['mean']:.2f} +/- {raw_snr['std']:.2f}    "
                      f"raw CNR   {raw_cnr['mean']:.2f} +/- {raw_cnr['std']:.2f}"]
            if "delta_snr" in entry:
                lines += [f"    delta SNR {_summary_text(entry['delta_snr'])}",
                          f"    delta CNR {_summary_text(entry['delta_cnr'])}"]
    if result.get("truth"):
        lines += ["", "Against the truth (brain mask; PSNR/SSIM on the weighted volumes):",
                  format_score_table(result["truth"])]
    return "\n".join(lines)


def _baseline_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def compare_methods(dwi: DWI, results: dict[str, np.ndarray], truth: DWI | None,
                    out_dir: str | os.PathLike) -> dict:
    """Score several denoisers on one input; write compare.json, compare.txt and a report.

    Parameters
    ----------
    dwi : the noisy input DWI (X, Y, Z, N).
    results : ``{method name: (X, Y, Z, N) denoised array}`` (e.g. "Stage I", "DDM2"). dipy's MP-PCA and
        Patch2Self are run here, unmasked, when no key names them (matching ignores case and
        punctuation: "mppca", "MP-PCA", "patch2self").
    truth : optional noise-free DWI; adds PSNR/SSIM/FA/MD errors.
    out_dir : folder for ``compare.json``, ``compare.txt``, ``compare.png`` and ``compare.html``.

    Returns
    -------
    dict (JSON-ready, the content of compare.json)
        ``rows`` (``{method: scores}`` in table order, the noisy input first), ``snr_cnr`` (per method,
        both variants), ``table`` (the text of compare.txt) and ``files``.
    """
    from ddm2.baselines import BASELINE_LABELS, denoise_baseline
    from ddm2.maps import brain_mask, dti_maps
    from ddm2.metrics import score_against_truth
    from ddm2.report import write_report

    if dwi.data.ndim != 4:
        raise ValueError(f"dwi must be 4-D (X, Y, Z, N); got shape {dwi.data.shape}")
    for name, data in results.items():
        if np.shape(data) != dwi.data.shape:
            raise ValueError(f"results[{name!r}] has shape {np.shape(data)}; expected {dwi.data.shape}")
    given = {_baseline_key(name): name for name in results}
    methods: dict[str, np.ndarray] = {"noisy": dwi.data}
    for key, label in BASELINE_LABELS.items():
        methods[given.get(key, label)] = (np.asarray(results[given[key]], dtype=np.float32)
                                          if key in given else denoise_baseline(key, dwi.data, dwi.bvals))
    for name, data in results.items():
        methods.setdefault(name, np.asarray(data, dtype=np.float32))

    rows: dict[str, dict] = {name: {} for name in methods}
    snr = _snr_section(dwi, {name: data for name, data in methods.items() if name != "noisy"})
    if snr["available"]:
        for name, entry in snr["methods"].items():
            normalised = entry["variants"]["normalised"]
            rows[name].update(delta_snr=normalised["delta_snr"]["mean"],
                              delta_cnr=normalised["delta_cnr"]["mean"])
        rows["noisy"].update(delta_snr=0.0, delta_cnr=0.0)
    if truth is not None:
        _check_same_acquisition(dwi, truth, "truth")
        mask = brain_mask(truth.data, truth.bvals)
        truth_maps = dti_maps(truth.data, truth.bvals, truth.bvecs_voxel(), mask=mask)
        for name, data in methods.items():
            rows[name].update(score_against_truth(data, truth.data, truth.bvals, truth.bvecs_voxel(),
                                                  mask, truth_maps=truth_maps))

    table = format_score_table(rows)
    if snr["available"]:
        table += ("\n\ndSNR/dCNR: mean change over the weighted volumes of the per-slice-normalised "
                  "SNR/CNR in the corpus callosum (DDM2 notebook variant) against the noisy input.")
    else:
        table += f"\n\nSNR/CNR not available: {snr['reason']}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The report shows the last method given (the full pipeline when the CLI calls this), else a baseline.
    shown = list(results)[-1] if results else BASELINE_LABELS["mppca"]
    files = write_report(dwi, dwi.with_data(methods[shown]), out_dir / "compare.png",
                         out_dir / "compare.html", title=f"Comparison on {Path(dwi.source).name or 'input'}"
                         f": {shown} shown", table=table)
    with atomic_path(out_dir / "compare.txt") as temporary:
        temporary.write_text(table + "\n", encoding="utf-8")
    summary = _jsonable({"rows": rows, "snr_cnr": snr, "table": table,
                         "files": [str(path) for path in files]
                         + [str(out_dir / "compare.txt"), str(out_dir / "compare.json")]})
    with atomic_path(out_dir / "compare.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
