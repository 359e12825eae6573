"""Segmentation metrics on binary masks.

Masks are numpy arrays indexed ``[z, y, x]`` (as ``SimpleITK.GetArrayFromImage`` returns them);
any non-zero voxel is foreground. Spacings are ``(x, y, z)`` in mm, in SimpleITK's order, and are
reversed internally to match the array axes.

Empty masks: ``dice``, ``iou`` and ``normalized_surface_dice`` give 1.0 when both masks are empty
and 0.0 when exactly one is; ``hd95_mm`` gives 0.0 when both are empty and ``nan`` when exactly
one is (a distance to nothing is undefined; the evaluator reports it as missing).

Surface metrics work on the bounding box of both masks plus a one-voxel margin, so they stay fast
on whole-body volumes when the structures are small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "dice",
    "iou",
    "hd95_mm",
    "normalized_surface_dice",
    "oracle_dice",
    "randtop3_dice",
    "neighbouring_slice_dice",
    "auroc",
    "uncertainty_auroc",
]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """The mask as a boolean array (non-zero is foreground), without copying boolean input."""
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as booleans, after checking that their shapes match."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return _as_bool(pred), _as_bool(ref)


def _sampling_zyx(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Array-order (z, y, x) sampling from an (x, y, z) spacing in mm, validated."""
    values = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    if len(values) != 3:
        raise ValueError(f"spacing must be 3 values (x, y, z) in mm, got {tuple(spacing)!r}")
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and positive, got {values}")
    return values[2], values[1], values[0]


def _bounding_box(mask: np.ndarray) -> list[tuple[int, int]] | None:
    """Per axis ``(first, last + 1)`` of the foreground of a boolean mask; None if it is empty.

    Each axis is found on the slab already cut out for the previous ones, so a small structure
    in a large volume costs about one pass over the array.
    """
    if mask.size == 0:
        return None
    box = []
    while mask.ndim:
        hits = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if hits.size == 0:
            return None
        start, stop = int(hits[0]), int(hits[-1]) + 1
        box.append((start, stop))
        mask = mask[start:stop].any(axis=0)
    return box


def _union_crop(
    masks: Iterable[np.ndarray], shape: tuple[int, ...], margin: int = 1
) -> tuple[slice, ...] | None:
    """Slices of the bounding box of the union of ``masks`` (non-zero is foreground) plus
    ``margin`` voxels, clipped to ``shape``; None when every mask is empty."""
    lo, hi = list(shape), [0] * len(shape)
    found = False
    for mask in masks:
        box = _bounding_box(_as_bool(mask))
        if box is None:
            continue
        found = True
        for axis, (start, stop) in enumerate(box):
            lo[axis] = min(lo[axis], start)
            hi[axis] = max(hi[axis], stop)
    if not found:
        return None
    return tuple(slice(max(0, lo[a] - margin), min(shape[a], hi[a] + margin)) for a in range(len(shape)))


def _dice_bool(pred: np.ndarray, ref: np.ndarray, ref_count: int | None = None) -> float:
    """Dice of two boolean masks of the same shape (1.0 when both are empty)."""
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref)) if ref_count is None else ref_count
    if n_pred + n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    overlap = int(np.count_nonzero(np.logical_and(pred, ref)))
    return 2.0 * overlap / (n_pred + n_ref)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2 |P ∩ R| / (|P| + |R|)``; 1.0 if both masks are empty, 0.0 if one is."""
    pred, ref = _check_pair(pred, ref)
    return _dice_bool(pred, ref)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P ∩ R| / |P ∪ R|``; 1.0 if both are empty, 0.0 if one is."""
    pred, ref = _check_pair(pred, ref)
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_pred + n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    overlap = int(np.count_nonzero(np.logical_and(pred, ref)))
    return overlap / (n_pred + n_ref - overlap)


def _surface_distances(
    pred: np.ndarray, ref: np.ndarray, sampling: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to the surface of ``ref``, and back.

    Both masks must be non-empty booleans. The surface of a mask is its foreground minus its
    erosion by the 6-connected cross (voxels on the array border count as surface).
    """
    crop = _union_crop([pred, ref], pred.shape, margin=1)
    pred, ref = pred[crop], ref[crop]
    surf_pred = pred & ~ndimage.binary_erosion(pred)
    surf_ref = ref & ~ndimage.binary_erosion(ref)
    to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return to_ref[surf_pred], to_pred[surf_ref]


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces, in mm.

    The 95th percentile (linear interpolation) is taken of the distances from the prediction's
    surface voxels to the reference surface, and of those from the reference to the prediction;
    the larger of the two is returned (MONAI's ``compute_hausdorff_distance(percentile=95)``).
    ``spacing`` is ``(x, y, z)`` in mm. Both masks empty: 0.0. Exactly one empty: ``nan``
    (undefined; report it as missing).
    """
    pred, ref = _check_pair(pred, ref)
    if pred.ndim != 3:
        raise ValueError(f"masks must be 3D [z, y, x], got shape {pred.shape}")
    sampling = _sampling_zyx(spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return float("nan")
    d_pred_ref, d_ref_pred = _surface_distances(pred, ref, sampling)
    return float(max(np.percentile(d_pred_ref, 95), np.percentile(d_ref_pred, 95)))


def normalized_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
) -> float:
    """Normalised surface Dice (Nikolov et al., 2021) at ``tolerance_mm``.

    The fraction of surface voxels, of both masks together, lying within ``tolerance_mm``
    (inclusive) of the other mask's surface: ``(|S_P within tol of S_R| + |S_R within tol of S_P|)
    / (|S_P| + |S_R|)``. Surfaces are counted in voxels (not sub-voxel areas), as MONAI's
    ``compute_surface_dice`` does by default. ``spacing`` is ``(x, y, z)`` in mm.
    Both masks empty: 1.0; exactly one empty: 0.0.
    """
    pred, ref = _check_pair(pred, ref)
    if pred.ndim != 3:
        raise ValueError(f"masks must be 3D [z, y, x], got shape {pred.shape}")
    sampling = _sampling_zyx(spacing)
    tolerance_mm = float(tolerance_mm)
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 1.0
    if not has_pred or not has_ref:
        return 0.0
    d_pred_ref, d_ref_pred = _surface_distances(pred, ref, sampling)
    within = int(np.count_nonzero(d_pred_ref <= tolerance_mm))
    within += int(np.count_nonzero(d_ref_pred <= tolerance_mm))
    return within / (d_pred_ref.size + d_ref_pred.size)


def proposal_dices(proposals: Sequence[np.ndarray], ref: np.ndarray) -> np.ndarray:
    """Dice of each proposal against the reference (within the box of all the masks), after validating the inputs."""
    if isinstance(proposals, np.ndarray) or len(proposals) == 0:
        raise ValueError("proposals must be a non-empty list of masks")
    ref = np.asarray(ref)
    for i, proposal in enumerate(proposals):
        if np.shape(proposal) != ref.shape:
            raise ValueError(
                f"proposal {i} shape {np.shape(proposal)} differs from reference shape {ref.shape}"
            )
    crop = _union_crop([ref, *proposals], ref.shape, margin=0)
    if crop is None:  # everything empty: every proposal matches the reference
        return np.ones(len(proposals))
    ref = _as_bool(ref[crop])
    ref_count = int(np.count_nonzero(ref))
    return np.array([_dice_bool(_as_bool(np.asarray(p)[crop]), ref, ref_count) for p in proposals])


def oracle_dice(proposals: Sequence[np.ndarray], ref: np.ndarray) -> float:
    """Oracle@k: the best Dice among the k proposals (ProGiDiff §4.5, an upper bound)."""
    return float(proposal_dices(proposals, ref).max())


def randtop3_dice(
    proposals: Sequence[np.ndarray],
    ref: np.ndarray,
    rng: np.random.Generator,
    n_draws: int = 1000,
) -> float:
    """RandTop-3, the simulated expert-in-the-loop of ProGiDiff §4.5.

    The paper simulates a human in the loop "by randomly selecting one of the top-3 proposals
    (RandTop-3) to model inter-rater variability": the proposals are ranked by their Dice against
    the reference, and the expert picks one of the three best uniformly at random (of all of them
    when k < 3). This returns the mean Dice of the picked proposal over ``n_draws`` independent
    picks drawn with ``rng``; it tends to the mean Dice of the top-3 proposals, so it lies between
    the third-best Dice and the oracle (``oracle_dice``).
    """
    return randtop3_of_dices(proposal_dices(proposals, ref), rng, n_draws)


def randtop3_of_dices(dices: Sequence[float], rng: np.random.Generator, n_draws: int = 1000) -> float:
    """``randtop3_dice`` of proposals whose Dice against the reference is known (``proposal_dices``)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    ranked = np.sort(np.asarray(dices, dtype=float))[::-1]
    top = ranked[: min(3, ranked.size)]
    picks = rng.integers(0, top.size, size=int(n_draws))
    return float(top[picks].mean())


def neighbouring_slice_dice(mask: np.ndarray) -> float:
    """How coherent a mask is along z: the mean Dice between each slice and the next, over the pairs of
    neighbouring slices of which at least one holds the structure; ``nan`` for an empty mask.

    A mask sampled slice by slice from independent noise scores below the manual labels' own value (their
    anatomy changes between slices too, so theirs is the level to compare with, not 1.0).
    """
    mask = _as_bool(mask)
    crop = _bounding_box(mask)
    if crop is None:
        return float("nan")
    mask = mask[slice(*crop[0]), slice(*crop[1]), slice(*crop[2])]
    dices = [_dice_bool(mask[z], mask[z + 1]) for z in range(mask.shape[0] - 1) if mask[z].any() or mask[z + 1].any()]
    return float(np.mean(dices)) if dices else float("nan")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` telling the ``positives`` (non-zero) from the others: the chance
    that a random positive scores higher than a random negative, a tie counting half (the Mann-Whitney U over
    the number of pairs, from the ranks, so millions of voxels take a sort); ``nan`` where either is absent."""
    scores, positives = np.asarray(scores, dtype=np.float64).ravel(), _as_bool(positives).ravel()
    if scores.shape != positives.shape:
        raise ValueError(f"{scores.size} scores for {positives.size} labels")
    n_positive = int(np.count_nonzero(positives))
    n_negative = positives.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # ties share their mean rank
    return float((ranks[positives].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def uncertainty_auroc(uncertainty: np.ndarray, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                      margin_mm: float = 10.0) -> float:
    """Whether an uncertainty map points at the errors of ``pred``: the ``auroc`` of the uncertainty against the
    voxels where ``pred`` and ``ref`` differ, within the bounding box of ``ref`` grown by ``margin_mm`` on every
    side (clipped to the volume; far from the structure nearly every voxel is certain and right, which would
    say little). ``nan`` where ``ref`` is empty, or the box holds no error or nothing else."""
    pred, ref = _check_pair(pred, ref)
    if np.shape(uncertainty) != ref.shape:
        raise ValueError(f"uncertainty shape {np.shape(uncertainty)} differs from reference shape {ref.shape}")
    box = _bounding_box(ref)
    if box is None:
        return float("nan")
    margins = [math.ceil(margin_mm / step) for step in _sampling_zyx(spacing)]
    crop = tuple(slice(max(0, start - margin), min(size, stop + margin))
                 for (start, stop), margin, size in zip(box, margins, ref.shape))
    return auroc(np.asarray(uncertainty)[crop], pred[crop] != ref[crop])
