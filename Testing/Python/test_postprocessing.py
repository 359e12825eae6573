"""Keeping the largest connected region of a probability map; separating the masks of neighbouring structures."""

import numpy as np

from TextDiffSegLib.postprocessing import keep_largest_component, separate_overlaps, smooth_across_slices


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


def test_smoothing_across_slices_spreads_a_slice_to_its_neighbours_only_along_z():
    probability = np.zeros((9, 3, 3), np.float32)
    probability[4, 1, 1] = 1.0  # one voxel on one slice
    smoothed = smooth_across_slices(probability, 1.0)
    assert smoothed.dtype == probability.dtype
    assert smoothed[4, 1, 1] < 1 and smoothed[3, 1, 1] == smoothed[5, 1, 1] > smoothed[2, 1, 1] > 0
    assert np.isclose(smoothed[:, 1, 1].sum(), 1.0)
    elsewhere = np.ones(probability.shape, bool)
    elsewhere[:, 1, 1] = False
    np.testing.assert_array_equal(smoothed[elsewhere], 0)  # nothing spread in-plane
    np.testing.assert_array_equal(smooth_across_slices(probability, 0.0), probability)


def test_a_voxel_two_masks_claim_goes_to_the_structure_more_probable_there():
    liver, spleen = np.zeros((1, 1, 4), np.uint8), np.zeros((1, 1, 4), np.uint8)
    liver[..., :3], spleen[..., 1:] = 1, 1  # they both claim voxels 1 and 2
    liver_probability = np.array([[[0.9, 0.7, 0.5, 0.0]]])
    spleen_probability = np.array([[[0.0, 0.6, 0.9, 0.9]]])
    separated_liver, separated_spleen = separate_overlaps([liver, spleen], [liver_probability, spleen_probability])
    np.testing.assert_array_equal(separated_liver, [[[1, 1, 0, 0]]])
    np.testing.assert_array_equal(separated_spleen, [[[0, 0, 1, 1]]])
    assert separated_liver.dtype == np.uint8
    np.testing.assert_array_equal(liver, [[[1, 1, 1, 0]]])  # the inputs are not changed


def test_masks_that_do_not_overlap_are_unchanged_and_a_tie_goes_to_the_first():
    first, second = np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)
    first[..., 0], second[..., 2] = 1, 1
    same = np.full((1, 1, 3), 0.8)
    kept = separate_overlaps([first, second], [same, same])
    np.testing.assert_array_equal(kept[0], first)
    np.testing.assert_array_equal(kept[1], second)
    second[..., 0] = 1
    np.testing.assert_array_equal(separate_overlaps([first, second], [same, same])[1], [[[0, 0, 1]]])
