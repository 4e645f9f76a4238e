"""Normalisation, shells, neighbours and gradient encodings."""

from __future__ import annotations

import numpy as np
import pytest

from ddm2.data import (adjacent_neighbours, angular_neighbours, b0_guide_slices, denormalise_volumes, gradient_features,
                       group_shells, neighbour_table, normalise_volumes, normalised_shell_slices, restore_shell_volumes,
                       shell_neighbour_count, shell_slices)


def test_normalisation_round_trips_to_float32_precision():
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 3000, size=(7, 5, 3, 6)).astype(np.float32)
    data[..., 2] = 0  # an empty volume must not divide by zero
    normalised, scales = normalise_volumes(data)
    assert normalised.min() >= -1 and normalised.max() <= 1
    assert np.allclose(normalised.reshape(-1, 6).max(axis=0)[[0, 1, 3, 4, 5]], 1.0)
    back = denormalise_volumes(normalised, scales)
    assert back.dtype == np.float32
    # exact up to one float32 rounding of the normalised value (relative 6e-8 of the volume's maximum)
    assert np.max(np.abs(back - data) / scales) < 2e-7


def test_shells_group_b0_and_each_b_value_in_input_order():
    bvals = np.array([5, 1000, 2000, 990, 0, 3000, 2010, 1005])
    shells = group_shells(bvals)
    assert [s.name for s in shells] == ["b0", "b1000", "b2000", "b3000"]
    assert [s.indices for s in shells] == [(0, 4), (1, 3, 7), (2, 6), (5,)]
    assert shells[0].is_b0 and not shells[1].is_b0


def test_adjacent_neighbours_wrap_around_like_the_authors():
    assert adjacent_neighbours(5, 2).tolist() == [[4, 1], [0, 2], [1, 3], [2, 4], [3, 0]]
    assert adjacent_neighbours(4, 1).tolist() == [[3], [0], [1], [2]]


def test_the_second_ring_of_neighbours_shares_no_volume_with_the_first():
    assert adjacent_neighbours(5, 2, ring=1).tolist() == [[3, 2], [4, 3], [0, 4], [1, 0], [2, 1]]
    assert adjacent_neighbours(7, 3, ring=1).tolist()[0] == [3, 4, 2]  # v-4, v-3, v+2
    bvecs = np.array([[1, 0, 0], [0, 1, 0], [-0.99, 0.141, 0], [0, 0, 1], [0.1, 0.995, 0], [0.7, 0.7, 0.14]])
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    first, second = neighbour_table(bvecs, 2, "angular"), neighbour_table(bvecs, 2, "angular", ring=1)
    for v in range(len(bvecs)):
        assert len({v, *first[v], *second[v]}) == 5
    assert second[0].tolist() == [4, 1]  # after 2 and 5, the next closest to x
    with pytest.raises(ValueError, match="2 n <= 3"):
        neighbour_table(bvecs[:4], 2, "angular", ring=1)


def test_angular_neighbours_are_closest_in_angle_whatever_the_sign():
    bvecs = np.array([[1, 0, 0], [0, 1, 0], [-0.99, 0.141, 0], [0, 0, 1], [0.1, 0.995, 0]])
    table = angular_neighbours(bvecs, 1)
    assert table[:, 0].tolist() == [2, 4, 0, 0, 1]


def test_gradient_features_do_not_depend_on_the_sign_of_a_gradient():
    rng = np.random.default_rng(1)
    bvecs = rng.normal(size=(6, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvals = np.full(6, 1000.0)
    table = adjacent_neighbours(6, 2)
    flipped = bvecs * np.array([1, -1, 1, -1, 1, -1])[:, None]
    np.testing.assert_allclose(gradient_features(bvecs, bvals, table), gradient_features(flipped, bvals, table))
    assert gradient_features(bvecs, bvals, table).shape == (6, 18)


def test_shell_slices_and_back_restore_the_volumes():
    from ddm2.data import Shell

    rng = np.random.default_rng(3)
    data = rng.uniform(0, 900, (4, 3, 2, 5)).astype(np.float32)
    shell = Shell("b1000", 1000, (1, 3, 4))
    normalised, scales = normalise_volumes(data)
    slices = normalised_shell_slices(data, shell, scales)
    assert slices.shape == (3, 2, 4, 3)
    # the same bits as normalising the whole input first, and the exact inverse back into the volumes
    np.testing.assert_array_equal(slices, shell_slices(normalised, shell))
    target = np.zeros_like(data)
    restore_shell_volumes(target, slices, shell, scales)
    np.testing.assert_array_equal(target[..., [1, 3, 4]], denormalise_volumes(normalised, scales)[..., [1, 3, 4]])
    np.testing.assert_allclose(target[..., [1, 3, 4]], data[..., [1, 3, 4]], rtol=1e-6)
    assert not target[..., [0, 2]].any()  # other volumes untouched


def test_the_b0_guide_is_the_mean_b0_in_slice_layout_scaled_to_plus_minus_one():
    data = np.zeros((2, 3, 2, 4), dtype=np.float32)
    data[..., 0] = np.arange(12).reshape(2, 3, 2)
    data[..., 2] = 2 * np.arange(12).reshape(2, 3, 2)
    data[..., [1, 3]] = 1000.0  # weighted volumes: not in the mean
    guide = b0_guide_slices(data, np.array([0, 2]))
    assert guide.shape == (2, 2, 3) and guide.dtype == np.float32  # (Z, H, W)
    mean = 1.5 * np.arange(12).reshape(2, 3, 2)
    np.testing.assert_allclose(guide, np.transpose(2 * mean / mean.max() - 1, (2, 0, 1)), atol=1e-7)
    assert guide.min() == -1 and guide.max() == 1


def test_auto_n_leaves_stage3_a_second_disjoint_set_and_takes_at_most_eight():
    volumes = [1, 2, 3, 5, 6, 8, 12, 17, 18, 55]
    assert [shell_neighbour_count(0, v) for v in volumes] == [1, 1, 1, 2, 2, 3, 5, 8, 8, 8]
    assert all(2 * shell_neighbour_count(0, v) + 1 <= v for v in volumes if v >= 3)
    assert shell_neighbour_count(3, 55) == 3  # a given n is kept
