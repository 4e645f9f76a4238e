"""The optimisation loop shared by Stage I and Stage III: Adam, cosine learning rate, checkpoints
every K steps and on cancellation, resume from the last checkpoint, progress events.

Under torchrun the model comes wrapped in DistributedDataParallel (``ddm2.distributed.wrap``): every
rank runs this loop on its own batches, rank 0 alone writes the checkpoint, which holds the random
state of every rank, and every rank resumes from it."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ddm2 import distributed
from ddm2.dwi import InputError, atomic_path
from ddm2.progress import Cancelled, CancelToken, Reporter


@dataclass
class Randomness:
    """The generators a stage draws from: indices on the CPU, noise on the compute device."""

    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> "Randomness":
        cpu = torch.Generator().manual_seed(seed)
        on_device = torch.Generator(device=device).manual_seed(seed + 1)
        return cls(cpu, on_device)

    def state(self) -> dict:
        return {"cpu": self.cpu.get_state(), "device": self.device.get_state()}

    def restore(self, state: dict) -> None:
        self.cpu.set_state(state["cpu"])
        self.device.set_state(state["device"])


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores, half the activation memory); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device, compile_network: bool = False) -> nn.Module:
    """The network ready to train on ``device``: channels-last memory on CUDA (the layout tensor-core
    convolutions run in; cuDNN then keeps activations in it too), compiled in place with torch.compile
    if asked (the state dict keeps its keys, so checkpoints load either way), and wrapped in
    DistributedDataParallel under torchrun."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile_network:
        model.compile()
    return distributed.wrap(model, device)


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, under a DistributedDataParallel wrapper or not."""
    return model.module if hasattr(model, "module") else model


def restore_randomness(randomness: Randomness, by_rank: list[dict], checkpoint_path: Path) -> None:
    """Continue this rank's random streams from a checkpoint written by the same number of ranks."""
    if len(by_rank) != distributed.world_size():
        raise InputError(f"{checkpoint_path} was written by {len(by_rank)} process(es): resume with the same "
                         "number (torchrun --nproc_per_node, or no torchrun for 1)")
    randomness.restore(by_rank[distributed.rank()])


@dataclass
class Validation:
    """Early stopping on a held-out loss: ``train`` evaluates ``loss`` (model in eval mode) every
    ``every`` steps and at the last one, and ends with the weights of the step where it was lowest."""

    loss: Callable[[], float]
    every: int
    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    best_loss: float = math.inf
    best_model: dict | None = None

    def evaluate(self, model: nn.Module, step: int) -> None:
        model.eval()
        loss = float(self.loss())
        model.train()
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.best_model = {name: value.detach().clone() for name, value in unwrap(model).state_dict().items()}

    def state(self) -> dict:
        return {"history": self.history, "best_step": self.best_step, "best_loss": self.best_loss,
                "best_model": self.best_model}

    def restore(self, state: dict) -> None:
        self.history = [tuple(entry) for entry in state["history"]]
        self.best_step, self.best_loss, self.best_model = state["best_step"], state["best_loss"], state["best_model"]


def train(model: nn.Module, batch_loss: Callable[[Randomness], torch.Tensor], *, steps: int,
          learning_rate: float, checkpoint_path: Path, checkpoint_every: int, randomness: Randomness,
          reporter: Reporter, cancel: CancelToken, stage: str, shell: str, device: torch.device,
          validation: Validation | None = None) -> list[float]:
    """Minimise ``batch_loss`` for ``steps`` steps, resuming from ``checkpoint_path`` if it exists.

    The checkpoint holds the model, optimiser, scheduler, step and random states (and the validation's
    record), so a resumed run draws the same batches as an uninterrupted one. Raises ``Cancelled``
    (after checkpointing) when a cancel is requested; under torchrun the ranks decide it together
    (``cancel``'s agreement), so all stop at the same step. With a ``validation``, the model ends with
    its weights of the validated step of lowest held-out loss. Returns the loss of every step run in
    this call.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    # cosine decay to 1% so that short CPU budgets still end on small steps
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1),
                                                           eta_min=learning_rate * 0.01)
    step = 0
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_randomness(randomness, state["randomness"], checkpoint_path)
        step = state["step"]
        if validation is not None and state.get("validation"):
            validation.restore(state["validation"])
        if step < steps:
            reporter.log(f"{stage} [{shell}]: resuming at step {step} of {steps}")

    def checkpoint() -> None:
        randomness_by_rank = distributed.gather_objects(randomness.state())  # a collective: every rank
        if distributed.is_main():
            save_checkpoint(checkpoint_path, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), randomness=randomness_by_rank, step=step,
                            validation=validation.state() if validation is not None else None)

    losses = []
    model.train()
    try:
        while step < steps:
            cancel.check()
            with autocast(device):
                loss = batch_loss(randomness)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            reporter.progress(stage, shell, step, steps, loss=losses[-1])
            if validation is not None and (step % validation.every == 0 or step == steps):
                validation.evaluate(model, step)
            if step % checkpoint_every == 0 or step == steps:
                checkpoint()
    except Cancelled:
        checkpoint()  # keep what was learned; every rank stops here, so all take part in the checkpoint
        raise
    except BaseException:
        if not distributed.active():  # other ranks may be inside a collective: the last periodic one stands
            checkpoint()  # interrupted or failed: keep what was learned
        raise
    if validation is not None and validation.best_model is not None and validation.best_step != step:
        unwrap(model).load_state_dict(validation.best_model)
        checkpoint()  # the stored model is the one kept: later stages read it back from the checkpoint
    model.eval()
    return losses
