"""Quality against a known truth: noisy, MP-PCA, Patch2Self, Stage I and DDM2 on PSNR, SSIM, FA and MD.

    python bench/quality.py --case hardi55 clinical6 phantom --snr 5 10 20 --n 2 --out runs/bench-quality

Cases (all with Rician noise at each --snr, scored inside the brain mask):
  phantom    ddm2.phantom.make_phantom(): 64 x 64 x 8, 2 b0 + 30 directions at b = 1000.
  hardi55    semi-synthetic: tensors fitted to the real scan in ../shared/data/philips-dwi/ (a slab of 8
             slices through the corpus callosum, cropped to the head: 80 x 96 x 8), re-synthesised on
             dipy's 55-direction b = 2000 table with 5 b0 volumes.
  hardi55x   hardi55 with every fitted tensor explained as two crossing fibres of the same mean tensor
             (ddm2.semisynthetic.two_fibre_signal): a truth beyond the single tensor, less low-rank.
  clinical6  the same anatomy on a clinical few-direction table: 1 b0 + 6 directions at b = 1000.
  clinical6-moved  clinical6 with its b0 acquired 2 voxels right and 1.5 voxels forward of the
             diffusion-weighted volumes (an uncorrected head motion; fresh noise on the moved b0): what
             the b0 guide does when the b0 is not aligned with the volumes it guides.

Each combination is one run directory (resumed if it exists); DDM2 is scored with the run's sampler and,
re-using its trained networks, with every --extra-sampler (e.g. ddpm: the paper's every-state chain).
`--sigma-error 0.8 1.2` gives the signal target the true sigma times each factor instead of measuring it.
One JSON line per combination goes to OUT/results.jsonl; bench/RESULTS.md records the figures with the
command, machine and date.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
from scipy import ndimage

from resample import resample_scores

from ddm2 import dwi as dwi_io
from ddm2.cli import neighbour_count
from ddm2.demo import run_with_truth
from ddm2.maps import dti_maps
from ddm2.phantom import Phantom, add_rician_noise, default_gradient_table, dipy_gradient_table, make_phantom
from ddm2.pipeline import B0_GUIDES, STAGE3_CONDITIONS, Settings
from ddm2.progress import Reporter
from ddm2.semisynthetic import resynthesise, with_b0_volumes

SCAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "philips-dwi" / "philips_dwi.nii.gz"
SLAB = ((16, 8, 12), (96, 104, 20))  # voxel box of the scan: the head, 8 slices through the corpus callosum


def make_case(case: str, snr: float, seed: int) -> Phantom:
    if case == "phantom":
        return make_phantom(snr=snr, seed=seed)
    scan = dwi_io.load(SCAN).cropped(*SLAB)
    if case in ("hardi55", "hardi55x"):
        bvals, bvecs = with_b0_volumes(*dipy_gradient_table("55dir_grad"), n_b0=5)
    elif case in ("clinical6", "clinical6-moved"):
        bvals, bvecs = default_gradient_table(n_b0=1, n_directions=6, b_value=1000.0)
    else:
        raise SystemExit(f"unknown case {case!r}: use phantom, hardi55, hardi55x, clinical6 or clinical6-moved")
    made = resynthesise(scan, bvals, bvecs, snr, seed=seed, fibres=2 if case == "hardi55x" else 1)
    return with_moved_b0(made, B0_MOTION, seed + 1) if case == "clinical6-moved" else made


B0_MOTION = (2.0, 1.5, 0.0)  # voxels: clinical6-moved's b0 against its diffusion-weighted volumes


def with_moved_b0(case: Phantom, shift: tuple[float, float, float], seed: int) -> Phantom:
    """The case with its b = 0 truth shifted by ``shift`` voxels (cubic spline) and noised anew at the
    same sigma; the diffusion-weighted volumes, the mask and the scores (which skip b = 0) unchanged."""
    b0 = case.truth.bvals == 0
    truth = case.truth.data.copy()
    for volume in np.flatnonzero(b0):
        truth[..., volume] = np.clip(ndimage.shift(truth[..., volume], shift, order=3, mode="nearest"), 0, None)
    noisy = case.noisy.data.copy()
    noisy[..., b0] = add_rician_noise(truth[..., b0], case.sigma, seed)
    return replace(case, truth=case.truth.with_data(truth), noisy=case.noisy.with_data(noisy))


def markdown_tables(results: Path) -> str:
    """One table per (case, n, method) of OUT/results.jsonl: a row per denoiser, a column per SNR, each cell
    PSNR / SSIM / FA RMSE / MD RMSE (1e-3 mm^2/s), the best PSNR and SSIM of each column in bold."""
    groups: dict[tuple, dict[float, dict]] = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if "case" in record:  # lines of the earlier phantom-only script have no case
            scores = {**record["scores"], **{f"DDM2, {config}": extra
                                             for config, extra in record.get("extra_samplers", {}).items()}}
            key = (record["case"], record["n"], record["method"], record.get("stage3_condition", "none"),
                   record.get("b0_guide", "off"), record.get("seed", 0))
            groups.setdefault(key, {})[record["snr"]] = scores
    tables = []
    for (case, n, method, condition, guided, seed), by_snr in groups.items():
        snrs = sorted(by_snr)
        names = list(dict.fromkeys(name for scores in by_snr.values() for name in scores))
        lines = [f"**{case}**, n = {n}, {method}, Stage III condition: {condition}"
                 + (f", b0 guide {guided}" if guided != "off" else "") + (f", seed {seed}" if seed else ""), "",
                 "| method | " + " | ".join(f"SNR {snr:g}" for snr in snrs) + " |",
                 "| --- |" + " --- |" * len(snrs)]
        for name in names:
            cells = []
            for snr in snrs:
                score = by_snr[snr].get(name)
                if score is None:
                    cells.append("–")
                    continue
                best = {key: max(other[key] for key_name, other in by_snr[snr].items() if key_name != "noisy")
                        for key in ("psnr_db", "ssim")}
                psnr, ssim = f"{score['psnr_db']:.2f}", f"{score['ssim']:.3f}"
                psnr = f"**{psnr}**" if score["psnr_db"] == best["psnr_db"] else psnr
                ssim = f"**{ssim}**" if score["ssim"] == best["ssim"] else ssim
                cells.append(f"{psnr} / {ssim} / {score['fa_rmse']:.3f} / {score['md_rmse'] * 1e3:.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=["hardi55", "clinical6", "phantom"])
    parser.add_argument("--snr", type=float, nargs="+", default=[5, 10, 20])
    parser.add_argument("--n", type=neighbour_count, nargs="+", default=[2], help="as ddm2's (auto: n0 in run names)")
    parser.add_argument("--method", nargs="+", default=["directional"])
    parser.add_argument("--stage1-steps", type=int, default=800)
    parser.add_argument("--stage3-steps", type=int, default=800)
    parser.add_argument("--holdout", "--stage1-holdout", type=float, default=0.1,
                        help="as ddm2's (0: the last steps; --stage1-holdout: its earlier name)")
    parser.add_argument("--stage3-condition", default="stage1", choices=STAGE3_CONDITIONS,
                        help="stage1 (default here: every case conditioned), none (the paper's F) "
                             "or auto (ddm2's default)")
    parser.add_argument("--target", default="auto", choices=["auto", "signal", "mean"], help="as ddm2's")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sampling-steps", type=int, default=5)
    parser.add_argument("--flips", action=argparse.BooleanOptionalAction, default=False,
                        help="the run's sampler averages over the 4 flips (default off here, as in every "
                             "recorded command; ddm2's default is on: score it with --extra-samplers ddim:1:flips)")
    parser.add_argument("--b0-guide", choices=B0_GUIDES, default="off",
                        help="as ddm2's (default off here, as in every command recorded before it existed; "
                             "ddm2's default is auto)")
    parser.add_argument("--sigma-error", type=float, nargs="+", default=[0.0],
                        help="give the signal target the true sigma times each of these factors instead of "
                             "measuring it on the background (0: measure it, the default)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="training seeds (each network's initial weights, batches, held-out slices and "
                             "sampling noise); the case's noise is always drawn with seed 0, so runs of "
                             "several seeds measure how far a score moves with the training's randomness alone")
    parser.add_argument("--extra-samplers", nargs="*", default=[], help="e.g. ddpm ddim:20:flips")
    parser.add_argument("--no-baselines", action="store_true", help="skip dipy's MP-PCA and Patch2Self")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--tables", action="store_true", help="print OUT/results.jsonl as markdown tables, run nothing")
    args = parser.parse_args()
    if args.tables:
        print(markdown_tables(args.out / "results.jsonl"))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for case, snr, n, method, sigma_error, seed in itertools.product(args.case, args.snr, args.n, args.method,
                                                                      args.sigma_error, args.seed):
        truth_case = make_case(case, snr, seed=Settings().seed)
        settings = Settings(n=n, seed=seed, stage1_steps=args.stage1_steps, stage3_steps=args.stage3_steps,
                            method=method, holdout=args.holdout, target=args.target,
                            stage3_condition=args.stage3_condition, sampler=args.sampler,
                            sampling_steps=args.sampling_steps, flips=args.flips, save_stage1=True,
                            noise_sigma=sigma_error * truth_case.sigma, b0_guide=args.b0_guide)
        condition = args.stage3_condition
        # runs of the paper's F keep the names they had before the conditioned F existed
        suffix = {"none": "", "stage1": "-conditioned", "auto": "-auto"}[condition]
        # and runs of the mean target the names they had before the signal target existed
        suffix += {"mean": "", "signal": "-signal", "auto": "-target-auto"}[args.target]
        suffix += f"-sigma{sigma_error:g}" if sigma_error else ""
        suffix += {"off": "", "on": "-guided", "auto": "-guide-auto"}[args.b0_guide]
        suffix += f"-seed{seed}" if seed else ""
        run_dir = args.out / f"{case}-snr{snr:g}-n{n}-{method}{suffix}"
        started = time.monotonic()
        table = run_with_truth(truth_case, run_dir, settings, Reporter(), title=f"{case}, SNR {snr:g}",
                               device=args.device, baselines=not args.no_baselines)
        seconds = round(time.monotonic() - started)
        scores = json.loads((run_dir / "demo_scores.json").read_text())["scores"]
        truth = truth_case.truth
        truth_maps = dti_maps(truth.data, truth.bvals, truth.bvecs_voxel(), mask=truth_case.mask)
        extra = {}
        for config in args.extra_samplers:
            extra[config] = resample_scores(run_dir, truth_case.noisy, truth, truth_case.mask, truth_maps, config)
            table += (f"\nDDM2 with {config}: {extra[config]['psnr_db']:.2f} dB, SSIM {extra[config]['ssim']:.4f}, "
                      f"FA RMSE {extra[config]['fa_rmse']:.4f}, MD RMSE {extra[config]['md_rmse'] * 1e3:.4f}e-3")
        record = {"case": case, "shape": list(truth.data.shape), "snr": snr, "n": n, "method": method,
                  "stage3_condition": condition, "holdout": args.holdout, "target": args.target,
                  "noise_sigma": json.loads((run_dir / "run.json").read_text()).get("noise_sigma"),
                  "sigma_error": sigma_error, "b0_guide": args.b0_guide, "seed": seed,
                  "stage1_steps": args.stage1_steps, "stage3_steps": args.stage3_steps, "sampler": args.sampler,
                  "sampling_steps": args.sampling_steps, "seconds": seconds, "machine": platform.node(),
                  "date": date.today().isoformat(), "scores": scores, "extra_samplers": extra}
        with open(args.out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"\n== {case}, SNR {snr:g}, n = {n}, {method} ({seconds} s)\n{table}", flush=True)


if __name__ == "__main__":
    main()
