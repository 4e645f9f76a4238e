"""Stage I: J-invariant inputs, and it alone lowers the error against the phantom's truth."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ddm2.data import gradient_features, group_shells, neighbour_table, normalise_volumes, shell_slices
from ddm2.phantom import default_gradient_table, make_phantom
from ddm2.progress import CancelToken, Reporter
from ddm2.stage1 import (SliceSampler, held_out_items, input_channels, predict, squared_error_sum, stage1_batch_loss,
                         stage1_inputs)
from ddm2.training import Randomness, Validation, train
from ddm2.unet import UNet, preset_config


def test_inputs_never_hold_the_target_slice_even_at_the_edges():
    n_volumes, n_slices = 5, 4
    # every (volume, slice) is a constant image holding its own id
    ids = torch.arange(n_volumes * n_slices, dtype=torch.float32).reshape(n_volumes, n_slices, 1, 1)
    slices = ids.expand(n_volumes, n_slices, 3, 3).contiguous()
    neighbours = torch.tensor(neighbour_table(np.eye(3)[[0, 1, 2, 0, 1]] * 1.0, 2, "adjacent"))
    volumes = torch.arange(n_volumes).repeat_interleave(n_slices)
    slice_index = torch.arange(n_slices).repeat(n_volumes)
    for context in (0, 1):
        inputs = stage1_inputs(slices, neighbours, volumes, slice_index, context)
        assert inputs.shape[1] == input_channels(2, context)
        target_ids = ids[volumes, slice_index].reshape(-1, 1)
        assert not torch.any(inputs[:, :, 0, 0] == target_ids)
    own = inputs[:, -2:, 0, 0]  # the target volume's slices z - 1 and z + 1 (mirrored at the edges)
    assert torch.all(own // n_slices == volumes[:, None])


def test_the_b0_guide_adds_its_slices_around_the_target_slice_mirrored_at_the_edges():
    n_volumes, n_slices = 5, 4
    slices = torch.zeros(n_volumes, n_slices, 3, 3)
    guide = (100 + torch.arange(n_slices, dtype=torch.float32))[:, None, None].expand(n_slices, 3, 3).contiguous()
    neighbours = torch.tensor(neighbour_table(np.eye(3)[[0, 1, 2, 0, 1]] * 1.0, 2, "adjacent"))
    volumes = torch.arange(n_volumes).repeat_interleave(n_slices)
    slice_index = torch.arange(n_slices).repeat(n_volumes)
    for context in (0, 1):
        inputs = stage1_inputs(slices, neighbours, volumes, slice_index, context, guide)
        channels = input_channels(2, context, guided=True)
        assert inputs.shape[1] == channels == input_channels(2, context) + 2 * context + 1
        around = (slice_index[:, None] + torch.arange(-context, context + 1)[None]).abs()
        around = torch.where(around > n_slices - 1, 2 * (n_slices - 1) - around, around)
        assert torch.equal(inputs[:, -(2 * context + 1):, 1, 1], 100 + around.float())


def test_stage1_alone_lowers_the_error_against_the_truth():
    bvals, bvecs = default_gradient_table(n_b0=1, n_directions=12)
    phantom = make_phantom((32, 32, 4), bvals, bvecs, snr=8, seed=1)
    torch.manual_seed(0)
    normalised, scales = normalise_volumes(phantom.noisy.data)
    shell = [s for s in group_shells(bvals) if not s.is_b0][0]
    slices = torch.as_tensor(shell_slices(normalised, shell))
    neighbours = neighbour_table(bvecs[list(shell.indices)], 2, "angular")
    conditions = torch.as_tensor(gradient_features(bvecs[list(shell.indices)], bvals[list(shell.indices)], neighbours))
    neighbours = torch.as_tensor(neighbours)
    model = UNet(preset_config("small", in_channels=input_channels(2, 1), condition_dim=conditions.shape[1]))
    loss = stage1_batch_loss(model, SliceSampler(slices, 8), neighbours, conditions, context=1)
    with tempfile.TemporaryDirectory() as folder:
        train(model, loss, steps=250, learning_rate=1e-3, checkpoint_path=Path(folder) / "s1.pt",
              checkpoint_every=1000, randomness=Randomness.seeded(0, torch.device("cpu")), reporter=Reporter(),
              cancel=CancelToken(folder), stage="stage1", shell="b1000", device=torch.device("cpu"))
    estimate = predict(model, slices, neighbours, conditions, 64, context=1).reshape(slices.shape)
    truth_slices = shell_slices(2 * phantom.truth.data / scales - 1, shell)  # the noisy scan's normalisation
    inside = torch.as_tensor(np.transpose(phantom.mask, (2, 0, 1)))[None].expand(slices.shape).numpy()
    noisy_rmse = np.sqrt(np.mean((slices.numpy() - truth_slices)[inside] ** 2))
    stage1_rmse = np.sqrt(np.mean((estimate - truth_slices)[inside] ** 2))
    # 250 small-network steps: at least 3 dB (RMSE x 0.71) better than the noisy input inside the head
    assert stage1_rmse < 0.71 * noisy_rmse, (stage1_rmse, noisy_rmse)


def test_held_out_slices_are_a_fixed_share_and_never_drawn_for_training():
    held_out = held_out_items(48, 0.1, seed=0)
    assert len(held_out) == 5 and np.array_equal(held_out, held_out_items(48, 0.1, seed=0))
    assert len(held_out_items(3, 0.1, seed=0)) == 1 and len(held_out_items(2, 0.9, seed=0)) == 1  # 1 <= k < n
    assert held_out_items(48, 0.0, seed=0).size == 0
    slices = torch.zeros(6, 8, 2, 2)
    training_items = np.setdiff1d(np.arange(48), held_out)
    sampler = SliceSampler(slices, batch_size=500, items=training_items)
    volumes, slice_index = sampler.draw(Randomness.seeded(0, torch.device("cpu")))
    drawn = set((volumes * 8 + slice_index).tolist())
    assert drawn == set(training_items.tolist())  # every training slice, and no held-out one


def test_the_held_out_error_sums_each_slices_mean_squared_error_against_its_noisy_values():
    class Constant(torch.nn.Module):
        def forward(self, inputs, condition=None):
            return torch.full((inputs.shape[0], 1, *inputs.shape[2:]), 0.5)

    slices = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4, 1, 1).expand(6, 4, 2, 3).contiguous() / 24
    neighbours = torch.as_tensor(neighbour_table(np.eye(3)[[0, 1, 2, 0, 1, 2]] * 1.0, 2, "adjacent"))
    items = np.array([1, 9, 22])
    expected = np.sum([(index / 24 - 0.5) ** 2 for index in items])
    assert np.isclose(squared_error_sum(Constant(), slices, neighbours, None, items, batch_size=2), expected)
    assert squared_error_sum(Constant(), slices, neighbours, None, items[:0], batch_size=2) == 0.0


def test_training_ends_on_the_weights_of_the_lowest_held_out_loss_and_resumes_that_record(tmp_path):
    model = torch.nn.Linear(1, 1)
    scripted = iter([3.0, 1.0, 2.0, 4.0])  # held-out losses at steps 5, 10, 15, 20: the best is step 10
    weights = {}

    def held_out() -> float:
        weights[len(weights) + 1] = model.weight.detach().clone()
        return next(scripted)

    def run(steps: int, validation: Validation) -> None:
        train(model, lambda randomness: (model(torch.ones(1, 1)) - 5.0).pow(2).mean(), steps=steps,
              learning_rate=0.1, checkpoint_path=tmp_path / "s1.pt", checkpoint_every=5,
              randomness=Randomness.seeded(0, torch.device("cpu")), reporter=Reporter(),
              cancel=CancelToken(str(tmp_path)), stage="stage1", shell="b1000", device=torch.device("cpu"),
              validation=validation)

    run(10, Validation(held_out, every=5))  # the first 10 steps, validated at 5 and 10: best so far 10
    resumed = Validation(held_out, every=5)
    run(20, resumed)  # resumed from step 10's checkpoint (with its validation record), validated at 15, 20
    assert resumed.history == [(5, 3.0), (10, 1.0), (15, 2.0), (20, 4.0)] and resumed.best_step == 10
    assert torch.equal(model.weight, weights[2])  # the weights that scored 1.0, not the last ones
    # and the checkpoint holds them too (Stage III's condition reads Stage I back from it)
    assert torch.equal(torch.load(tmp_path / "s1.pt", weights_only=False)["model"]["weight"], weights[2])
