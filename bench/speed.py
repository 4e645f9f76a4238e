"""Speed and memory of the engine on a HARDI-size synthetic input (106 x 81 x Z, 10 b0 + 150 directions at
b = 2000; the full size has Z = 76).

    OMP_NUM_THREADS=2 python bench/speed.py --slices 4 --steps 20 --out runs/bench-speed     # CPU, minutes
    python bench/speed.py --device cuda --preset paper --slices 76 --steps 200 --probe-steps 0 \\
        --pipeline-steps 10000 100000 --out runs/bench-speed-gpu                             # one GPU, whole input
    OMP_NUM_THREADS=2 python bench/speed.py --memory-check --out runs/bench-memory           # 128x128x64x193, CPU

What is measured (JSON to OUT/speed.json, a table to stdout):

* Stage I and Stage III training steps per second (``--steps`` steps after 2 warm-up steps, the real
  training loop, the preset's batch), on ``--slices`` slices of every volume (the step cost does not
  depend on how many slices there are to draw from).
* Inference seconds per slice for the ddpm sampler (every state from t*) and ddim (``--sampling-steps``),
  flips on and off, batch 1 and ``--inference-batch``. t* is the median matched state of the input
  (Stage II against the phantom's truth, i.e. an ideal Stage I). One chain step costs the same for both
  samplers (one network evaluation, four with flips, plus the update), so by default the cost of a step
  is timed over ``--probe-steps`` steps and multiplied by the steps of each sampler (t* or K); with
  ``--probe-steps 0`` every chain is run whole. The network is untrained: speed does not depend on the
  weights.
* The whole pipeline (``ddm2 denoise`` in a child process, ``--pipeline-steps`` Stage I / III steps, the
  ddim sampler, no report) on the same input: wall time, per-stage timings, the child's peak RSS and,
  on CUDA, peak allocated VRAM.

``--memory-check`` instead denoises a 128 x 128 x 64 x 193 input (1 b0 + 192 directions; an 8-slice
phantom tiled along z, since the phantom's 2x supersampled float64 model of 64 slices would need 6 GB)
with 1 training step per stage and a 1-step ddim sampler, and reports the peak RSS beyond a process
that has only imported the engine and built its networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ddm2 import dwi as dwi_io
from ddm2 import stage1, stage3, training
from ddm2.data import (gradient_features, group_shells, neighbour_table, normalise_volumes, shell_neighbour_count,
                       shell_slices)
from ddm2.phantom import default_gradient_table, make_phantom
from ddm2.pipeline import PRESET_TRAINING, Settings
from ddm2.progress import CancelToken, Reporter
from ddm2.sampler import denoise_slices
from ddm2.schedule import DiffusionSchedule
from ddm2.unet import UNet, parameter_count, preset_config

HARDI_SHAPE = (106, 81, 76)
WARM_UP_STEPS = 2


class StepClock(Reporter):
    """A silent reporter that notes the time of every training step."""

    def __init__(self) -> None:
        super().__init__(stderr=open(os.devnull, "w"))
        self.times: list[float] = []

    def progress(self, stage, shell, step, total, loss=None) -> None:
        self.times.append(time.perf_counter())

    def steps_per_second(self) -> float:
        timed = self.times[WARM_UP_STEPS:]
        return (len(timed) - 1) / (timed[-1] - timed[0])


def hardi_table() -> tuple[np.ndarray, np.ndarray]:
    return default_gradient_table(n_b0=10, n_directions=150, b_value=2000.0)


def training_rates(slices: torch.Tensor, truth_slices: torch.Tensor, states: torch.Tensor, bvecs: np.ndarray,
                   bvals: np.ndarray, args, device: torch.device) -> dict[str, float]:
    """Steps per second of Stage I (directional, ddm2's default n for the shell, context 1), Stage III's
    conditioned F (the default from 30 directions: every step also runs Stage I's network on the second
    neighbour set) and the paper's one-channel F."""
    batch = PRESET_TRAINING[args.preset]["batch_size"]
    sampler = stage1.SliceSampler(slices, batch)
    n = shell_neighbour_count(Settings().n, len(bvecs))
    tables = [neighbour_table(bvecs, n, "angular", ring) for ring in (0, 1)]
    (neighbours, conditions), (second, second_conditions) = [
        (torch.as_tensor(table, device=device), torch.as_tensor(gradient_features(bvecs, bvals, table), device=device))
        for table in tables]
    phi = training.prepare_model(UNet(preset_config(args.preset, in_channels=stage1.input_channels(n, 1),
                                                    condition_dim=conditions.shape[1])), device, args.compile)
    denoiser, paper_denoiser = [training.prepare_model(UNet(preset_config(args.preset, in_channels=channels,
                                                                          noise_embedding=True)), device, args.compile)
                                for channels in (2, 1)]

    def independent_estimate(volumes, slice_index):
        return stage1.estimate_batch(phi, slices, second, second_conditions, volumes, slice_index, 1)

    losses = {"stage1": (phi, stage1.stage1_batch_loss(phi, sampler, neighbours, conditions, 1)),
              "stage3": (denoiser, stage3.stage3_batch_loss(denoiser, sampler, truth_slices, states,
                                                            DiffusionSchedule(), independent_estimate)),
              "stage3_paper": (paper_denoiser, stage3.stage3_batch_loss(paper_denoiser, sampler, truth_slices, states,
                                                                        DiffusionSchedule()))}
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        for stage, (model, batch_loss) in losses.items():
            clock = StepClock()
            training.train(model, batch_loss, steps=args.steps + WARM_UP_STEPS, learning_rate=1e-4,
                           checkpoint_path=Path(folder) / f"{stage}.pt", checkpoint_every=10 ** 9,
                           randomness=training.Randomness.seeded(0, device), reporter=clock,
                           cancel=CancelToken(folder), stage=stage, shell="bench", device=device)
            rates[f"{stage}_steps_per_s"] = round(clock.steps_per_second(), 3)
    rates["parameters_stage3"] = parameter_count(denoiser)
    return rates


def inference_rates(slices: np.ndarray, reference_state: int, args, device: torch.device) -> list[dict]:
    """Seconds per slice of every (sampler, flips, batch) combination."""
    denoiser = training.prepare_model(UNet(preset_config(args.preset, in_channels=1, noise_embedding=True)),
                                      device, args.compile)
    schedule = DiffusionSchedule()
    chain_steps = {"ddpm": reference_state, "ddim": args.sampling_steps}
    rows = []
    for batch in (1, args.inference_batch):
        noisy = np.resize(slices, (batch, *slices.shape[1:])).astype(np.float32)
        for flips in (True, False):
            for sampler in ("ddpm", "ddim"):
                probe = args.probe_steps
                if probe:  # time `probe` steps of a chain (ddpm from state `probe`); scale to the real length
                    states, timed_sampler, timed_steps = np.full(batch, probe), "ddpm", probe
                else:
                    states, timed_sampler, timed_steps = np.full(batch, reference_state), sampler, chain_steps[sampler]
                # one untimed step first: CUDA's lazy start-up, and with --compile the compiling for this batch
                denoise_slices(denoiser, noisy, np.ones(batch, dtype=np.int64), schedule, sampler="ddpm", flips=flips,
                               batch_size=batch, device=device, randomness=training.Randomness.seeded(0, device))
                _synchronise(device)
                started = time.perf_counter()
                denoise_slices(denoiser, noisy, states, schedule, sampler=timed_sampler, steps=args.sampling_steps,
                               flips=flips, batch_size=batch, device=device,
                               randomness=training.Randomness.seeded(0, device))
                _synchronise(device)
                per_step = (time.perf_counter() - started) / timed_steps
                rows.append({"sampler": sampler, "chain_steps": chain_steps[sampler], "flips": flips, "batch": batch,
                             "s_per_slice": per_step * chain_steps[sampler] / batch,
                             "extrapolated_from_steps": probe or None})
    return rows


def whole_pipeline(input_path: Path, out: Path, args, extra: list[str]) -> dict:
    """`ddm2 denoise` in a child process: wall time, stage timings, peak RSS and VRAM."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(input_path), str(out), *extra]
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the pipeline failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.splitlines()[-1])
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def child(input_path: str, out: str, argv: list[str]) -> None:
    """Run the pipeline in this process and print its peaks (the parent's figures stay out of them)."""
    from ddm2.cli import main

    if "--tiny-network" in argv:
        argv.remove("--tiny-network")
        exec(TINY_NETWORK)
    device_cuda = "cuda" in argv
    baseline_kb = peak_rss_kb()
    code = main(["denoise", input_path, "--out", out, "--no-report", *argv])
    record = json.loads((Path(out) / "run.json").read_text())
    print(json.dumps({"exit_code": code, "timings_s": record.get("timings_s"), "device": record.get("device"),
                      "peak_rss_gb": round(peak_rss_kb() / 2 ** 20, 2),
                      "rss_before_gb": round(baseline_kb / 2 ** 20, 2),
                      "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device_cuda else None}))


# --memory-check --tiny-network: the small preset's shape at a quarter of its channels. The data copies,
# which the check is about, do not depend on the network; a 16x cheaper network makes the 25,000 network
# evaluations of a 128 x 128 x 64 x 193 input take minutes instead of an hour on 2 CPU cores.
# the peak RSS (kB) of a measuring child process, defined in its code
READ_PEAK_KB = ("peak_kb = lambda: int(next(l for l in open('/proc/self/status') "
                "if l.startswith('VmHWM:')).split()[1])\n")
TINY_NETWORK = "import ddm2.unet; ddm2.unet.PRESETS['small'].update(base_channels=4, norm_groups=2)\n"


def engine_baseline_rss(preset: str, tiny: bool = False) -> float:
    """Peak RSS (GB) of a process that imported the engine and built Stage I's and Stage III's networks."""
    code = ((TINY_NETWORK if tiny else "") + "import ddm2.pipeline, ddm2.maps, ddm2.metrics\n"
            "from ddm2.unet import UNet, preset_config\n"
            f"UNet(preset_config('{preset}', in_channels=8, condition_dim=20)); "
            f"UNet(preset_config('{preset}', in_channels=1, noise_embedding=True))\n"
            + READ_PEAK_KB + "print(peak_kb())")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(completed.stdout.split()[-1]) / 2 ** 20


def peak_rss_kb() -> int:
    """Peak RSS of this program in kB. Linux's VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's peak into a child process."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    uname = platform.uname()
    return {"uname": f"{uname.system} {uname.node} {uname.release} {uname.version} {uname.machine}",
            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def speed(args, device: torch.device) -> dict:
    bvals, bvecs = hardi_table()
    shape = (*HARDI_SHAPE[:2], args.slices)
    phantom = make_phantom(shape, bvals, bvecs, snr=args.snr, seed=0)
    input_path = args.out / "input" / "hardi.nii.gz"
    dwi_io.save_nifti(phantom.noisy, input_path)
    normalised, scales = normalise_volumes(phantom.noisy.data)
    truth = 2 * phantom.truth.data / scales - 1  # the truth in the noisy scan's normalisation
    shell = next(s for s in group_shells(bvals) if not s.is_b0)
    noisy_slices, truth_slices = shell_slices(normalised, shell), shell_slices(truth, shell).astype(np.float32)
    states = DiffusionSchedule().match_states(noisy_slices.reshape(-1, *shape[:2]),
                                              truth_slices.reshape(-1, *shape[:2])).clip(min=1)
    reference_state = int(np.median(states))
    figures = {"input": {"shape": [*shape, len(bvals)], "full_shape": [*HARDI_SHAPE, len(bvals)], "snr": args.snr,
                         "median_matched_state": reference_state},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "machine": machine(device)}
    figures["training"] = training_rates(torch.as_tensor(noisy_slices, device=device),
                                         torch.as_tensor(truth_slices, device=device),
                                         torch.as_tensor(states.reshape(noisy_slices.shape[:2]), device=device),
                                         bvecs[list(shell.indices)], bvals[list(shell.indices)], args, device)
    figures["inference"] = inference_rates(noisy_slices.reshape(-1, *shape[:2])[:args.inference_batch],
                                           reference_state, args, device)
    stage1_steps, stage3_steps = args.pipeline_steps
    figures["pipeline"] = whole_pipeline(
        input_path, args.out / "run", args,
        ["--device", args.device, "--preset", args.preset, "--stage1-steps", str(stage1_steps),
         "--stage3-steps", str(stage3_steps), "--sampler", "ddim", "--sampling-steps", str(args.sampling_steps),
         "--no-flips",
         "--inference-batch", str(args.inference_batch), *(["--compile"] if args.compile else [])])
    return figures


def memory_check(args) -> dict:
    bvals, bvecs = default_gradient_table(n_b0=1, n_directions=192)
    phantom = make_phantom((128, 128, 8), bvals, bvecs, snr=args.snr, seed=0)
    noisy = phantom.noisy.with_data(np.tile(phantom.noisy.data, (1, 1, 8, 1)).astype(np.float32))
    input_path = args.out / "input" / "memory.nii.gz"
    dwi_io.save_nifti(noisy, input_path)
    del phantom, noisy
    baseline = engine_baseline_rss("small", args.tiny_network)
    result = whole_pipeline(input_path, args.out / "run", args,
                            ["--device", "cpu", "--preset", "small", "--stage1-steps", "1", "--stage3-steps", "1",
                             "--sampler", "ddim", "--sampling-steps", "1", "--no-flips",
                             *(["--tiny-network"] if args.tiny_network else [])])
    figures = {"input": {"shape": [128, 128, 64, 193], "gb_float32": round(128 * 128 * 64 * 193 * 4 / 2 ** 30, 2)},
               "tiny_network": args.tiny_network, "engine_and_networks_rss_gb": round(baseline, 2), "pipeline": result,
               "peak_beyond_engine_gb": round(result["peak_rss_gb"] - baseline, 2),
               "machine": machine(torch.device("cpu"))}
    if args.tiny_network:  # what the real network's activations add at the inference batch, measured alone
        batch = Settings().resolved("cpu").inference_batch
        figures["small_network_batch_activations_gb"] = {"batch": batch,
                                                         "gb": round(activation_peak_gb(128, 128, batch), 2)}
    return figures


def activation_peak_gb(height: int, width: int, batch: int) -> float:
    """Peak RSS (GB) that one batch through the small Stage I network (n = 2, context 1) adds to a process
    that built it: the network's working memory, independent of the input's size."""
    code = ("import torch\nfrom ddm2.stage1 import input_channels\nfrom ddm2.unet import UNet, preset_config\n"
            "net = UNet(preset_config('small', in_channels=input_channels(2, 1), condition_dim=18)).eval()\n"
            f"x = torch.zeros({batch}, input_channels(2, 1), {height}, {width}); c = torch.zeros({batch}, 18)\n"
            + READ_PEAK_KB + "before = peak_kb()\n"
            "with torch.no_grad(): net(x, condition=c)\n"
            "print(peak_kb() - before)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(completed.stdout.split()[-1]) / 2 ** 20


def print_table(figures: dict) -> None:
    training_figures = figures["training"]
    print(f"Stage I {training_figures['stage1_steps_per_s']:.2f} steps/s, "
          f"Stage III {training_figures['stage3_steps_per_s']:.2f} steps/s (conditioned F), "
          f"{training_figures['stage3_paper_steps_per_s']:.2f} steps/s (the paper's F)")
    print("sampler  chain steps  flips  batch  s/slice")
    for row in figures["inference"]:
        print(f"{row['sampler']:7}  {row['chain_steps']:11}  {str(row['flips']):5}  {row['batch']:5}  "
              f"{row['s_per_slice']:.4f}")
    print("pipeline:", json.dumps(figures["pipeline"]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", choices=["small", "paper"], default="small")
    parser.add_argument("--slices", type=int, default=4,
                        help=f"slices of the input (full size: {HARDI_SHAPE[2]})")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per stage")
    parser.add_argument("--probe-steps", type=int, default=3,
                        help="chain steps timed per inference setting, then scaled (0: run every chain whole)")
    parser.add_argument("--sampling-steps", type=int, default=20, help="K of the ddim sampler")
    parser.add_argument("--inference-batch", type=int, default=64)
    parser.add_argument("--pipeline-steps", type=int, nargs=2, default=(20, 20), metavar=("STAGE1", "STAGE3"))
    parser.add_argument("--snr", type=float, default=10.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (as ddm2 --compile)")
    parser.add_argument("--memory-check", action="store_true", help="the 128 x 128 x 64 x 193 peak-RAM check")
    parser.add_argument("--tiny-network", action="store_true",
                        help="memory check with a quarter-width network (see TINY_NETWORK), plus the small "
                             "network's activations measured alone")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-speed"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.memory_check:
        figures = memory_check(args)
        print(json.dumps(figures, indent=1))
        (args.out / "memory.json").write_text(json.dumps(figures, indent=1))
        return
    figures = speed(args, torch.device(args.device))
    print_table(figures)
    (args.out / "speed.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
