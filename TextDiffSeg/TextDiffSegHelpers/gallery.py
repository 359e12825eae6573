"""The proposal gallery without Qt: thumbnails as RGB arrays, and which proposals are selected.

A thumbnail is the axial slice through the proposal's centroid, windowed, with the proposal's
outline drawn in the structure's colour, shown as radiologists read axial images (anterior up,
patient's left on the right).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from TextDiffSegLib.volume import Volume


def thumbnail(
    image: Volume, mask: np.ndarray, color: tuple[int, int, int], size: int = 128, window: tuple[float, float] | None = None
) -> np.ndarray:
    """An RGB uint8 array (at most ``size`` pixels a side, true aspect) of ``image`` with ``mask`` outlined.

    ``window`` is (centre, width) in image units; by default the 1st to 99th percentile of the slice.
    An empty mask gives the middle slice with no outline.
    """
    mask = np.asarray(mask) != 0
    if mask.shape != image.array.shape:
        raise ValueError(f"the mask's shape {mask.shape} differs from the image's {image.array.shape}")
    z = int(round(np.argwhere(mask)[:, 0].mean())) if mask.any() else mask.shape[0] // 2
    pixels, outline = image.array[z].astype(np.float32), mask[z]

    # anterior up and patient's left on the right: rows run posterior (+y in LPS), columns to the left (+x)
    direction = np.asarray(image.direction, dtype=float).reshape(3, 3)
    if direction[0, 0] < 0:
        pixels, outline = pixels[:, ::-1], outline[:, ::-1]
    if direction[1, 1] < 0:
        pixels, outline = pixels[::-1], outline[::-1]

    height, width = pixels.shape
    extentY, extentX = height * image.spacing[1], width * image.spacing[0]
    scale = size / max(extentY, extentX)
    rows = np.minimum((np.arange(max(1, round(extentY * scale))) + 0.5) / scale / image.spacing[1], height - 1).astype(int)
    columns = np.minimum((np.arange(max(1, round(extentX * scale))) + 0.5) / scale / image.spacing[0], width - 1).astype(int)
    pixels, outline = pixels[np.ix_(rows, columns)], outline[np.ix_(rows, columns)]

    if window is None:
        low, high = np.percentile(pixels, (1, 99))
    else:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    grey = np.clip((pixels - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[_boundary(outline)] = color
    return rgb


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def writePng(rgb: np.ndarray, path: str) -> None:
    """Write an RGB uint8 array [row, column, channel] as a PNG (row 0 at the top)."""
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb, dtype=np.uint8), isVector=True), str(path))


class Gallery:
    """Which of one prompt's proposals are selected, and what can be done with them.

    Proposals are numbered from 1 as the user sees them. One selected proposal can be accepted;
    two or more can be fused.
    """

    def __init__(self, scores: list[float]):
        self.scores = list(scores)
        self.selected: list[int] = []

    def order(self) -> list[int]:
        """Proposal numbers, best agreement first (ties by number)."""
        return sorted(range(1, len(self.scores) + 1), key=lambda number: (-self.scores[number - 1], number))

    def label(self, number: int) -> str:
        return f"#{number}  {self.scores[number - 1]:.2f}"

    def select(self, numbers: list[int]) -> None:
        """Make ``numbers`` the selection (kept in increasing order)."""
        for number in numbers:
            if not 1 <= number <= len(self.scores):
                raise ValueError(f"there is no proposal {number}; there are {len(self.scores)}")
        self.selected = sorted(set(numbers))

    def canAccept(self) -> bool:
        return len(self.selected) == 1

    def canFuse(self) -> bool:
        return len(self.selected) >= 2
