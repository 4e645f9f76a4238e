"""Which of Stage III's steps to keep: re-train the paper's F of a finished known-truth run and score,
at every validation, what each criterion sees and what the truth says.

    python bench/stage3_steps.py RUN --steps 3200 --every 80 --out runs/logs/stage3_steps.json

Stage III is trained again as the pipeline trains it (the run's Stage I estimate, matched states,
held-out slices, seeds and settings; F initialised right after seeding, as in a run resumed after
Stage II). Every ``--every`` steps it records, with F's one-step prediction of every slice from
its noisy input at t* (``ddim:1`` without flips):

* ``held_out_loss``: the pipeline's criterion (``ddm2.stage3.held_out_squared_error_sum``), F's
  error against the held-out noisy slices from a *training* input;
* ``held_out_sure``: Stein's unbiased risk estimate of F's error on the held-out slices' *real*
  noisy input, inside the truth's brain mask, with sigma the matched state's noise level and the
  divergence from one fixed Gaussian probe (Ramani et al., IEEE TIP 2008);
* the truth's view: PSNR / SSIM / FA RMSE (``score_against_truth``).

It prints the step each criterion keeps with its scores, and the scores of the mean prediction of
the validations around the kept step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from resample import known_truth

from ddm2 import stage1, stage3, training
from ddm2.data import group_shells, normalised_shell_slices, restore_shell_volumes, volume_scales
from ddm2.metrics import score_against_truth
from ddm2.pipeline import Settings
from ddm2.progress import CancelToken, Reporter
from ddm2.schedule import DiffusionSchedule
from ddm2.unet import UNet, preset_config

PROBE_STEP = 1e-3  # finite-difference step of the divergence probe, in normalised units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3200)
    parser.add_argument("--every", type=int, default=80)
    parser.add_argument("--window", type=int, default=2, help="validations on each side of the kept step to average")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every validation's record")
    args = parser.parse_args()

    record = json.loads((args.run_dir / "run.json").read_text())
    settings = Settings.from_dict(record["parameters"])
    noisy, truth, mask, truth_maps = known_truth(args.run_dir)
    scales = volume_scales(noisy.data)
    shell = next(s for s in group_shells(noisy.bvals) if record["shells"].get(s.name, {}).get("denoised"))
    if record["shells"][shell.name].get("stage3_condition") == "stage1":
        raise SystemExit(f"{args.run_dir}: its F is conditioned on Stage I; this bench re-trains the paper's F only")
    slices = torch.as_tensor(normalised_shell_slices(noisy.data, shell, scales))
    n_volumes, n_slices, height, width = slices.shape
    states = torch.as_tensor(np.array(record["shells"][shell.name]["stage2"]["states"]).reshape(n_volumes, n_slices))
    estimate = torch.as_tensor(np.load(args.run_dir / "checkpoints" / shell.name / "stage1_estimate.npy"))
    held_out = stage1.held_out_items(n_volumes * n_slices, settings.holdout, settings.seed)
    schedule = DiffusionSchedule()
    device = torch.device("cpu")

    torch.manual_seed(settings.seed)
    model = UNet(preset_config(settings.preset, in_channels=1, noise_embedding=True))
    batches = stage1.SliceSampler(slices, settings.batch_size, np.setdiff1d(np.arange(n_volumes * n_slices), held_out))
    flat = slices.reshape(-1, 1, height, width)
    flat_states = states.reshape(-1)
    level = torch.as_tensor(schedule.sqrt_alpha_bar, dtype=torch.float32)[flat_states]
    sigma = torch.as_tensor(schedule.noise_std, dtype=torch.float32)[flat_states[held_out]]
    inside = torch.as_tensor(np.transpose(mask, (2, 0, 1)).copy()).repeat(n_volumes, 1, 1)[held_out][:, None].float()
    probe = torch.randn(flat[held_out].shape, generator=torch.Generator().manual_seed(settings.seed + 3000))
    rows, predictions = [], []

    @torch.no_grad()
    def validate(step: int) -> None:
        prediction = model(flat, noise_level=level).float().clamp(-1.0, 1.0)
        # SURE: |f(x) - x|^2 - sigma^2 + 2 sigma^2 div f(x), per pixel, averaged inside the mask
        x = flat[held_out]
        f = model(x, noise_level=level[held_out]).float()
        divergence = probe * (model(x + PROBE_STEP * probe, noise_level=level[held_out]).float() - f) / PROBE_STEP
        s2 = sigma[:, None, None, None] ** 2
        risk = ((f - x) ** 2 - s2 + 2 * s2 * divergence) * inside
        sure = float((risk.sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3)).clamp(min=1)).mean())
        loss = stage3.held_out_squared_error_sum(model, slices, estimate, states, schedule, held_out,
                                                 settings.inference_batch, settings.seed + 2000) / len(held_out)
        predictions.append(prediction[:, 0].numpy().reshape(n_volumes, n_slices, height, width))
        rows.append({"step": step, "held_out_loss": loss, "held_out_sure": sure, **scores(predictions[-1])})
        print(json.dumps(rows[-1]), flush=True)

    def scores(prediction: np.ndarray) -> dict:
        data = noisy.data.copy()
        restore_shell_volumes(data, prediction, shell, scales)
        return score_against_truth(data, truth.data, truth.bvals, truth.bvecs_voxel(), mask, truth_maps)

    class Recorder(training.Validation):
        def evaluate(self, network: torch.nn.Module, step: int) -> None:
            network.eval()
            validate(step)
            network.train()

    work = args.out.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "stage3.pt").unlink(missing_ok=True)
    training.train(model, stage3.stage3_batch_loss(model, batches, estimate, states, schedule),
                   steps=args.steps, learning_rate=settings.learning_rate, checkpoint_path=work / "stage3.pt",
                   checkpoint_every=args.steps, randomness=training.Randomness.seeded(settings.seed + 1000, device),
                   reporter=Reporter(), cancel=CancelToken(work), stage="stage3", shell=shell.name, device=device,
                   validation=Recorder(lambda: 0.0, every=args.every))
    args.out.write_text(json.dumps(rows, indent=1))

    print(f"\n{args.run_dir.name}: PSNR / SSIM / FA RMSE of F's one-step prediction at the step each criterion keeps")
    for criterion in ("held_out_loss", "held_out_sure", "psnr_db"):
        sign = -1 if criterion == "psnr_db" else 1
        kept = min(range(len(rows)), key=lambda i: sign * rows[i][criterion])
        around = predictions[max(0, kept - args.window):kept + args.window + 1]
        mean = scores(np.mean(around, axis=0))
        label = "the truth (best PSNR)" if criterion == "psnr_db" else criterion
        print(f"  {label:22} step {rows[kept]['step']:5}: {rows[kept]['psnr_db']:.2f} / {rows[kept]['ssim']:.3f} / "
              f"{rows[kept]['fa_rmse']:.3f}; mean of {len(around)} validations around it: "
              f"{mean['psnr_db']:.2f} / {mean['ssim']:.3f} / {mean['fa_rmse']:.3f}")
    print(f"  last step {rows[-1]['step']}: {rows[-1]['psnr_db']:.2f} / {rows[-1]['ssim']:.3f} / {rows[-1]['fa_rmse']:.3f}")


if __name__ == "__main__":
    main()
