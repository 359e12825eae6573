"""Intensity normalisation per modality, and resampling between a scan's grid and the model's.

The model always sees axial slices on an axis-aligned LPS grid at its own spacing, whatever the
scan's orientation, spacing or (oblique) direction; results are resampled back onto the scan's
exact grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk

from .volume import Volume, to_sitk

CT_WINDOW_HU = (-125.0, 275.0)
MR_PERCENTILES = (0.5, 99.5)
BODY_LEVEL = 0.05  # normalised intensity above which a voxel counts as body (fat is about 0.06 in the CT window)
POSITION_UNIT_MM = 100.0


def normalize_intensity(array: np.ndarray, modality: str) -> np.ndarray:
    """Map intensities to [0, 1]: a soft-tissue HU window for CT, robust percentiles for MR."""
    array = np.asarray(array, dtype=np.float32)
    if modality == "CT":
        low, high = CT_WINDOW_HU
    elif modality == "MR":
        low, high = np.percentile(array, MR_PERCENTILES)
        if high <= low:
            return np.zeros_like(array)
    else:
        raise ValueError(f"unknown modality {modality!r}; expected 'CT' or 'MR'")
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def lateral_position(slices: np.ndarray, spacing_x: float) -> np.ndarray:
    """Each voxel's left-right distance from the middle of the body in its slice, per 100 mm.

    ``slices`` are normalised slices ``[..., y, x]`` on the model grid, whose x runs towards the
    patient's left, so the patient's left is positive. The middle is the mean x of the slice's body
    voxels (the slice's centre where it has none), so it does not depend on the field of view or on
    where a slice lies in a padded or cropped window.
    """
    slices = np.asarray(slices, dtype=np.float32)
    columns = np.arange(slices.shape[-1], dtype=np.float32)
    body = slices > BODY_LEVEL
    count = body.sum(axis=(-2, -1))
    middle = np.where(count > 0, (body * columns).sum(axis=(-2, -1)) / np.maximum(count, 1), (slices.shape[-1] - 1) / 2)
    position = (columns - middle[..., None]) * (spacing_x / POSITION_UNIT_MM)
    return np.broadcast_to(position[..., None, :], slices.shape).astype(np.float32)


def slice_stacks(image: np.ndarray, centres, context: int, position_spacing: float = 0.0,
                 padding: tuple[tuple[int, int], tuple[int, int]] | None = None) -> np.ndarray:
    """The input of a 2.5D model, the same in training and sampling: for each centre slice of ``image``
    ([z, y, x] on the model grid, in [0, 1], or uint8 x 255 as training caches it), that slice with
    ``context`` neighbours each side (the end slices repeated past the scan's ends), float32
    ``[centres, 2 * context + 1 (+ 1), y, x]``. ``padding`` ((top, bottom), (left, right)) pads them
    with air; with ``position_spacing`` (the grid's x spacing in mm) the centre slice's
    ``lateral_position`` follows as one more channel, measured after padding.
    """
    centres = np.asarray(centres)
    neighbours = np.clip(centres[:, None] + np.arange(-context, context + 1), 0, image.shape[0] - 1)
    slices = image[neighbours].astype(np.float32)
    if image.dtype == np.uint8:
        slices /= 255.0
    if padding is not None:
        slices = np.pad(slices, ((0, 0), (0, 0), *padding))
    if position_spacing:
        slices = np.concatenate([slices, lateral_position(slices[:, context:context + 1], position_spacing)], axis=1)
    return slices


def model_grid(volume: Volume, spacing: tuple[float, float, float]) -> sitk.Image:
    """An empty axis-aligned LPS image at ``spacing`` covering the whole physical extent of ``volume``."""
    image = to_sitk(volume)
    size = image.GetSize()
    corners = np.array(
        [image.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner])
         for corner in itertools.product(*[(0, s) for s in size])]
    )
    low, high = corners.min(axis=0), corners.max(axis=0)
    spacing = np.asarray(spacing, dtype=float)
    grid_size = np.maximum(np.ceil((high - low) / spacing - 1e-6).astype(int), 1)
    grid = sitk.Image([int(s) for s in grid_size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(spacing))
    grid.SetOrigin(tuple(low + spacing / 2))
    return grid


def to_model_grid(volume: Volume, grid: sitk.Image, is_label: bool = False) -> np.ndarray:
    """``volume`` resampled onto ``grid`` ([z, y, x] array): linear for images, nearest for labels."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    image = to_sitk(volume)
    if not is_label:
        image = sitk.Cast(image, sitk.sitkFloat32)
    outside = 0 if is_label else float(volume.array.min())
    resampled = sitk.Resample(image, grid, sitk.Transform(), interpolator, outside)
    return sitk.GetArrayFromImage(resampled)


def from_model_grid(array: np.ndarray, grid: sitk.Image, reference: Volume) -> np.ndarray:
    """A float map on the model grid resampled (linearly) back onto ``reference``'s exact grid."""
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(grid)
    target = to_sitk(reference.with_array(np.zeros(reference.array.shape, dtype=np.uint8)))
    return sitk.GetArrayFromImage(sitk.Resample(image, target, sitk.Transform(), sitk.sitkLinear, 0.0))
