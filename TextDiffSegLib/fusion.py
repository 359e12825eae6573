"""Combining the k proposals the model samples for one structure.

Each proposal is a probability map in [0, 1] or a binary mask (boolean or 0/1), indexed
``[z, y, x]``; all proposals of one call have the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import special

from TextDiffSegLib.metrics import _dice_bool, _union_crop

__all__ = ["FUSION_METHODS", "fuse", "uncertainty_map", "agreement_scores"]

FUSION_METHODS = ("mean", "majority", "staple")


def _check_proposals(probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The proposals as arrays, after checking they are non-empty, alike in shape, and in [0, 1]."""
    if isinstance(probabilities, np.ndarray) or len(probabilities) == 0:
        raise ValueError("probabilities must be a non-empty list of arrays, one per proposal")
    arrays = [np.asarray(p) for p in probabilities]
    shape = arrays[0].shape
    for i, array in enumerate(arrays):
        if array.shape != shape:
            raise ValueError(f"proposal {i} shape {array.shape} differs from proposal 0 shape {shape}")
        if array.dtype == bool or array.size == 0:
            continue
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise ValueError(f"proposal {i} has dtype {array.dtype}; expected bool, integer or float")
        low, high = array.min(), array.max()
        if not (low >= 0 and high <= 1):  # also rejects NaN
            raise ValueError(f"proposal {i} has values in [{low}, {high}]; expected probabilities in [0, 1]")
    return arrays


def _check_threshold(threshold: float) -> float:
    """The threshold as a float, after checking it lies in (0, 1]."""
    threshold = float(threshold)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return threshold


def _binarise(array: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground where the value is at least ``threshold`` (boolean input is kept as is)."""
    return array if array.dtype == bool else array >= threshold


def _probability_sum(arrays: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise sum of the proposals, float32, accumulated one proposal at a time."""
    total = np.zeros(arrays[0].shape, dtype=np.float32)
    for array in arrays:
        total += array
    return total


def _votes(arrays: list[np.ndarray], threshold: float) -> np.ndarray:
    """Voxel-wise number of proposals that are foreground at ``threshold``."""
    votes = np.zeros(arrays[0].shape, dtype=np.uint16 if len(arrays) < 2**16 else np.uint32)
    for array in arrays:
        votes += _binarise(array, threshold)
    return votes


def _staple(masks: list[np.ndarray]) -> np.ndarray:
    """STAPLE consensus of boolean masks: foreground where the STAPLE probability is >= 0.5.

    Identical masks (which includes all empty or all full, where STAPLE's estimates are 0/0 and
    come out NaN) are returned as they are. Any voxel whose STAPLE probability is still NaN
    falls back to the strict majority vote.
    """
    first = masks[0]
    if all(np.array_equal(first, m) for m in masks[1:]):
        return first.astype(np.uint8)
    if first.ndim not in (2, 3):
        raise ValueError(f"STAPLE needs 2D or 3D proposals, got shape {first.shape}")
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    image = staple.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks])
    probability = sitk.GetArrayViewFromImage(image)  # a view: ``image`` must outlive its use
    fused = probability >= 0.5
    undefined = np.isnan(probability)
    if undefined.any():
        majority = 2 * _votes(masks, 0.5).astype(np.uint32) > len(masks)
        fused[undefined] = majority[undefined]
    return fused.astype(np.uint8)


def fuse(probabilities: Sequence[np.ndarray], method: str = "mean", threshold: float = 0.5) -> np.ndarray:
    """Fuse k proposals into one binary mask (uint8, 0/1, same shape as the proposals).

    Methods:
      - ``"mean"``: foreground where the mean probability is >= ``threshold``.
      - ``"majority"``: each proposal is binarised (foreground where >= ``threshold``); foreground
        where strictly more than half of the proposals are foreground (a tie is background).
      - ``"staple"``: SimpleITK's ``STAPLEImageFilter`` on the binarised proposals; foreground
        where the STAPLE probability is >= 0.5. Identical proposals (all empty included) are
        returned unchanged. STAPLE runs on the whole volume (its prior and specificities depend
        on it), so it is much slower than the other two.

    Raises ValueError for an unknown method, an empty list, mismatched shapes, values outside
    [0, 1], or a threshold outside (0, 1].
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {', '.join(FUSION_METHODS)}")
    threshold = _check_threshold(threshold)
    arrays = _check_proposals(probabilities)
    if method == "mean":
        # sum >= threshold * k rather than mean >= threshold: exact for binary proposals
        return (_probability_sum(arrays) >= threshold * len(arrays)).astype(np.uint8)
    if method == "majority":
        return (2 * _votes(arrays, threshold).astype(np.uint32) > len(arrays)).astype(np.uint8)
    return _staple([_binarise(a, threshold) for a in arrays])


def uncertainty_map(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Voxel-wise uncertainty in [0, 1] (float32): the binary entropy, in bits, of the mean
    probability ``p`` over the proposals, ``H(p) = -p log2 p - (1 - p) log2 (1 - p)``.

    It is 0 where all proposals agree with certainty (all 0 or all 1) and 1 where the mean is
    0.5, e.g. where binary proposals are split evenly. For binary proposals it is the entropy of
    the fraction of proposals voting foreground; for soft ones it also counts each proposal's own
    uncertainty (it is the total predictive entropy of the ensemble).
    """
    arrays = _check_proposals(probabilities)
    uncertainty = np.zeros(arrays[0].shape, dtype=np.float32)
    crop = _union_crop(arrays, arrays[0].shape, margin=0)  # outside it every proposal is 0
    if crop is None:
        return uncertainty
    mean = _probability_sum([a[crop] for a in arrays])
    mean /= len(arrays)
    np.clip(mean, 0.0, 1.0, out=mean)
    entropy = special.entr(mean)
    entropy += special.entr(1.0 - mean)
    entropy /= np.float32(np.log(2.0))
    np.clip(entropy, 0.0, 1.0, out=entropy)
    uncertainty[crop] = entropy
    return uncertainty


def agreement_scores(masks: Sequence[np.ndarray], threshold: float = 0.5) -> list[float]:
    """Per proposal, its mean Dice with each of the other proposals (1.0 for a single proposal).

    Masks are binarised at ``threshold`` (foreground where >= it; boolean and 0/1 masks are
    unchanged by the default). Two empty masks have Dice 1.0, as in ``metrics.dice``. A high score
    marks a proposal close to the consensus; a low one an outlier.
    """
    threshold = _check_threshold(threshold)
    arrays = _check_proposals(masks)
    k = len(arrays)
    if k == 1:
        return [1.0]
    crop = _union_crop((_binarise(a, threshold) for a in arrays), arrays[0].shape, margin=0)
    if crop is None:  # all empty: they all agree
        return [1.0] * k
    binary = [_binarise(a[crop], threshold) for a in arrays]
    pair = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            pair[i, j] = pair[j, i] = _dice_bool(binary[i], binary[j])
    return [float((pair[i].sum() - 1.0) / (k - 1)) for i in range(k)]
