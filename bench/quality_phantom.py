"""Quality on the phantom: noisy, Stage I and the final DDM2 result against the truth.

    python bench/quality_phantom.py --snr 5 10 --n 1 2 --method directional paper --out runs/bench-quality

Each combination is one `ddm2 demo`-style run (same phantom, CPU-sized settings unless given); the
table goes to stdout and, as JSON lines, to OUT/results.jsonl. bench/RESULTS.md records the figures
with the command, machine and date.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from datetime import date
from pathlib import Path

from ddm2.demo import run_demo
from ddm2.pipeline import Settings
from ddm2.progress import Reporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, nargs="+", default=[5, 10])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", nargs="+", default=["directional", "paper"])
    parser.add_argument("--stage1-steps", type=int, default=600)
    parser.add_argument("--stage3-steps", type=int, default=600)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--baselines", action="store_true", help="also score dipy's MP-PCA and Patch2Self")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for snr, n, method in itertools.product(args.snr, args.n, args.method):
        run_dir = args.out / f"snr{snr:g}-n{n}-{method}"
        settings = Settings(n=n, stage1_steps=args.stage1_steps, stage3_steps=args.stage3_steps, method=method,
                            sampler=args.sampler, sampling_steps=args.sampling_steps, save_stage1=True)
        started = time.monotonic()
        table = run_demo(run_dir, settings, Reporter(), snr=snr, device=args.device, baselines=args.baselines)
        scores = json.loads((run_dir / "demo_scores.json").read_text())["scores"]
        record = {"snr": snr, "n": n, "method": method, "stage1_steps": args.stage1_steps,
                  "stage3_steps": args.stage3_steps, "sampler": args.sampler, "sampling_steps": args.sampling_steps,
                  "seconds": round(time.monotonic() - started), "machine": platform.node(),
                  "date": date.today().isoformat(), "scores": scores}
        with open(args.out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"\n== SNR {snr:g}, n = {n}, {method}\n{table}", flush=True)


if __name__ == "__main__":
    main()
