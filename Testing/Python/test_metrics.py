"""Segmentation metrics: exact values on hand-made masks, empty masks, axis order of the spacing,
Oracle@k and RandTop-3, the AUROC of an uncertainty map, and cross-checks against MONAI."""

import math

import numpy as np
import pytest
from scipy import ndimage

from TextDiffSegLib.metrics import (
    auroc,
    dice,
    hd95_mm,
    iou,
    normalized_surface_dice,
    neighbouring_slice_dice,
    oracle_dice,
    randtop3_dice,
    uncertainty_auroc,
)


def cube(shape=(12, 12, 12), start=(2, 2, 2), size=5):
    """A boolean [z, y, x] array holding one cube of ``size`` voxels a side at ``start``."""
    mask = np.zeros(shape, dtype=bool)
    z, y, x = start
    mask[z : z + size, y : y + size, x : x + size] = True
    return mask


def lines():
    """Two collinear lines along x: A has 10 voxels (x 2..11), B its first 5 (x 2..6).

    Every voxel of a line is surface. B lies on A (distances 0); A's last five voxels are
    1..5 voxels beyond B's end.
    """
    a = np.zeros((3, 3, 14), dtype=bool)
    b = np.zeros_like(a)
    a[1, 1, 2:12] = True
    b[1, 1, 2:7] = True
    return a, b


# --- dice and iou -----------------------------------------------------------------------------


def test_dice_and_iou_of_overlapping_cubes():
    a = cube(size=4, start=(2, 2, 2))  # 64 voxels
    b = cube(size=4, start=(3, 2, 2))  # shifted one slice along z: overlap 3 * 4 * 4 = 48
    assert dice(a, b) == pytest.approx(2 * 48 / (64 + 64))  # 0.75
    assert iou(a, b) == pytest.approx(48 / (64 + 64 - 48))  # 0.6
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0


def test_dice_accepts_integer_masks():
    a = cube(size=4).astype(np.uint8)
    b = (cube(size=4, start=(3, 2, 2)) * 7).astype(np.int16)  # any non-zero is foreground
    assert dice(a, b) == pytest.approx(0.75)


def test_empty_masks_dice_iou():
    empty = np.zeros((4, 5, 6), dtype=bool)
    full = cube(shape=(4, 5, 6), start=(1, 1, 1), size=2)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert iou(full, empty) == 0.0 and iou(empty, full) == 0.0


@pytest.mark.parametrize("metric", [dice, iou])
def test_shape_mismatch_names_both_shapes(metric):
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        metric(np.zeros((4, 5, 6)), np.zeros((4, 5, 7)))


# --- hd95 -------------------------------------------------------------------------------------


def test_hd95_of_cube_shifted_two_slices_along_z_with_3mm_slices():
    a = cube(start=(2, 2, 2))
    b = cube(start=(4, 2, 2))  # 2 voxels along z
    assert hd95_mm(a, b, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert hd95_mm(b, a, (1.0, 1.0, 3.0)) == pytest.approx(6.0)


def test_hd95_spacing_is_x_y_z():
    a = cube(start=(2, 2, 2))
    shifted_x = cube(start=(2, 2, 4))  # 2 voxels along x (last array axis)
    assert hd95_mm(a, shifted_x, (1.0, 1.0, 3.0)) == pytest.approx(2.0)
    assert hd95_mm(a, shifted_x, (3.0, 1.0, 1.0)) == pytest.approx(6.0)
    shifted_y = cube(start=(2, 4, 2))
    assert hd95_mm(a, shifted_y, (1.0, 2.5, 3.0)) == pytest.approx(5.0)


def test_hd95_of_parallel_plates():
    a = np.zeros((8, 6, 6), dtype=bool)
    b = np.zeros_like(a)
    a[2, 1:5, 1:5] = True
    b[4, 1:5, 1:5] = True  # every voxel of either plate is exactly 2 slices from the other
    assert hd95_mm(a, b, (0.7, 0.7, 3.0)) == pytest.approx(6.0)


def test_hd95_interpolates_the_95th_percentile():
    a, b = lines()
    # A->B: five 0s then 2, 4, 6, 8, 10 mm; the 95th percentile (linear) sits at rank 8.55 of
    # 0..9: 8 + 0.55 * 2 = 9.1. B->A: all 0. The larger is 9.1.
    assert hd95_mm(a, b, (2.0, 1.0, 1.0)) == pytest.approx(9.1)
    assert hd95_mm(b, a, (2.0, 1.0, 1.0)) == pytest.approx(9.1)
    # The same lines laid along z: now the z spacing (third value) applies.
    az, bz = np.moveaxis(a, 2, 0), np.moveaxis(b, 2, 0)
    assert hd95_mm(az, bz, (1.0, 1.0, 2.0)) == pytest.approx(9.1)
    assert hd95_mm(az, bz, (2.0, 1.0, 1.0)) == pytest.approx(4.55)


def test_hd95_empty_masks():
    empty = np.zeros((6, 6, 6), dtype=bool)
    full = cube(shape=(6, 6, 6), start=(1, 1, 1), size=3)
    assert hd95_mm(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(hd95_mm(full, empty, (1, 1, 1)))
    assert math.isnan(hd95_mm(empty, full, (1, 1, 1)))


def test_hd95_identical_and_touching_the_border():
    a = np.zeros((5, 6, 7), dtype=bool)
    a[:, :3, :] = True  # touches five faces of the array
    assert hd95_mm(a, a, (1, 1, 1)) == 0.0


@pytest.mark.parametrize(
    "spacing, message",
    [((1.0, 1.0), "3 values"), ((1.0, 0.0, 1.0), "positive"), ((1.0, float("nan"), 1.0), "positive")],
)
def test_hd95_and_nsd_validate_spacing(spacing, message):
    a = cube()
    with pytest.raises(ValueError, match=message):
        hd95_mm(a, a, spacing)
    with pytest.raises(ValueError, match=message):
        normalized_surface_dice(a, a, spacing)


def test_surface_metrics_need_3d_and_equal_shapes():
    with pytest.raises(ValueError, match="3D"):
        hd95_mm(np.ones((4, 4)), np.ones((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match=r"\(12, 12, 12\).*\(12, 12, 13\)"):
        normalized_surface_dice(cube(), cube(shape=(12, 12, 13)), (1, 1, 1))


# --- normalised surface dice ------------------------------------------------------------------


def test_nsd_of_parallel_plates_either_side_of_the_shift():
    a = np.zeros((8, 6, 6), dtype=bool)
    b = np.zeros_like(a)
    a[2, 1:5, 1:5] = True
    b[4, 1:5, 1:5] = True  # all surface distances are 2 slices * 3 mm = 6 mm
    spacing = (1.0, 1.0, 3.0)
    assert normalized_surface_dice(a, b, spacing, tolerance_mm=6.0) == 1.0  # inclusive
    assert normalized_surface_dice(a, b, spacing, tolerance_mm=5.9) == 0.0
    # along x instead: 2 mm apart only if the spacing is read as (x, y, z)
    assert normalized_surface_dice(a, b, (3.0, 1.0, 1.0), tolerance_mm=2.0) == 1.0


def test_nsd_counts_both_surfaces():
    a, b = lines()  # 15 surface voxels; A->B distances 0,0,0,0,0,2,4,6,8,10 mm; B->A all 0
    spacing = (2.0, 1.0, 1.0)
    assert normalized_surface_dice(a, b, spacing, tolerance_mm=5.0) == pytest.approx(12 / 15)
    assert normalized_surface_dice(a, b, spacing, tolerance_mm=0.0) == pytest.approx(10 / 15)
    assert normalized_surface_dice(a, b, spacing, tolerance_mm=10.0) == 1.0


def test_nsd_of_shifted_cube():
    a = cube(start=(2, 2, 2))
    b = cube(start=(4, 2, 2))
    spacing = (1.0, 1.0, 3.0)
    assert normalized_surface_dice(a, b, spacing, tolerance_mm=6.0) == 1.0  # 6 mm is the max
    below = normalized_surface_dice(a, b, spacing, tolerance_mm=5.0)
    assert 0.0 < below < 1.0
    assert normalized_surface_dice(a, a, spacing, tolerance_mm=0.0) == 1.0


def test_nsd_empty_masks_and_tolerance():
    empty = np.zeros((6, 6, 6), dtype=bool)
    full = cube(shape=(6, 6, 6), start=(1, 1, 1), size=3)
    assert normalized_surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert normalized_surface_dice(full, empty, (1, 1, 1)) == 0.0
    assert normalized_surface_dice(empty, full, (1, 1, 1)) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(full, full, (1, 1, 1), tolerance_mm=-1.0)


# --- cropping and MONAI cross-check -----------------------------------------------------------


def blob(rng, shape, level):
    """A smooth random blob: thresholded Gaussian-filtered noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return field > level


def test_surface_metrics_unchanged_by_padding_the_volume():
    a = cube(start=(2, 2, 2))
    b = cube(start=(3, 4, 2))
    spacing = (0.8, 1.1, 2.5)
    big_a, big_b = np.zeros((60, 70, 80), dtype=bool), np.zeros((60, 70, 80), dtype=bool)
    big_a[20:32, 30:42, 40:52] = a
    big_b[20:32, 30:42, 40:52] = b
    assert hd95_mm(big_a, big_b, spacing) == pytest.approx(hd95_mm(a, b, spacing))
    assert normalized_surface_dice(big_a, big_b, spacing) == pytest.approx(normalized_surface_dice(a, b, spacing))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation notice
def test_dice_hd95_nsd_match_monai_on_random_blobs():
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(7)
    shape = (18, 26, 30)  # [z, y, x]
    spacing_xyz = (0.8, 1.2, 2.5)
    spacing_zyx = spacing_xyz[::-1]
    pred = blob(rng, shape, 0.05)
    ref = blob(rng, shape, 0.0)
    assert pred.any() and ref.any() and not np.array_equal(pred, ref)

    def batch(mask):
        return torch.from_numpy(mask[None, None].astype(np.float32))

    expected_dice = monai_metrics.compute_dice(batch(pred), batch(ref), include_background=True).item()
    expected_hd95 = monai_metrics.compute_hausdorff_distance(
        batch(pred), batch(ref), include_background=True, percentile=95, spacing=spacing_zyx
    ).item()
    expected_nsd = monai_metrics.compute_surface_dice(
        batch(pred), batch(ref), class_thresholds=[2.0], include_background=True, spacing=spacing_zyx
    ).item()
    assert dice(pred, ref) == pytest.approx(expected_dice, abs=1e-6)
    assert hd95_mm(pred, ref, spacing_xyz) == pytest.approx(expected_hd95, abs=1e-4)
    assert normalized_surface_dice(pred, ref, spacing_xyz, tolerance_mm=2.0) == pytest.approx(expected_nsd, abs=1e-6)


# --- Oracle@k and RandTop-3 ---------------------------------------------------------------------


def shifted_proposals():
    """A reference cube and six proposals shifted 0..5 voxels along x: Dice 1, 0.8, ..., 0."""
    ref = cube(shape=(10, 10, 20), start=(2, 2, 2))
    proposals = [cube(shape=(10, 10, 20), start=(2, 2, 2 + s)) for s in range(6)]
    return proposals, ref


def test_oracle_is_the_best_single_dice():
    proposals, ref = shifted_proposals()
    singles = [dice(p, ref) for p in proposals]
    assert singles == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    oracle = oracle_dice(proposals[1:], ref)
    assert all(oracle >= s for s in singles[1:])
    assert oracle == pytest.approx(0.8)
    assert oracle_dice([proposals[3]], ref) == pytest.approx(0.4)


def test_oracle_with_empty_masks():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert oracle_dice([empty, empty], empty) == 1.0
    assert oracle_dice([cube(shape=(4, 4, 4), start=(1, 1, 1), size=2)], empty) == 0.0


def test_proposals_must_match_the_reference():
    proposals, ref = shifted_proposals()
    with pytest.raises(ValueError, match=r"proposal 1 .*\(10, 10, 21\).*\(10, 10, 20\)"):
        oracle_dice([proposals[0], np.zeros((10, 10, 21))], ref)
    with pytest.raises(ValueError, match="non-empty"):
        oracle_dice([], ref)


def test_randtop3_lies_between_mean_and_oracle_and_near_the_top3_mean():
    proposals, ref = shifted_proposals()
    result = randtop3_dice(proposals[1:], ref, np.random.default_rng(0), n_draws=20000)
    singles = [dice(p, ref) for p in proposals[1:]]  # 0.8, 0.6, 0.4, 0.2, 0.0
    assert np.mean(singles) <= result <= oracle_dice(proposals[1:], ref)
    assert result == pytest.approx(np.mean([0.8, 0.6, 0.4]), abs=0.01)  # expectation: top-3 mean


def test_randtop3_picks_only_among_the_top_three():
    proposals, ref = shifted_proposals()
    for seed in range(20):
        picked = randtop3_dice(proposals[1:], ref, np.random.default_rng(seed), n_draws=1)
        assert picked == pytest.approx(0.8) or picked == pytest.approx(0.6) or picked == pytest.approx(0.4)


def test_randtop3_is_reproducible_with_a_seed():
    proposals, ref = shifted_proposals()
    first = randtop3_dice(proposals, ref, np.random.default_rng(42), n_draws=50)
    second = randtop3_dice(proposals, ref, np.random.default_rng(42), n_draws=50)
    assert first == second


def test_randtop3_with_fewer_than_three_proposals():
    proposals, ref = shifted_proposals()
    assert randtop3_dice([proposals[2]], ref, np.random.default_rng(0)) == pytest.approx(0.6)
    two = randtop3_dice(proposals[1:3], ref, np.random.default_rng(0), n_draws=20000)
    assert two == pytest.approx(0.7, abs=0.01)


def test_randtop3_validates_rng_and_draws():
    proposals, ref = shifted_proposals()
    with pytest.raises(ValueError, match="Generator"):
        randtop3_dice(proposals, ref, 0)
    with pytest.raises(ValueError, match="n_draws"):
        randtop3_dice(proposals, ref, np.random.default_rng(0), n_draws=0)


def test_neighbouring_slice_dice_measures_coherence_along_z():
    column = np.zeros((6, 8, 8), bool)
    column[1:5, 2:6, 2:6] = True
    assert neighbouring_slice_dice(column) == 1.0  # from its first slice to its last
    jittered = column.copy()
    jittered[2] = np.roll(column[2], 2, axis=1)  # one slice shifted by half its width
    assert neighbouring_slice_dice(jittered) < neighbouring_slice_dice(column)
    gap = column.copy()
    gap[2:4] = False  # a pair of empty slices inside the mask is left out, not counted as agreeing
    assert neighbouring_slice_dice(gap) == 0.0
    assert np.isnan(neighbouring_slice_dice(np.zeros((4, 4, 4))))


# --- AUROC of the uncertainty -------------------------------------------------------------------


def test_auroc_counts_the_pairs_a_positive_wins_and_half_the_ties():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats 0.1, 0.8 beats both: 3 of 4 pairs
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # positives 0.5 and 0.9 against 0.5 and 0.2: a tie (half) and three wins
    assert auroc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([True, False, False, True])) == 0.875
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))  # no positive
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))  # no negative


def test_auroc_matches_monai_with_ties():
    import torch
    from monai.metrics import compute_roc_auc

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, 500) / 20  # many ties, as an entropy map's zeros are
    labels = rng.random(500) < scores
    expected = compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64)))
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_uncertainty_auroc_counts_the_errors_within_10_mm_of_the_structure():
    """2 x 2 x 5 mm voxels: 10 mm is 5 voxels along x and y and 2 along z."""
    ref = cube(shape=(20, 30, 30), start=(8, 10, 10), size=6)
    pred = ref.copy()
    uncertainty = np.zeros(ref.shape, np.float32)
    near = (8, 10, 18)  # 3 voxels (6 mm) beyond the cube along x: inside the box
    pred[near], uncertainty[near] = True, 1.0
    assert uncertainty_auroc(uncertainty, pred, ref, (2.0, 2.0, 5.0)) == 1.0  # the one error is the most uncertain
    far = (16, 10, 10)  # 3 slices (15 mm) beyond the cube along z: outside, not counted though certain
    pred[far] = True
    assert uncertainty_auroc(uncertainty, pred, ref, (2.0, 2.0, 5.0)) == 1.0
    assert uncertainty_auroc(uncertainty, pred, ref, (2.0, 2.0, 2.0)) < 1.0  # 2 mm slices: 6 mm away, within
    assert math.isnan(uncertainty_auroc(uncertainty, ref, ref, (2.0, 2.0, 5.0)))  # no error to find
    assert math.isnan(uncertainty_auroc(uncertainty, pred, np.zeros_like(ref), (2.0, 2.0, 5.0)))  # no structure
