"""Keeping the largest connected region of a probability map."""

import numpy as np

from TextDiffSegLib.postprocessing import keep_largest_component


def test_islands_are_removed_and_the_largest_region_kept_as_it_was():
    probability = np.zeros((6, 10, 10), np.float32)
    probability[1:4, 1:5, 1:5] = 0.9  # the organ
    probability[5, 8, 8] = 0.7  # an island
    probability[0, 9, 0] = 0.3  # below threshold: left alone
    kept = keep_largest_component(probability)
    assert kept[5, 8, 8] == 0
    np.testing.assert_array_equal(kept[1:4, 1:5, 1:5], probability[1:4, 1:5, 1:5])
    assert kept[0, 9, 0] == np.float32(0.3)
    assert kept.dtype == probability.dtype


def test_a_single_region_or_an_empty_map_is_unchanged():
    probability = np.zeros((4, 4, 4), np.float32)
    np.testing.assert_array_equal(keep_largest_component(probability), probability)
    probability[1:3, 1:3, 1:3] = 0.8
    np.testing.assert_array_equal(keep_largest_component(probability), probability)
