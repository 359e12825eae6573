"""Fusion of k proposals, uncertainty and agreement: cases where the methods differ, STAPLE on
degenerate inputs, uncertainty where proposals agree or split, and pairwise-Dice agreement."""

import numpy as np
import pytest

from TextDiffSegLib.fusion import FUSION_METHODS, agreement_scores, fuse, uncertainty_map
from TextDiffSegLib.metrics import dice


def voxels(*values):
    """A [1, 1, n] float array holding ``values``, one voxel each."""
    return np.asarray(values, dtype=np.float32).reshape(1, 1, -1)


def cube(shape=(8, 8, 8), start=(2, 2, 2), size=3):
    mask = np.zeros(shape, dtype=np.uint8)
    z, y, x = start
    mask[z : z + size, y : y + size, x : x + size] = 1
    return mask


# --- fuse ---------------------------------------------------------------------------------------


def test_fusion_methods_constant():
    assert FUSION_METHODS == ("mean", "majority", "staple")


def test_mean_and_majority_differ():
    # voxel 0: 0.9, 0.4, 0.4 -> mean 0.567 (foreground), votes 1 of 3 (background)
    # voxel 1: 0.6, 0.6, 0.0 -> mean 0.4 (background), votes 2 of 3 (foreground)
    # voxel 2: all 0.1 -> background for both; voxel 3: all 0.95 -> foreground for both
    proposals = [voxels(0.9, 0.6, 0.1, 0.95), voxels(0.4, 0.6, 0.1, 0.95), voxels(0.4, 0.0, 0.1, 0.95)]
    np.testing.assert_array_equal(fuse(proposals, "mean"), voxels(1, 0, 0, 1).astype(np.uint8))
    np.testing.assert_array_equal(fuse(proposals, "majority"), voxels(0, 1, 0, 1).astype(np.uint8))


def test_majority_tie_is_background_but_mean_reaches_the_threshold():
    proposals = [voxels(1, 1, 0), voxels(0, 1, 0)]  # voxel 0 split 1:1
    np.testing.assert_array_equal(fuse(proposals, "majority"), voxels(0, 1, 0).astype(np.uint8))
    np.testing.assert_array_equal(fuse(proposals, "mean"), voxels(1, 1, 0).astype(np.uint8))  # 0.5 >= 0.5


def test_threshold_applies_to_mean_and_to_binarising():
    proposals = [voxels(0.3, 0.8), voxels(0.3, 0.8), voxels(0.6, 0.1)]  # means 0.4, 0.567
    np.testing.assert_array_equal(fuse(proposals, "mean", threshold=0.5), voxels(0, 1).astype(np.uint8))
    np.testing.assert_array_equal(fuse(proposals, "mean", threshold=0.25), voxels(1, 1).astype(np.uint8))
    np.testing.assert_array_equal(fuse(proposals, "majority", threshold=0.25), voxels(1, 1).astype(np.uint8))
    np.testing.assert_array_equal(fuse(proposals, "majority", threshold=0.85), voxels(0, 0).astype(np.uint8))


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_fuse_returns_uint8_binary_of_the_input_shape(method):
    a = cube()
    out = fuse([a, a, cube(start=(3, 2, 2))], method)
    assert out.dtype == np.uint8 and out.shape == a.shape
    assert set(np.unique(out)) <= {0, 1}


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_identical_proposals_fuse_to_themselves(method):
    a = cube()
    np.testing.assert_array_equal(fuse([a, a, a], method), a)
    np.testing.assert_array_equal(fuse([a.astype(bool)], method), a)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_all_empty_and_all_full_proposals(method):
    empty = np.zeros((4, 5, 6), dtype=np.float32)
    full = np.ones((4, 5, 6), dtype=np.float32)
    np.testing.assert_array_equal(fuse([empty, empty, empty], method), empty.astype(np.uint8))
    np.testing.assert_array_equal(fuse([full, full], method), full.astype(np.uint8))


def test_staple_follows_the_consensus():
    a = cube(shape=(10, 10, 10), size=4)
    b = a.copy()
    b[7, 7, 7] = 1  # one stray voxel in one proposal
    c = a.copy()
    c[2, 2, 2] = 0  # one voxel missing in another
    np.testing.assert_array_equal(fuse([a, a, b, c], "staple"), a)
    np.testing.assert_array_equal(fuse([a, a, np.zeros_like(a)], "staple"), a)


def test_staple_binarises_probabilities_at_the_threshold():
    a = cube().astype(np.float32)
    np.testing.assert_array_equal(fuse([a * 0.7, a * 0.7, a * 0.7], "staple"), a.astype(np.uint8))
    np.testing.assert_array_equal(fuse([a * 0.7, a * 0.7], "staple", threshold=0.8), np.zeros_like(a, np.uint8))


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match="mean, majority, staple"):
        fuse([cube()], "median")


@pytest.mark.parametrize(
    "proposals, message",
    [
        ([], "non-empty"),
        ([np.zeros((2, 3, 4)), np.zeros((2, 3, 5))], r"\(2, 3, 5\).*\(2, 3, 4\)"),
        ([voxels(0.2, 1.5)], r"\[0, 1\]"),
        ([voxels(0.2, -0.1)], r"\[0, 1\]"),
        ([voxels(0.2, np.nan)], r"\[0, 1\]"),
    ],
)
def test_fuse_validates_proposals(proposals, message):
    with pytest.raises(ValueError, match=message):
        fuse(proposals)


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.2])
def test_fuse_validates_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        fuse([voxels(0.5)], threshold=threshold)


# --- uncertainty --------------------------------------------------------------------------------


def test_uncertainty_zero_where_proposals_agree_and_one_where_split_evenly():
    proposals = [voxels(0, 1, 1, 1), voxels(0, 1, 0, 0), voxels(0, 1, 1, 0), voxels(0, 1, 0, 0)]
    u = uncertainty_map(proposals)
    assert u.dtype == np.float32 and u.shape == (1, 1, 4)
    assert u[0, 0, 0] == 0.0  # all background
    assert u[0, 0, 1] == 0.0  # all foreground
    assert u[0, 0, 2] == pytest.approx(1.0)  # 2 of 4
    # 1 of 4: binary entropy of 0.25 in bits
    assert u[0, 0, 3] == pytest.approx(-(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75)), abs=1e-6)


def test_uncertainty_of_soft_proposals_in_range_and_symmetric():
    rng = np.random.default_rng(3)
    proposals = [rng.random((3, 4, 5)) for _ in range(5)]
    u = uncertainty_map(proposals)
    assert u.min() >= 0.0 and u.max() <= 1.0
    flipped = uncertainty_map([1.0 - p for p in proposals])
    np.testing.assert_allclose(u, flipped, atol=1e-5)
    assert uncertainty_map([voxels(0.5)])[0, 0, 0] == pytest.approx(1.0)


def test_uncertainty_validates_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        uncertainty_map([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        uncertainty_map([voxels(2.0)])


# --- agreement scores ---------------------------------------------------------------------------


def test_agreement_scores_are_mean_pairwise_dice():
    a = cube(size=4)  # 64 voxels
    b = cube(size=4, start=(3, 2, 2))  # Dice with a: 0.75
    c = cube(size=4, start=(4, 2, 2))  # Dice with a: 0.5, with b: 0.75
    assert dice(a, b) == pytest.approx(0.75) and dice(a, c) == pytest.approx(0.5)
    scores = agreement_scores([a, b, c])
    assert scores == pytest.approx([(0.75 + 0.5) / 2, (0.75 + 0.75) / 2, (0.5 + 0.75) / 2])
    assert all(isinstance(s, float) for s in scores)


def test_agreement_scores_single_identical_empty():
    a = cube()
    assert agreement_scores([a]) == [1.0]
    assert agreement_scores([a, a, a]) == [1.0, 1.0, 1.0]
    empty = np.zeros_like(a)
    assert agreement_scores([empty, empty]) == [1.0, 1.0]
    assert agreement_scores([a, empty]) == [0.0, 0.0]
    assert agreement_scores([a, a, empty]) == pytest.approx([0.5, 0.5, 0.0])


def test_agreement_scores_binarise_probabilities():
    a = cube().astype(np.float32)
    assert agreement_scores([a * 0.9, a * 0.6]) == [1.0, 1.0]
    assert agreement_scores([a * 0.9, a * 0.3]) == [0.0, 0.0]  # the second is empty at 0.5


def test_agreement_scores_validate_shapes():
    with pytest.raises(ValueError, match=r"\(8, 8, 9\).*\(8, 8, 8\)"):
        agreement_scores([cube(), cube(shape=(8, 8, 9))])
