"""Clean-up of sampled masks before they leave the engine."""

import numpy as np
from scipy import ndimage


def keep_largest_component(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``probability`` with every foreground region but the largest set to 0.

    Foreground is ``probability >= threshold``; values below it (the soft rim that the uncertainty
    map reads) are left as they are.

    Every structure in the terminology table is one connected region (left and right organs are
    separate structures), so islands elsewhere are false positives of slice-wise sampling.
    """
    labels, count = ndimage.label(probability >= threshold)
    if count <= 1:
        return probability
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    islands = (labels > 0) & (labels != sizes.argmax())
    return np.where(islands, 0, probability).astype(probability.dtype)


def smooth_across_slices(probability: np.ndarray, sigma: float) -> np.ndarray:
    """``probability`` [z, y, x] smoothed along z with a Gaussian of ``sigma`` slices (0: unchanged).

    A slice-wise model samples every slice from its own noise, so a proposal's neighbouring slices
    disagree more than anatomy does; averaging each slice with its neighbours makes the proposal
    more consistent in 3D without blurring it in-plane.
    """
    if sigma == 0:
        return probability
    return ndimage.gaussian_filter1d(probability, sigma, axis=0, mode="nearest")  # keeps the dtype


def separate_overlaps(masks: list[np.ndarray], mean_probabilities: list[np.ndarray]) -> list[np.ndarray]:
    """Masks of different structures made disjoint: a voxel that several masks claim stays only in
    the mask whose structure has the highest mean probability there (the earlier one on a tie).

    ``mean_probabilities[i]`` is the mean of structure ``i``'s proposals' probability maps. Organs
    do not overlap, so where two fused masks meet, the more probable structure is kept; a mask that
    runs into a neighbour is cut off there, and ``keep_largest_component`` afterwards drops what lay
    beyond the cut.
    """
    claims = np.zeros(masks[0].shape, dtype=np.uint8)
    for mask in masks:
        claims += mask.astype(bool)
    contested = claims > 1
    if not contested.any():
        return masks
    scores = np.stack([np.where(mask[contested].astype(bool), probability[contested], -1.0)
                       for mask, probability in zip(masks, mean_probabilities)])
    winner = scores.argmax(axis=0)
    separated = []
    for index, mask in enumerate(masks):
        mask = mask.copy()
        mask[contested] = np.where(winner == index, mask[contested], 0)
        separated.append(mask)
    return separated
