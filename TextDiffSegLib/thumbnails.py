"""Small pictures of proposals for a gallery: the image with the proposal outlined.

A thumbnail is the axial slice through the proposal's centroid, windowed, with the proposal's
outline drawn in the structure's colour, oriented as radiologists read axial images (anterior up,
the patient's left on the right). The worker draws them while the masks are in memory, so Slicer
only loads the PNGs.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from .volume import Volume


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
    areas = mask.sum(axis=(1, 2))
    z = int(round(float((areas * np.arange(len(areas))).sum() / areas.sum()))) if areas.any() else len(areas) // 2
    pixels, outline = image.array[z].astype(np.float32), mask[z]

    # anterior up and the patient's left on the right: rows run posterior (+y in LPS), columns left (+x)
    direction = np.asarray(image.direction, dtype=float).reshape(3, 3)
    if direction[0, 0] < 0:
        pixels, outline = pixels[:, ::-1], outline[:, ::-1]
    if direction[1, 1] < 0:
        pixels, outline = pixels[::-1], outline[::-1]

    height, width = pixels.shape
    extent_y, extent_x = height * image.spacing[1], width * image.spacing[0]
    scale = size / max(extent_y, extent_x)
    rows = np.minimum((np.arange(max(1, round(extent_y * scale))) + 0.5) / scale / image.spacing[1], height - 1)
    columns = np.minimum((np.arange(max(1, round(extent_x * scale))) + 0.5) / scale / image.spacing[0], width - 1)
    pick = np.ix_(rows.astype(int), columns.astype(int))
    pixels, outline = pixels[pick], outline[pick]

    if window is None:
        low, high = np.percentile(pixels, (1, 99))
    else:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    grey = np.clip((pixels - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[_boundary(outline)] = color
    return rgb


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the picture's border counts as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    """Write an RGB uint8 array [row, column, channel] as a PNG (row 0 at the top)."""
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb, dtype=np.uint8), isVector=True), str(path))
