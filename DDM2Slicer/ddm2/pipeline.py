"""The three stages in a run directory: the only module that knows their order.

Run directory layout::

    run.json                      parameters, versions, device, timings, the signal target's noise
                                  sigma, warnings, matched states, Stage I's held-out losses and kept
                                  step, outputs, status
    checkpoints/<shell>/stage1.pt       Stage I model + optimiser + random state + the best step's weights
                                        so far (every K steps)
    checkpoints/<shell>/stage1_estimate.npy   Stage I's estimate of every slice (computed once)
    checkpoints/<shell>/states.npy      Stage II's matched state of every slice
    checkpoints/<shell>/stage3.pt       Stage III model + optimiser + random state
    checkpoints/<shell>/denoised.npy    the shell's denoised slices; curves.npz the appendix-F RMSE curves
    denoised.nii.gz, denoised.nrrd, residual*.nii.gz, maps, report   the outputs

Every file is written under a temporary name and renamed, so a file that exists is complete and a
cancelled or crashed run resumes from the last one written.

b = 0 volumes: when there are at least n + 1 of them they form a "shell" of their own and are denoised
like any other (with adjacent neighbours: they have no direction); with fewer they are passed through
unchanged. Every shell of a multi-shell scan gets its own Stage I and Stage III models.

Under torchrun (``ddm2.distributed``) every rank runs this same sequence: Stage I and III train with
DistributedDataParallel, Stage I's estimate and the inference are split into interleaved shards of the
slices, and rank 0 alone gathers the denoised slices and writes every file. The run directory must be
one that every rank sees (one machine, or a shared file system): all ranks resume from its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from ddm2 import __version__, distributed
from ddm2 import dwi as dwi_io
from ddm2.data import (Shell, b0_guide_slices, gradient_features, group_shells, mean_b0, neighbour_table,
                       normalised_shell_slices, restore_shell_volumes, shell_neighbour_count, volume_scales)
from ddm2.dwi import DWI, InputError, atomic_path
from ddm2.noise import NoBackground, floor_signal, measure_background
from ddm2.progress import STAGE_WEIGHTS, Cancelled, CancelToken, Reporter
from ddm2.schedule import DiffusionSchedule

METHODS = ("directional", "paper")
STAGE3_CONDITIONS = ("auto", "stage1", "none")
# "auto" conditions F on Stage I (directional method only) in shells of at least this many volumes: it
# helped with 30 and 55 directions and did not with 6, where at SNR 20 it lost 1.5 dB (bench/RESULTS.md)
AUTO_CONDITION_MIN_VOLUMES = 30
B0_GUIDES = ("auto", "on", "off")
# "auto" guides Stage I and F with the mean b0 in shells of fewer than AUTO_CONDITION_MIN_VOLUMES volumes: on
# 6 directions it gained 0.05-1.3 dB and 0.005-0.12 SSIM; on 30 and 55 it gained PSNR at SNR 5 but raised
# the FA error above the noisy input's, since F then leans on the isotropic b0 (bench/RESULTS.md). And only
# where the b0s' SNR is at most AUTO_GUIDE_MAX_SNR: on 6 directions it gained 1.1 dB at SNR 5 and 0.6 at 10
# with no FA cost, 0.05 dB at SNR 20 for an FA error 0.088 -> 0.098; on the Philips scan (SNR 51) it took
# 0.03 more FA from white matter than the unguided run
AUTO_GUIDE_MAX_SNR = 15.0
# added to the seed for each stage's initial weights and training draws, so the two stages draw apart
STAGE_SEED_OFFSETS = {"stage1": 0, "stage3": 1000}
# Stage I's held-out loss is measured this many times along its training (about 2 % more compute)
VALIDATIONS_PER_TRAINING = 40
PRESET_TRAINING = {  # batch size and learning rate of each network preset
    "paper": {"batch_size": 32, "learning_rate": 1e-4},
    "small": {"batch_size": 8, "learning_rate": 1e-3},
}


@dataclass
class Settings:
    """Everything that decides a run's result (stored in run.json, reused by --resume)."""

    n: int = 0  # neighbour volumes of Stage I; 0: "auto", per shell (ddm2.data.shell_neighbour_count)
    stage1_steps: int = 1000
    stage3_steps: int = 1000
    preset: str = "auto"  # "paper" on CUDA, "small" on CPU
    seed: int = 0
    method: str = "directional"  # "paper": adjacent neighbours, no gradient information, no context
    context_slices: int = 1  # Stage I's through-plane context K (directional method only)
    # directional method: Stage I and F of a weighted shell also see the mean b0 (data.b0_guide_slices);
    # "auto": in shells of fewer than AUTO_CONDITION_MIN_VOLUMES volumes of a noisy scan (b0_guided_shells)
    b0_guide: str = "auto"
    # share of each shell's slices neither Stage I nor Stage III is trained on: each stage's loss on them
    # picks its training step to keep (early stopping); 0 trains on every slice and keeps the last steps,
    # as the paper
    holdout: float = 0.1
    stage3_condition: str = "auto"  # "stage1": F also sees Stage I's estimate (ddm2.stage3); "none": the paper's F
    # "auto": stage1 for directional shells of AUTO_CONDITION_MIN_VOLUMES or more, none otherwise
    # "mean": F is trained against the noisy slices and estimates their mean (the paper), which Rician
    # noise lifts above the signal; "signal": against the squared slices less 2 sigma^2, and estimates the
    # signal (ddm2.stage3.target_error); "auto": signal where the noise level is given or can be measured
    # on the background (ddm2.noise), mean otherwise
    # "auto" by default: the signal target scored higher than the mean target on every known-truth bench
    # case, and since F is trained on a Newton-step loss (ddm2.stage3.training_error) it no longer
    # over-smooths the real scan (bench/RESULTS.md, eighth session)
    target: str = "auto"
    noise_sigma: float = 0.0  # the noise's sigma in the input's units for the signal target; 0: from the background
    batch_size: int = 0  # 0: the preset's
    learning_rate: float = 0.0  # 0: the preset's
    # one ddim step from t* (F's prediction of the clean slice), averaged over the 4 flips: at the default
    # training lengths the best of every sampler measured, and 70x faster than the paper's every-state
    # chain ("ddpm", 3.5 dB lower on the demo; bench/RESULTS.md, ninth session), which wants 1e5 steps
    sampler: str = "ddim"
    sampling_steps: int = 1  # for the ddim sampler
    flips: bool = True
    checkpoint_every: int = 500
    inference_batch: int = 0  # 0: 64 on a GPU; 16 on CPU, where larger batches are no faster and cost RAM
    compile_network: bool = False  # torch.compile both networks: minutes of compiling, then faster steps
    save_stage1: bool = False
    write_report: bool = True

    def resolved(self, device_type: str) -> "Settings":
        """Fill the 'auto' and 0 fields for a device."""
        preset = self.preset if self.preset != "auto" else ("paper" if device_type == "cuda" else "small")
        training = PRESET_TRAINING[preset]
        return Settings(**{**asdict(self), "preset": preset,
                           "batch_size": self.batch_size or training["batch_size"],
                           "learning_rate": self.learning_rate or training["learning_rate"],
                           "inference_batch": self.inference_batch or (64 if device_type == "cuda" else 16)})

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        known = {f.name for f in fields(cls)}
        # runs recorded before Stage I held slices out trained on every slice; "stage1_holdout" is the
        # name runs recorded before Stage III held out the same slices; runs recorded before the signal
        # target estimated the mean; runs recorded before the b0 guide had none
        values = {"holdout": values.get("stage1_holdout", 0.0), "target": "mean", "b0_guide": "off", **values}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class ShellResult:
    shell: Shell
    stage1: np.ndarray | None  # (V, Z, H, W) normalised Stage I estimate; None unless save_stage1
    denoised: np.ndarray | None  # (V, Z, H, W) normalised denoised slices; None: passed through
    states: np.ndarray | None  # (V, Z)
    curves: list[np.ndarray] = field(default_factory=list)


@dataclass
class RunResult:
    denoised: DWI
    stage1: DWI | None  # Settings.save_stage1 only
    outputs: dict[str, str]
    record: dict
    curves: list[np.ndarray]  # appendix-F RMSE curve of every denoised slice, shell by shell
    outlier_flags: np.ndarray | None  # one per curve: the chain left the slice almost unchanged
    maps: dict[str, dict[str, np.ndarray]]  # "input" and "denoised": DTI maps inside the input's brain mask


# ------------------------------------------------------------------------------------- helpers

def resolve_device(requested: str, reporter: Reporter):
    """torch.device for 'auto' | 'cpu' | 'cuda' (or 'cuda:K'); says which was taken."""
    import torch

    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("CUDA was asked for (--device cuda) but torch sees no GPU: use --device cpu, "
                             "or install a CUDA build of torch that matches the driver")
        device = torch.device(requested)
    elif requested == "cpu":
        device = torch.device("cpu")
    else:
        raise InputError(f"unknown device {requested!r}: use auto, cpu or cuda")
    reporter.log(f"device: {describe_device(device)}")
    return device


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{device} ({properties.name}, {properties.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import dipy
    import nibabel
    import torch

    return {"ddm2": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "numpy": np.__version__, "dipy": dipy.__version__,
            "nibabel": nibabel.__version__}


def file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, record: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(record, indent=1, default=_json_default))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, array)


def planned_shells(dwi: DWI, n: int) -> tuple[list[Shell], list[Shell]]:
    """(shells to denoise, shells passed through) for neighbour count n (0: auto); raises for a DW
    shell too small to denoise."""
    denoised, passed = [], []
    for shell in group_shells(dwi.bvals):
        needed = shell_neighbour_count(n, len(shell.indices)) + 1
        if len(shell.indices) >= needed:
            denoised.append(shell)
        elif shell.is_b0:
            passed.append(shell)
        else:
            raise InputError(f"shell {shell.name} has {len(shell.indices)} volumes, fewer than n + 1 = {needed}: "
                             + (f"lower --n to at most {len(shell.indices) - 1}" if len(shell.indices) > 1 else
                                "a shell needs two volumes at least; leave its volume out"))
    return denoised, passed


# ------------------------------------------------------------------------------------ the run

class Run:
    """One denoising run in a run directory (fresh, or resumed)."""

    def __init__(self, dwi: DWI, run_dir: Path, settings: Settings, reporter: Reporter, device,
                 record: dict) -> None:
        self.dwi = dwi
        self.run_dir = run_dir
        self.settings = settings
        self.reporter = reporter
        self.device = device
        self.record = record
        self.cancel = CancelToken(run_dir, agree=distributed.any_rank)
        self.schedule = DiffusionSchedule()

    def save_record(self) -> None:
        if distributed.is_main():
            write_json(self.run_dir / "run.json", self.record)

    def timed(self, key: str, seconds: float) -> None:
        self.record.setdefault("timings_s", {})
        self.record["timings_s"][key] = round(self.record["timings_s"].get(key, 0.0) + seconds, 2)

    def start(self) -> RunResult | None:
        """Run the stages, keeping the status in run.json; None on ranks other than 0."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cancel.clear()
        self.save_record()
        self.reporter.event("start", run_dir=str(self.run_dir.resolve()), device=self.record["device"])
        try:
            with self.cancel.signals_handled():
                result = self.execute()
        except Cancelled:
            self.record["status"] = "cancelled"
            self.save_record()
            raise
        except BaseException as error:
            self.record["status"] = "failed"
            self.record["error"] = str(error) or type(error).__name__
            self.save_record()
            raise
        if result is None:
            return None
        self.record["status"] = "done"
        self.record["outputs"] = {**result.outputs, "run_json": str((self.run_dir / "run.json").resolve())}
        self.save_record()
        result.outputs = self.record["outputs"]
        return result

    def execute(self) -> RunResult | None:
        # memory: the input, one shell's slices, estimate and denoised slices, and the output are the only
        # input-sized arrays (no normalised copy of the whole input; bench/SPEED.md has the peak)
        scales = volume_scales(self.dwi.data)
        shells, passed = planned_shells(self.dwi, self.settings.n)
        for shell in passed:
            needed = shell_neighbour_count(self.settings.n, len(shell.indices)) + 1
            self.reporter.log(f"{shell.name}: {len(shell.indices)} volume(s), fewer than n + 1 = {needed}: "
                              "passed through unchanged")
        self.record["shells"] = {s.name: {"volumes": list(s.indices), "denoised": s in shells}
                                 for s in shells + passed}
        total_slices = sum(len(s.indices) for s in shells) or 1
        sigma = self.record.get("noise_sigma")  # the signal target's (scan_noise_sigma)
        base = 0.0
        results = []
        guided = self.b0_guided(shells)
        guide = b0_guide_slices(self.dwi.data, np.flatnonzero(self.dwi.b0_mask)) if guided else None
        for shell in shells:
            span = (1.0 - STAGE_WEIGHTS["outputs"]) * len(shell.indices) / total_slices
            # in the units of normalise_volumes' maxima, as target_error takes it
            volume_sigma = None if sigma is None else sigma / scales[list(shell.indices)]
            results.append(self.denoise_shell(shell, normalised_shell_slices(self.dwi.data, shell, scales),
                                              base, span, volume_sigma, guide if shell in guided else None))
            base += span
        if not distributed.is_main():
            return None
        self.reporter.begin("outputs", "all", base, STAGE_WEIGHTS["outputs"])
        return self.assemble(results, scales)

    def b0_guided(self, shells: list[Shell]) -> list[Shell]:
        """``b0_guided_shells`` of this run, said in the log."""
        b0_count = int(self.dwi.b0_mask.sum())
        # the shells the setting guides at a low SNR; auto asks for the b0s' SNR only where there are some
        candidates = b0_guided_shells(self.settings, shells, b0_count, 0.0)
        sigma = self.record.get("noise_sigma")
        snr = b0_snr(self.dwi, sigma) if candidates and self.settings.b0_guide == "auto" and sigma else None
        guided = b0_guided_shells(self.settings, shells, b0_count, snr)
        for shell in [shell for shell in candidates if shell not in guided]:
            why = "unknown (no noise sigma)" if snr is None else f"{snr:.3g}, above {AUTO_GUIDE_MAX_SNR:g}"
            self.reporter.log(f"{shell.name}: not guided by the b0s, whose SNR is {why}: there the guide took "
                              "anisotropy (FA) for little gain (--b0-guide on to guide it)")
        for shell in guided:
            self.reporter.log(f"{shell.name}: Stage I and F also see the mean of {b0_count} b0 volume(s) "
                              f"(--b0-guide {self.settings.b0_guide}; the b0s must be aligned with the volumes)")
        return guided

    # --------------------------------------------------------------------------- one shell
    def denoise_shell(self, shell: Shell, slices: np.ndarray, base: float, span: float,
                      sigma: np.ndarray | None, guide: np.ndarray | None = None) -> ShellResult:
        """The three stages and the inference of one shell, each skipped when its result is stored;
        sigma: the noise level of each of its volumes for the signal target (``ShellJob.stage3``);
        guide: Stage I's and F's (Z, H, W) guide slices (``b0_guide``)."""
        job = ShellJob(self, shell, slices, base, span, sigma, guide)
        estimate = job.stage1()
        states = job.stage2(estimate)
        stored = job.stored_result()
        if stored is None:
            denoiser = job.stage3(estimate, states)
            del estimate  # not needed by the inference: one shell-sized array less in memory
            stored = job.inference(denoiser, states)
        denoised, curves = stored
        # the estimate for the outputs is read from its checkpoint file, page by page, when it is written
        keep = self.settings.save_stage1 and distributed.is_main()
        stage1 = np.load(job.folder / "stage1_estimate.npy", mmap_mode="r") if keep else None
        return ShellResult(shell, stage1, denoised, states, curves)

    # ------------------------------------------------------------------------------ outputs
    def assemble(self, results: list[ShellResult], scales: np.ndarray) -> RunResult:
        started = time.monotonic()
        curves, flags = self.flag_outliers(results)
        # passed-through volumes keep their exact input values
        data = self.dwi.data.copy()
        stage1_data = self.dwi.data.copy() if self.settings.save_stage1 else None
        sigma = self.record.get("noise_sigma")
        for result in results:
            restore_shell_volumes(data, result.denoised, result.shell, scales)
            if sigma is not None:  # the signal target's estimates: never 0, for the tensor fit's logarithm
                floor_signal(data, list(result.shell.indices), sigma)
            if stage1_data is not None:
                restore_shell_volumes(stage1_data, result.stage1, result.shell, scales)
            result.denoised = result.stage1 = None  # each shell's slices are freed once in the output
        denoised = self.dwi.with_data(data)
        stage1_dwi = self.dwi.with_data(stage1_data) if stage1_data is not None else None
        outputs, maps = write_outputs(self.dwi, denoised, stage1_dwi, self.run_dir, curves, flags,
                                      self.settings.write_report, self.reporter)
        self.timed("outputs", time.monotonic() - started)
        return RunResult(denoised, stage1_dwi, outputs, self.record, curves, flags, maps)

    def flag_outliers(self, results: list[ShellResult]) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Appendix F: flag slices whose RMSE curve stays flat; recorded per shell as (volume, slice).

        Each shell is judged against its own median: in normalised units a b = 0 slice carries less noise
        than a b = 1000 one, so the chain rightly moves it less."""
        from ddm2.metrics import flag_flat_curves

        curves = [curve for result in results for curve in result.curves]
        if not curves:
            return curves, None
        shell_flags = [flag_flat_curves(result.curves) for result in results]
        for result, flags in zip(results, shell_flags):
            n_slices = result.denoised.shape[1] if result.curves else 0
            self.record["shells"][result.shell.name]["outlier_slices"] = [
                [int(result.shell.indices[i // n_slices]), int(i % n_slices)] for i in np.flatnonzero(flags)]
        return curves, np.concatenate(shell_flags)


class ShellJob:
    """One shell's stages in its checkpoint folder ``checkpoints/<shell>``; used by ``Run``."""

    def __init__(self, run: Run, shell: Shell, slices: np.ndarray, base: float, span: float,
                 sigma: np.ndarray | None = None, guide: np.ndarray | None = None) -> None:
        import torch

        from ddm2 import stage1

        self.run, self.shell, self.slices = run, shell, slices
        self.sigma_t = None if sigma is None else torch.as_tensor(sigma, dtype=torch.float32, device=run.device)
        self.settings = s = run.settings
        self.device = run.device
        self.folder = run.run_dir / "checkpoints" / shell.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base, self.span = base, span
        self.rank = distributed.rank()  # each rank draws its own batches and noise
        self.n_items = slices.shape[0] * slices.shape[1]  # flat slice index: volume * Z + slice
        bvecs = run.dwi.bvecs[list(shell.indices)]
        bvals = run.dwi.bvals[list(shell.indices)]
        directional = s.method == "directional" and not shell.is_b0
        mode = "angular" if directional else "adjacent"
        self.n = shell_neighbour_count(s.n, len(shell.indices))
        neighbours = neighbour_table(bvecs, self.n, mode)
        self.conditions = gradient_features(bvecs, bvals, neighbours) if directional else None
        self.context = stage1.usable_context(s.context_slices, slices.shape[1]) if s.method == "directional" else 0
        wanted = s.stage3_condition
        if wanted == "auto":
            wanted = "stage1" if directional and len(shell.indices) >= AUTO_CONDITION_MIN_VOLUMES else "none"
        # a conditioned F needs a second Stage I estimate from n volumes that are not among the first n
        self.conditioned = wanted == "stage1" and len(shell.indices) >= 2 * self.n + 1
        if wanted == "stage1" and not self.conditioned:
            run.reporter.log(f"stage3 [{shell.name}]: {len(shell.indices)} volumes, fewer than 2n + 1 = "
                             f"{2 * self.n + 1}: F is not conditioned on Stage I (as in the paper)")
        record = run.record["shells"][shell.name]
        record["n"] = self.n
        record["neighbours"] = neighbours.tolist()
        record["stage3_condition"] = "stage1" if self.conditioned else "none"
        self.slices_t = torch.as_tensor(slices, device=self.device)
        self.guide_t = None if guide is None else torch.as_tensor(guide, device=self.device)
        record["b0_guide"] = guide is not None
        self.neighbours_t = torch.as_tensor(neighbours, device=self.device)
        self.conditions_t = torch.as_tensor(self.conditions, device=self.device) if directional else None
        if self.conditioned:
            second = neighbour_table(bvecs, self.n, mode, ring=1)
            record["second_neighbours"] = second.tolist()
            self.second_neighbours_t = torch.as_tensor(second, device=self.device)
            self.second_conditions_t = torch.as_tensor(gradient_features(bvecs, bvals, second),
                                                       device=self.device) if directional else None
        # slices neither stage trains on: their loss picks each stage's step to keep (``train``)
        self.held_out = stage1.held_out_items(self.n_items, s.holdout, s.seed)
        self.batches = stage1.SliceSampler(self.slices_t, s.batch_size,
                                           np.setdiff1d(np.arange(self.n_items), self.held_out))

    def begin(self, stage: str) -> None:
        """Tell the reporter which part of the whole run the stage covers."""
        weights = {k: STAGE_WEIGHTS[k] / (1 - STAGE_WEIGHTS["outputs"]) for k in STAGE_WEIGHTS}
        order = ("stage1", "stage2", "stage3", "inference")
        start = sum(weights[k] for k in order[:order.index(stage)])
        self.run.reporter.begin(stage, self.shell.name, self.base + self.span * start, self.span * weights[stage])

    def train(self, model, batch_loss, stage: str, steps: int,
              held_out_error_sum: Callable[[np.ndarray], float]) -> None:
        """Train a stage's network; with held-out slices, end on the step of lowest mean
        ``held_out_error_sum`` (slice indices -> summed error on them), recorded in run.json."""
        from ddm2 import training

        validation = None
        if self.held_out.size:
            def held_out_loss() -> float:  # each rank scores its share of the held-out slices; all get the mean
                return distributed.sum_all(held_out_error_sum(distributed.shard(self.held_out))) / self.held_out.size

            validation = training.Validation(held_out_loss, every=max(1, steps // VALIDATIONS_PER_TRAINING))
        seed = self.settings.seed + STAGE_SEED_OFFSETS[stage] + self.rank
        training.train(model, batch_loss, steps=steps, learning_rate=self.settings.learning_rate,
                       checkpoint_path=self.folder / f"{stage}.pt", checkpoint_every=self.settings.checkpoint_every,
                       randomness=training.Randomness.seeded(seed, self.device),
                       reporter=self.run.reporter, cancel=self.run.cancel, stage=stage, shell=self.shell.name,
                       device=self.device, validation=validation)
        if validation is not None:
            self.run.record["shells"][self.shell.name][f"{stage}_validation"] = {
                "held_out_slices": int(self.held_out.size), "kept_step": validation.best_step,
                "losses": [[step, loss] for step, loss in validation.history]}
            self.run.reporter.log(f"{stage} [{self.shell.name}]: kept step {validation.best_step} of {steps} "
                                  f"(lowest loss on {self.held_out.size} held-out slices)")

    def stage1(self) -> np.ndarray:
        """Stage I's estimate of every slice (V, Z, H, W): trained and computed once, then read back."""
        from ddm2 import stage1, training

        path = self.folder / "stage1_estimate.npy"
        if path.exists():
            return np.load(path)
        self.begin("stage1")
        started = time.monotonic()
        s = self.settings
        phi = training.prepare_model(self.stage1_network(), self.device, s.compile_network)
        self.train(phi, stage1.stage1_batch_loss(phi, self.batches, self.neighbours_t, self.conditions_t, self.context,
                                                 self.guide_t),
                   "stage1", s.stage1_steps,
                   lambda items: stage1.squared_error_sum(training.unwrap(phi), self.slices_t, self.neighbours_t,
                                                          self.conditions_t, items, s.inference_batch, self.context,
                                                          self.guide_t))
        items = distributed.shard(np.arange(self.n_items))
        rows = stage1.predict(training.unwrap(phi), self.slices_t, self.neighbours_t, self.conditions_t,
                              s.inference_batch, self.context, items, self.guide_t)
        # every rank needs the whole estimate: Stage II and III use all of it
        estimate = distributed.gather_rows(rows, items, self.n_items, to_all=True)[0].reshape(self.slices.shape)
        if distributed.is_main():
            save_array(path, estimate)
        self.run.timed(f"stage1_{self.shell.name}", time.monotonic() - started)
        self.run.save_record()
        return estimate

    def new_network(self, stage: str, **config):
        """An untrained U-Net of the preset with ``config``, its initial weights drawn from the seed, the
        shell's name and the stage only: a resumed run builds no network for the stages it skips, so
        weights drawn from the global generator would start its later networks elsewhere than an
        uninterrupted run's."""
        import torch

        from ddm2.unet import UNet, preset_config

        with torch.random.fork_rng(devices=[]):  # the weights are drawn on the CPU, then moved
            torch.manual_seed(self.settings.seed + STAGE_SEED_OFFSETS[stage] + zlib.crc32(self.shell.name.encode()))
            return UNet(preset_config(self.settings.preset, **config))

    def stage1_network(self):
        """Stage I's U-Net for this shell's inputs, untrained."""
        from ddm2 import stage1

        condition_dim = self.conditions.shape[1] if self.conditions is not None else 0
        return self.new_network("stage1", in_channels=stage1.input_channels(self.n, self.context,
                                                                            self.guide_t is not None),
                                condition_dim=condition_dim)

    @cached_property
    def trained_stage1(self):
        """Stage I's trained network, read back once from its checkpoint (a resumed run has none in memory)."""
        from ddm2 import training

        phi = self.stage1_network().to(self.device).eval()
        phi.load_state_dict(training.load_checkpoint(self.folder / "stage1.pt", self.device)["model"])
        return phi

    def stage1_estimates(self, neighbours, conditions):
        """(volumes, slice_index) -> Stage I's estimate (B, 1, H, W) from the given neighbour table."""
        from ddm2 import stage1

        return lambda volumes, slice_index: stage1.estimate_batch(self.trained_stage1, self.slices_t, neighbours,
                                                                  conditions, volumes, slice_index, self.context,
                                                                  self.guide_t)

    def stage2(self, estimate: np.ndarray) -> np.ndarray:
        """Stage II: the matched state of every slice (V, Z), >= 1; recorded in run.json."""
        run, name = self.run, self.shell.name
        self.begin("stage2")
        started = time.monotonic()
        matched = run.schedule.match_states(self.slices.reshape(-1, *self.slices.shape[2:]),
                                            estimate.reshape(-1, *estimate.shape[2:]))
        raised = int((matched == 0).sum())
        if raised:
            run.reporter.log(f"stage2 [{name}]: {raised} slice(s) matched state 0 (no noise found, "
                             "e.g. empty slices); raised to state 1")
        states = matched.clip(min=1).reshape(self.slices.shape[:2])
        run.reporter.progress("stage2", name, 1, 1)
        run.record["shells"][name]["stage2"] = {
            "states": states.tolist(), "raised_from_zero": raised,
            "median_state": float(np.median(states)), "min_state": int(states.min()),
            "max_state": int(states.max()),
            "noise_std_median": float(np.median(run.schedule.noise_std[states]))}
        run.timed(f"stage2_{name}", time.monotonic() - started)
        run.save_record()
        return states

    def stored_result(self) -> tuple[np.ndarray, list[np.ndarray]] | None:
        """(denoised slices, RMSE curves) of a finished inference of this shell, if stored."""
        denoised_path, curves_path = self.folder / "denoised.npy", self.folder / "curves.npz"
        if not (denoised_path.exists() and curves_path.exists()):
            return None
        with np.load(curves_path) as stored:
            curves = [stored[f"slice{i}"] for i in range(len(stored.files))]
        return np.load(denoised_path), curves

    def stage3(self, estimate: np.ndarray, states: np.ndarray):
        """Stage III: the diffusion denoiser F, trained on Stage I's estimate and shuffled residuals."""
        import torch

        from ddm2 import stage3, training

        self.begin("stage3")
        started = time.monotonic()
        channels = 1 + self.conditioned + (self.guide_t is not None)
        denoiser = training.prepare_model(self.new_network("stage3", in_channels=channels, noise_embedding=True),
                                          self.device, self.settings.compile_network)
        second = self.stage1_estimates(self.second_neighbours_t, self.second_conditions_t) if self.conditioned else None
        estimate_t = torch.as_tensor(estimate, device=self.device)
        states_t = torch.as_tensor(states, device=self.device)
        loss = stage3.stage3_batch_loss(denoiser, self.batches, estimate_t, states_t, self.run.schedule, second,
                                        self.sigma_t, self.guide_t)
        s = self.settings
        self.train(denoiser, loss, "stage3", s.stage3_steps,
                   lambda items: stage3.held_out_squared_error_sum(
                       training.unwrap(denoiser), self.slices_t, estimate_t, states_t, self.run.schedule, items,
                       s.inference_batch, s.seed + 2000, second, self.sigma_t, self.guide_t))
        self.run.timed(f"stage3_{self.shell.name}", time.monotonic() - started)
        return denoiser

    def inference(self, denoiser, states: np.ndarray) -> tuple[np.ndarray | None, list[np.ndarray]]:
        """The reverse chain on every slice, sharded over the ranks; stored by rank 0, which alone gets
        (denoised (V, Z, H, W), RMSE curves); other ranks get (None, [])."""
        import torch

        from ddm2 import sampler, training

        run, s, name = self.run, self.settings, self.shell.name
        self.begin("inference")
        started = time.monotonic()

        def on_batch(done: int, total: int) -> None:
            run.reporter.progress("inference", name, done, total)
            run.cancel.check()

        flat_states = states.reshape(-1)
        condition = None
        n_slices = self.slices.shape[1]
        if self.conditioned or self.guide_t is not None:
            # Stage I's estimate recomputed batch by batch: no shell-sized estimate in memory
            estimates = self.stage1_estimates(self.neighbours_t, self.conditions_t) if self.conditioned else None

            def condition(items: np.ndarray):
                index = torch.as_tensor(items, device=self.device)
                parts = [] if estimates is None else [estimates(index // n_slices, index % n_slices)]
                if self.guide_t is not None:
                    parts.append(self.guide_t[index % n_slices][:, None])
                return torch.cat(parts, dim=1)
        # interleaved shards of the slices sorted by state: every rank gets as many long chains as short.
        # A shard in slice order: one process then holds no reordered copy of the shell (the sampler
        # batches by state itself)
        items = np.sort(distributed.shard(np.argsort(flat_states, kind="stable")))
        rows, curves_here = sampler.denoise_slices(
            training.unwrap(denoiser), self.slices.reshape(-1, *self.slices.shape[2:]), flat_states, run.schedule,
            items=items, sampler=s.sampler, steps=s.sampling_steps, flips=s.flips, batch_size=s.inference_batch,
            device=self.device, randomness=training.Randomness.seeded(s.seed + 2000 + self.rank, self.device),
            condition=condition, on_batch=on_batch)

        def batch_count(count: int) -> int:
            return -(-count // s.inference_batch)

        # a rank with a shorter shard ran fewer batches: it still joins every collective cancel decision
        for _ in range(batch_count(distributed.longest_shard(self.n_items)) - batch_count(len(items))):
            run.cancel.check()
        flat, items_by_rank = distributed.gather_rows(rows, items, self.n_items, to_all=False)
        curves_by_rank = distributed.gather_objects(curves_here)
        if not distributed.is_main():
            return None, []
        curves: list[np.ndarray] = [np.empty(0)] * self.n_items
        for rank_items, rank_curves in zip(items_by_rank, curves_by_rank):
            for item, curve in zip(rank_items, rank_curves):
                curves[item] = curve
        run.record["shells"][name]["inference_slices_by_rank"] = [part.tolist() for part in items_by_rank]
        denoised = flat.reshape(self.slices.shape)
        with atomic_path(self.folder / "curves.npz") as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, **{f"slice{i}": c for i, c in enumerate(curves)})
        save_array(self.folder / "denoised.npy", denoised)
        run.timed(f"inference_{name}", time.monotonic() - started)
        run.save_record()
        return denoised, curves


def b0_guided_shells(settings: Settings, shells: list[Shell], b0_count: int,
                     snr: float | None = None) -> list[Shell]:
    """The shells whose Stage I and F see the mean b0 (``Settings.b0_guide``): the diffusion-weighted
    shells; with "auto" those of fewer than AUTO_CONDITION_MIN_VOLUMES volumes and only where the b0s'
    ``snr`` (``b0_snr``) is known and at most AUTO_GUIDE_MAX_SNR; none with the paper's method or
    without a b0 in the input."""
    if settings.b0_guide == "off" or settings.method != "directional" or not b0_count:
        return []
    if settings.b0_guide == "auto" and (snr is None or snr > AUTO_GUIDE_MAX_SNR):
        return []
    return [shell for shell in shells if not shell.is_b0
            and (settings.b0_guide == "on" or len(shell.indices) < AUTO_CONDITION_MIN_VOLUMES)]


def b0_snr(dwi: DWI, sigma: float) -> float:
    """The mean b0 inside the brain mask (``maps.brain_mask``) over the noise's sigma: the SNR by
    which the bench's cases are made (``phantom.noise_level``)."""
    from ddm2.maps import brain_mask

    mask = brain_mask(dwi.data, dwi.bvals)
    return float(mean_b0(dwi.data, np.flatnonzero(dwi.b0_mask))[mask].mean() / sigma)


def scan_noise_sigma(dwi: DWI, settings: Settings) -> tuple[float | None, str, list[str]]:
    """The noise's sigma (input units) for Stage III's signal target, given or measured on the
    background, or None for the mean target; a line for the log; and warnings: why a measured sigma
    may be off, where the background does not look like pure noise. Without a background to measure,
    target "signal" raises NoBackground (an InputError) and "auto" falls back to the mean target."""
    if not settings.noise_sigma >= 0 or not np.isfinite(settings.noise_sigma):
        raise InputError(f"--noise-sigma {settings.noise_sigma} is not a noise level: give the noise's sigma in "
                         "the input's units, or leave it out to have it measured on the background")
    if settings.target == "mean":
        return None, "Stage III estimates the noisy data's mean (--target mean)", []
    if settings.noise_sigma:
        return settings.noise_sigma, signal_target_note(settings.noise_sigma, "given"), []
    try:
        background = measure_background(dwi.data, dwi.bvals)
    except NoBackground as error:
        if settings.target == "signal":
            raise
        return None, (f"no noise level to measure ({error.measured}): Stage III estimates the noisy data's mean, "
                      "as in the paper. Give --noise-sigma to have it estimate the signal"), []
    note = signal_target_note(background.sigma, "measured on the background")
    return background.sigma, note, [doubt for doubt in [background.doubt()] if doubt]


def signal_target_note(sigma: float, source: str) -> str:
    return f"noise sigma {sigma:.4g} ({source}): Stage III estimates the signal"


def write_maps(dwi: DWI, mask: np.ndarray, out_dir: Path,
               suffix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """DTI maps of ``dwi`` inside ``mask``, written as ``<map><suffix>.nii.gz``; returns (maps, name -> path)."""
    from ddm2.maps import dti_maps

    maps = dti_maps(dwi.data, dwi.bvals, dwi.bvecs_voxel(), mask=mask)
    written = {f"{name}{suffix}": dwi_io.save_volume(volume, dwi.affine, out_dir / f"{name}{suffix}.nii.gz")
               for name, volume in maps.items()}
    return maps, written


def residual_rms(noisy: DWI, denoised: DWI) -> np.ndarray:
    """(X, Y, Z) root mean square of noisy - denoised over the diffusion-weighted volumes, accumulated
    one volume at a time (no input-sized temporaries)."""
    total = np.zeros(noisy.data.shape[:3])
    weighted = np.flatnonzero(~noisy.b0_mask)
    for volume in weighted:
        total += (noisy.data[..., volume].astype(np.float64) - denoised.data[..., volume]) ** 2
    return np.sqrt(total / max(len(weighted), 1)).astype(np.float32)


def write_outputs(noisy: DWI, denoised: DWI, stage1: DWI | None, run_dir: Path, curves: list[np.ndarray],
                  flags: np.ndarray | None, write_report: bool,
                  reporter: Reporter) -> tuple[dict[str, str], dict[str, dict[str, np.ndarray]]]:
    """Write every output of the contract into ``run_dir``; returns (name -> absolute path, the maps)."""
    from ddm2.maps import brain_mask

    outputs: dict[str, Path] = {}
    steps = 6
    reporter.progress("outputs", "all", 0, steps)
    outputs["denoised"] = dwi_io.save_nifti(denoised, run_dir / "denoised.nii.gz")[0]
    outputs["denoised_nrrd"] = dwi_io.save_nrrd(denoised, run_dir / "denoised.nrrd")
    if stage1 is not None:
        outputs["stage1"] = dwi_io.save_nifti(stage1, run_dir / "stage1.nii.gz")[0]
    reporter.progress("outputs", "all", 2, steps)
    residual = noisy.data - denoised.data
    outputs["residual"] = dwi_io.save_volume(residual, noisy.affine, run_dir / "residual.nii.gz")
    del residual  # input-sized: freed before the tensor fits
    outputs["residual_rms"] = dwi_io.save_volume(residual_rms(noisy, denoised), noisy.affine,
                                                 run_dir / "residual_rms.nii.gz")
    reporter.progress("outputs", "all", 3, steps)
    mask = brain_mask(noisy.data, noisy.bvals)
    outputs["mask"] = dwi_io.save_volume(mask.astype(np.float32), noisy.affine, run_dir / "mask.nii.gz")
    maps = {}
    for key, suffix, source in (("denoised", "", denoised), ("input", "_input", noisy)):
        maps[key], written = write_maps(source, mask, run_dir, suffix)
        outputs.update(written)
    reporter.progress("outputs", "all", 5, steps)
    if write_report:
        from ddm2.report import write_report as render_report

        png, html = render_report(noisy, denoised, run_dir / "report.png", run_dir / "report.html",
                                  maps_input=maps["input"], maps_denoised=maps["denoised"],
                                  outlier_curves=curves or None, outlier_flags=flags,
                                  title=f"DDM2: {Path(noisy.source).name or 'input'}")
        outputs["report_png"], outputs["report_html"] = png, html
    reporter.progress("outputs", "all", steps, steps)
    return {name: str(Path(path).resolve()) for name, path in outputs.items()}, maps


# ---------------------------------------------------------------------------------- entry point

def denoise(input_path: str | Path, out_dir: str | Path, settings: Settings, reporter: Reporter, *,
            bval: str | None = None, bvec: str | None = None, device: str = "auto",
            resume: bool = False, dwi: DWI | None = None) -> RunResult | None:
    """Denoise a DWI file into ``out_dir`` (see the module docstring), resuming if asked; under torchrun
    the result is rank 0's, None on the other ranks.

    Raises InputError for bad input, Cancelled when cancelled (checkpoint written; resumable).
    """
    run_dir = Path(out_dir)
    record_path = run_dir / "run.json"
    input_files = [Path(input_path)] + [Path(p) for p in (bval, bvec) if p]
    if dwi is None:
        dwi = dwi_io.load(input_path, bval, bvec)
    dwi_io.validate(dwi, settings.n or None)
    planned_shells(dwi, settings.n)  # a shell too small for n is refused before anything is written
    if run_dir.resolve() == Path(input_path).resolve().parent:
        raise InputError(f"--out {run_dir} is the input's own folder: choose another --out, so that no "
                         "output can overwrite the input")
    digest = file_digest([p for p in input_files if p.exists()])

    if resume:
        if not record_path.exists():
            raise InputError(f"nothing to resume in {run_dir} (no run.json): run without --resume")
        record = json.loads(record_path.read_text())
        if record.get("input_sha256") != digest:
            raise InputError(f"{input_path} is not the input of the run in {run_dir}: give the same input "
                             "to --resume, or start a new run in another --out")
        stored = Settings.from_dict(record["parameters"])
    else:
        if record_path.exists():
            raise InputError(f"{run_dir} already holds a run: pass --resume to continue it, or choose "
                             "another --out")
        record, stored = {}, None

    # a resumed run keeps its own target (below) and noise level; a scan with no noise to measure is refused
    # before anything
    if "noise_sigma" in record:
        sigma = record["noise_sigma"]
        noise_note = signal_target_note(sigma, "the run's")
    else:
        sigma, noise_note, record["warnings"] = scan_noise_sigma(dwi, stored or settings)
    if sigma is not None:
        record["noise_sigma"] = sigma
    torch_device = distributed.rank_device(resolve_device(device, reporter))
    reporter.log(noise_note)
    for warning in record.get("warnings", []):  # a resumed run's too: they hold for its results
        reporter.warn(warning)
    settings = settings.resolved(torch_device.type)
    if stored is not None:
        changed = [f"{name} {value} (the run's: {getattr(stored, name)})"
                   for name, value in asdict(settings).items() if getattr(stored, name) != value]
        if changed:  # a resumed run keeps what it was trained and sampled with; say what that leaves out
            reporter.log(f"resuming with the run's own settings; not applied: {', '.join(changed)}. "
                         "Start a new run in another --out to use them")
        settings = stored
    record.update({"status": "running", "input": str(Path(input_path).resolve()), "input_sha256": digest,
                   "shape": list(dwi.data.shape), "parameters": asdict(settings), "versions": versions(),
                   "device": describe_device(torch_device), "processes": distributed.world_size()})
    run = Run(dwi, run_dir, settings, reporter, torch_device, record)
    with distributed.process_group(torch_device):
        return run.start()
