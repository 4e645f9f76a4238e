"""Quality against network evaluations: re-run only the inference of a finished `ddm2 demo` run.

    python bench/sampler_quality.py runs/demo --configs ddim:1 ddim:5 ddim:20 ddim:20:flips ddpm

Each config is sampler:steps[:flips]. The trained Stage III network, the matched states, the noisy
slices, the truth and its mask come from the run directory (every denoised shell). Prints PSNR,
SSIM and FA RMSE of each config with its network evaluations per slice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resample import known_truth, resample_scores

from ddm2.metrics import score_against_truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--configs", nargs="+", default=["ddim:1", "ddim:5", "ddim:20", "ddim:20:flips", "ddpm"])
    args = parser.parse_args()
    noisy, truth, mask, truth_maps = known_truth(args.run_dir)
    rows = {"noisy": (0, score_against_truth(noisy.data, truth.data, truth.bvals, truth.bvecs_voxel(), mask,
                                             truth_maps), 0.0)}
    for config in args.configs:
        scores = resample_scores(args.run_dir, noisy, truth, mask, truth_maps, config)
        rows[config] = (scores["evaluations"], scores, scores["seconds_per_slice"])
    print(f"{'config':16} {'F evals/slice':>13} {'PSNR':>7} {'SSIM':>7} {'FA RMSE':>8} {'s/slice':>8}")
    for config, (evaluations, scores, seconds) in rows.items():
        print(f"{config:16} {evaluations:>13} {scores['psnr_db']:7.2f} {scores['ssim']:7.4f} "
              f"{scores['fa_rmse']:8.4f} {seconds:8.3f}")


if __name__ == "__main__":
    main()
