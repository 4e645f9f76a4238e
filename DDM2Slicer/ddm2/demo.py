"""`ddm2 demo`: the phantom through the whole pipeline, scored against its truth and dipy's baselines
(and any other input with a known truth, for the benchmarks)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ddm2 import dwi as dwi_io
from ddm2.phantom import Phantom
from ddm2.pipeline import Settings, denoise, write_json
from ddm2.progress import Reporter


def run_demo(out: Path, settings: Settings, reporter: Reporter, *, snr: float = 10.0, device: str = "auto",
             resume: bool = False, baselines: bool = True) -> str:
    """Make the phantom, denoise it in ``out``, score every method; returns the printed table."""
    from ddm2.phantom import make_phantom

    return run_with_truth(make_phantom(snr=snr, seed=settings.seed), out, settings, reporter,
                          title=f"phantom, SNR {snr:g}", device=device, resume=resume, baselines=baselines)


def run_with_truth(phantom: Phantom, out: Path, settings: Settings, reporter: Reporter, *, title: str,
                   device: str = "auto", resume: bool = False, baselines: bool = True) -> str:
    """Denoise ``phantom.noisy`` in ``out`` and score the noisy input, dipy's baselines, Stage I and DDM2
    against ``phantom.truth`` inside ``phantom.mask``: demo_scores.json, report.png/html and the returned
    table."""
    from ddm2.baselines import denoise_baseline
    from ddm2.evaluation import format_score_table
    from ddm2.metrics import score_against_truth
    from ddm2.report import write_report

    noisy_path = out / "phantom" / "noisy.nii.gz"
    # a known-truth run is deterministic: a run directory it already used is picked up where it stopped
    resume = resume or (out / "run.json").exists()
    if not resume:
        dwi_io.save_nifti(phantom.noisy, noisy_path)
        dwi_io.save_nifti(phantom.truth, out / "phantom" / "truth.nii.gz")
        dwi_io.save_volume(phantom.mask.astype("float32"), phantom.truth.affine, out / "phantom" / "mask.nii.gz")
    reporter.log(f"{title}: {phantom.noisy.data.shape} (sigma {phantom.sigma:.1f})")
    started = time.monotonic()
    # the report below adds Stage I and the score table
    result = denoise(noisy_path, out, replace(settings, write_report=False), reporter, device=device,
                     resume=resume)
    seconds = time.monotonic() - started

    truth = phantom.truth
    bvecs = truth.bvecs_voxel()
    from ddm2.maps import dti_maps

    truth_maps = dti_maps(truth.data, truth.bvals, bvecs, mask=phantom.mask)
    estimates = {"noisy": phantom.noisy.data}
    if baselines:
        for name, label in (("mppca", "MP-PCA"), ("patch2self", "Patch2Self")):
            estimates[label] = denoise_baseline(name, phantom.noisy.data, phantom.noisy.bvals)
    estimates["Stage I"] = result.stage1.data
    estimates["DDM2"] = result.denoised.data
    scores = {name: score_against_truth(data, truth.data, truth.bvals, bvecs, phantom.mask, truth_maps)
              for name, data in estimates.items()}
    table = format_score_table(scores)
    gain = scores["DDM2"]["psnr_db"] - scores["noisy"]["psnr_db"]
    # each shell's own n (--n auto gives each its own)
    neighbours = ", ".join(f"{name} {shell['n']}" for name, shell in result.record["shells"].items() if "n" in shell)
    summary = (f"{title}, {'x'.join(map(str, phantom.noisy.data.shape))}, n: {neighbours}, "
               f"method {result.record['parameters']['method']}: DDM2 {gain:+.1f} dB PSNR over the noisy input "
               f"(pipeline {seconds:.0f} s on {result.record['device']})")
    write_json(out / "demo_scores.json", {"scores": scores, "summary": summary})
    write_report(phantom.noisy, result.denoised, out / "report.png", out / "report.html",
                 stage1=result.stage1.data, outlier_curves=result.curves or None, outlier_flags=result.outlier_flags,
                 title=f"DDM2: {title}", table=table + "\n\n" + summary,
                 maps_input=result.maps["input"], maps_denoised=result.maps["denoised"])
    return f"{table}\n\n{summary}\nreport: {(out / 'report.png').resolve()}"

