"""Clean-up of a sampled probability map before it leaves the engine."""

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
