"""The `ddm2` command (stdlib argparse: the worker also runs inside Slicer's Python).

Exit codes: 0 done; 1 runtime failure; 2 bad input or usage; 75 cancelled (resume with --resume).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from ddm2 import __version__
from ddm2.progress import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, Cancelled, Reporter


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="4-D NIfTI (.nii/.nii.gz, FSL bval/bvec beside it) or DWI NRRD (.nrrd/.nhdr)")
    parser.add_argument("--bval", help="FSL b-value file (default: INPUT's stem + .bval)")
    parser.add_argument("--bvec", help="FSL b-vector file (default: INPUT's stem + .bvec)")


def neighbour_count(text: str) -> int:
    """``--n``: a positive count, or "auto" (0, Settings' code for it)."""
    if text == "auto":
        return 0
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a neighbour count: give a whole number from 1, or auto")
    return count


def _add_training(parser: argparse.ArgumentParser, stage1_steps: int, stage3_steps: int) -> None:
    from ddm2.pipeline import B0_GUIDES, METHODS, STAGE3_CONDITIONS, Settings
    from ddm2.sampler import SAMPLERS

    defaults = Settings()
    group = parser.add_argument_group("method")
    group.add_argument("--n", type=neighbour_count, default=defaults.n,
                       help="neighbour volumes fed to Stage I: a number, or auto (the default): per shell, as many "
                            "as leave Stage III a second disjoint set, (V - 1) // 2 for V volumes, from 1 to 8")
    group.add_argument("--stage1-steps", type=int, default=stage1_steps, help=f"Stage I steps (default {stage1_steps})")
    group.add_argument("--stage3-steps", type=int, default=stage3_steps,
                       help=f"Stage III steps (default {stage3_steps})")
    group.add_argument("--preset", choices=["auto", "paper", "small"], default=defaults.preset,
                       help="network size: paper (24 M parameters) or small; auto: paper on CUDA, small on CPU")
    group.add_argument("--method", choices=METHODS, default=defaults.method,
                       help="directional (default): Stage I is told the gradient directions and uses the "
                            "angularly closest volumes; paper: adjacent volumes, no directions")
    group.add_argument("--context-slices", type=int, choices=[0, 1], default=defaults.context_slices,
                       help="directional method: Stage I also sees slices z-1 and z+1 of the neighbours and "
                            "of the target volume (default 1; 0: the paper's single slice)")
    group.add_argument("--b0-guide", choices=B0_GUIDES, default=defaults.b0_guide,
                       help="directional method: Stage I and Stage III's network of a weighted shell also see "
                            "the mean of the b0 volumes, whose noise is independent of the target's (default "
                            "auto: in shells of fewer than 30 directions when the b0s' SNR, measured with the "
                            "noise sigma, is at most 15: there it lifted PSNR and SSIM; with more directions or a "
                            "higher SNR it lowered FA). The b0s must be aligned with the "
                            "diffusion-weighted volumes (motion and eddy currents corrected): off otherwise")
    group.add_argument("--holdout", "--stage1-holdout", type=_share, default=defaults.holdout,
                       help="share of each shell's slices Stage I and Stage III do not train on; each stage's loss "
                            "on them picks its training step to keep (default 0.1; 0: every slice, the last "
                            "steps, as the paper). --stage1-holdout is its earlier name")
    group.add_argument("--stage3-condition", choices=STAGE3_CONDITIONS, default=defaults.stage3_condition,
                       help="stage1: Stage III's network also sees Stage I's estimate of the slice (a shell needs "
                            "2n + 1 volumes); none: only the noisy slice, as in the paper (default auto: stage1 for "
                            "shells of 30 or more directions with the directional method, none otherwise)")
    group.add_argument("--target", choices=["auto", "signal", "mean"], default=defaults.target,
                       help="what Stage III estimates: signal: the noise-free signal (Rician bias removed; needs "
                            "the noise level, measured outside the head or given with --noise-sigma); mean: the "
                            "mean of the noisy data, which Rician noise lifts above the signal where it is low "
                            "(the paper); auto (default): signal where the noise level is given or measurable, "
                            "mean otherwise")
    group.add_argument("--noise-sigma", type=float, default=defaults.noise_sigma,
                       help="the noise's sigma in the input's units for --target signal (default: measured on the "
                            "background outside the head)")
    group.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler,
                       help="ddim (default): --sampling-steps deterministic steps from t*; ddpm: every state from "
                            "t* (the paper's chain; the worst sampler measured at CPU training lengths)")
    group.add_argument("--sampling-steps", type=int, default=defaults.sampling_steps,
                       help=f"steps of the ddim sampler (default {defaults.sampling_steps}: F's prediction of the "
                            "clean slice from t*)")
    group.add_argument("--flips", action=argparse.BooleanOptionalAction, default=defaults.flips,
                       help="average F over the 4 flips of each slice at every step: 4x the evaluations, "
                            "measured +0.02 to +0.42 dB with 1 ddim step (default on)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="training batch (default: 32 paper, 8 small)")
    group.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                       help="Adam rate (default: 1e-4 paper, 1e-3 small)")
    group.add_argument("--inference-batch", type=int, default=defaults.inference_batch,
                       help="slices per inference batch (default 64 on a GPU, 16 on CPU)")
    group.add_argument("--seed", type=int, default=defaults.seed)
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:K")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the networks: minutes of compiling up front, then faster steps (CUDA)")
    run.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every K steps (default 500)")
    run.add_argument("--progress", choices=["text", "json"], default="text",
                     help="json: one JSON event per line on stdout (logs stay on stderr)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")


def _share(text: str) -> float:
    """A fraction in [0, 1), for argparse."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in [0, 1): give e.g. 0.1, or 0 to hold nothing out")
    return value


def _settings(args: argparse.Namespace, **extra):
    from ddm2.pipeline import Settings

    return Settings(n=args.n, stage1_steps=args.stage1_steps, stage3_steps=args.stage3_steps, preset=args.preset,
                    seed=args.seed, method=args.method, context_slices=args.context_slices, b0_guide=args.b0_guide,
                    holdout=args.holdout, target=args.target, noise_sigma=args.noise_sigma,
                    stage3_condition=args.stage3_condition, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, sampler=args.sampler, sampling_steps=args.sampling_steps,
                    flips=args.flips, checkpoint_every=args.checkpoint_every,
                    inference_batch=args.inference_batch, compile_network=args.compile, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddm2", description="DDM2 self-supervised denoising of diffusion MRI")
    parser.add_argument("--version", action="version", version=f"ddm2 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    denoise = commands.add_parser("denoise", help="denoise a DWI (Stages I, II, III and inference)")
    _add_input(denoise)
    denoise.add_argument("--out", required=True, help="run directory: outputs, checkpoints, run.json")
    denoise.add_argument("--save-stage1", action="store_true", help="also write Stage I's estimate (stage1.nii.gz)")
    denoise.add_argument("--no-report", action="store_true", help="skip the QC report")
    _add_training(denoise, stage1_steps=1000, stage3_steps=1000)

    demo = commands.add_parser("demo", help="denoise the embedded phantom and score it against its truth")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--snr", type=float, default=10.0, help="phantom SNR (default 10)")
    demo.add_argument("--no-baselines", action="store_true", help="skip dipy's MP-PCA and Patch2Self")
    # CPU-sized: step counts that finish in minutes on two cores
    _add_training(demo, stage1_steps=800, stage3_steps=800)

    phantom = commands.add_parser("phantom", help="write the synthetic phantom (noisy and truth) as NIfTI")
    phantom.add_argument("--out", required=True, help="folder for noisy.nii.gz, truth.nii.gz and their bval/bvec")
    phantom.add_argument("--snr", type=float, default=10.0)
    phantom.add_argument("--shape", type=int, nargs=3, default=(64, 64, 8), metavar=("X", "Y", "Z"))
    phantom.add_argument("--gradients", default="default",
                         help="'default' (2 b0 + 30 directions, b=1000) or a table dipy ships, e.g. small_64D")
    phantom.add_argument("--seed", type=int, default=0)

    maps = commands.add_parser("maps", help="brain mask and DTI maps (FA, MD, AD, RD, colour FA)")
    _add_input(maps)
    maps.add_argument("--out", required=True, help="folder for the maps")
    maps.add_argument("--progress", choices=["text", "json"], default="text",
                      help="json: a 'done' (or 'error') event with the output paths on stdout")

    evaluate = commands.add_parser("evaluate", help="SNR/CNR in the corpus callosum (dipy's protocol, both "
                                   "variants); with --truth also PSNR, SSIM and FA/MD errors")
    for name, required in (("noisy", True), ("denoised", True), ("truth", False)):
        evaluate.add_argument(f"--{name}", required=required,
                              help=f"{name} DWI (NIfTI with bval/bvec beside it, or NRRD)")
    evaluate.add_argument("--bval", help="b-values of all three (default: each file's own)")
    evaluate.add_argument("--bvec", help="b-vectors of all three (default: each file's own)")
    evaluate.add_argument("--out", help="folder for evaluation.json (default: print only)")

    compare = commands.add_parser("compare", help="MP-PCA, Patch2Self, Stage I and DDM2 on one input: one "
                                  "table and one report")
    _add_input(compare)
    compare.add_argument("--out", required=True, help="folder: the DDM2 run in OUT/ddm2, compare.* in OUT")
    compare.add_argument("--truth", help="noise-free DWI (phantoms): adds PSNR, SSIM, FA/MD errors")
    _add_training(compare, stage1_steps=1000, stage3_steps=1000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ddm2 import distributed
    from ddm2.dwi import InputError

    reporter = Reporter(json_events=getattr(args, "progress", "text") == "json", rank=distributed.rank())
    try:
        if distributed.active() and args.command != "denoise":
            raise InputError(f"only `ddm2 denoise` runs under torchrun: run `ddm2 {args.command}` as one process")
        return COMMANDS[args.command](args, reporter)
    except InputError as error:
        return _fail(reporter, str(error), EXIT_BAD_INPUT)
    except Cancelled:
        out = getattr(args, "out", "")
        reporter.log(f"cancelled; continue with the same command and --resume (run directory {out})")
        reporter.event("cancelled", run_dir=str(Path(out).resolve()))
        return EXIT_CANCELLED
    except OSError as error:
        if error.errno == errno.ENOSPC:
            return _fail(reporter, f"disk full while writing {error.filename or 'the outputs'}: free space "
                         "there (or choose another --out) and resume with --resume", EXIT_FAILURE)
        return _fail(reporter, f"{error.strerror or error}: {error.filename or ''}".rstrip(": "), EXIT_FAILURE)
    except MemoryError:
        return _fail(reporter, "out of memory: use a smaller --inference-batch or --batch-size", EXIT_FAILURE)
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            return _fail(reporter, "GPU out of memory: lower --batch-size and --inference-batch, use "
                         "--preset small, or --device cpu; then resume with --resume", EXIT_FAILURE)
        raise


def _fail(reporter: Reporter, message: str, code: int) -> int:
    reporter.log(f"error: {message}")
    reporter.event("error", message=message)
    return code


def run_denoise(args: argparse.Namespace, reporter: Reporter) -> int:
    from ddm2.pipeline import denoise

    settings = _settings(args, save_stage1=args.save_stage1, write_report=not args.no_report)
    result = denoise(args.input, args.out, settings, reporter, bval=args.bval, bvec=args.bvec,
                     device=args.device, resume=args.resume)
    if result is not None:  # under torchrun, rank 0 wrote the outputs
        reporter.log(f"done: outputs in {Path(args.out).resolve()}")
        reporter.event("done", outputs=result.outputs)
    return EXIT_OK


def run_demo(args: argparse.Namespace, reporter: Reporter) -> int:
    from ddm2.demo import run_demo as demo

    settings = _settings(args, save_stage1=True)
    table = demo(Path(args.out), settings, reporter, snr=args.snr, device=args.device, resume=args.resume,
                 baselines=not args.no_baselines)
    print(table)
    return EXIT_OK


def run_phantom(args: argparse.Namespace, reporter: Reporter) -> int:
    from ddm2 import dwi as dwi_io
    from ddm2.phantom import default_gradient_table, dipy_gradient_table, make_phantom

    bvals, bvecs = default_gradient_table() if args.gradients == "default" else dipy_gradient_table(args.gradients)
    phantom = make_phantom(tuple(args.shape), bvals, bvecs, snr=args.snr, seed=args.seed)
    out = Path(args.out)
    dwi_io.save_nifti(phantom.noisy, out / "noisy.nii.gz")
    dwi_io.save_nifti(phantom.truth, out / "truth.nii.gz")
    dwi_io.save_volume(phantom.mask.astype("float32"), phantom.noisy.affine, out / "mask.nii.gz")
    dwi_io.save_volume(phantom.fa, phantom.noisy.affine, out / "fa_truth.nii.gz")
    reporter.log(f"phantom {phantom.noisy.data.shape} at SNR {args.snr:g} written to {out.resolve()}")
    return EXIT_OK


def run_maps(args: argparse.Namespace, reporter: Reporter) -> int:
    from ddm2 import dwi as dwi_io
    from ddm2.maps import brain_mask
    from ddm2.pipeline import write_maps

    dwi = dwi_io.load(args.input, args.bval, args.bvec)
    out = Path(args.out)
    mask = brain_mask(dwi.data, dwi.bvals)
    outputs = {"mask": dwi_io.save_volume(mask.astype("float32"), dwi.affine, out / "mask.nii.gz"),
               **write_maps(dwi, mask, out)[1]}
    reporter.event("done", outputs={k: str(v.resolve()) for k, v in outputs.items()})
    reporter.log(f"maps written to {out.resolve()}")
    return EXIT_OK


def run_evaluate(args: argparse.Namespace, reporter: Reporter) -> int:
    from ddm2 import dwi as dwi_io
    from ddm2.evaluation import evaluate, format_evaluation
    from ddm2.pipeline import write_json

    noisy = dwi_io.load(args.noisy, args.bval, args.bvec)
    denoised = dwi_io.load(args.denoised, args.bval, args.bvec)
    truth = dwi_io.load(args.truth, args.bval, args.bvec) if args.truth else None
    result = evaluate(noisy, denoised, truth)
    if args.out:
        write_json(Path(args.out) / "evaluation.json", result)
    print(format_evaluation(result))
    return EXIT_OK


def run_compare(args: argparse.Namespace, reporter: Reporter) -> int:
    from ddm2 import dwi as dwi_io
    from ddm2.evaluation import compare_methods
    from ddm2.pipeline import denoise

    out = Path(args.out)
    dwi = dwi_io.load(args.input, args.bval, args.bvec)
    truth = dwi_io.load(args.truth, args.bval, args.bvec) if args.truth else None
    result = denoise(args.input, out / "ddm2", _settings(args, save_stage1=True), reporter, bval=args.bval,
                     bvec=args.bvec, device=args.device, resume=args.resume, dwi=dwi)
    summary = compare_methods(dwi, {"Stage I": result.stage1.data, "DDM2": result.denoised.data}, truth, out)
    print(summary["table"])
    reporter.event("done", outputs={"compare": str((out / "compare.json").resolve())})
    return EXIT_OK


COMMANDS = {"denoise": run_denoise, "demo": run_demo, "phantom": run_phantom, "maps": run_maps,
            "evaluate": run_evaluate, "compare": run_compare}


if __name__ == "__main__":
    sys.exit(main())
