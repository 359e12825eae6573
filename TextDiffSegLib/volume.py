"""A 3D image as plain data: voxels plus the geometry that places them in patient space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Volume:
    """Voxels and geometry, in SimpleITK's conventions.

    ``array`` is indexed ``[z, y, x]`` (as ``SimpleITK.GetArrayFromImage`` returns it);
    ``spacing`` and ``origin`` are ``(x, y, z)`` in mm, in LPS patient coordinates;
    ``direction`` is the 3x3 direction-cosine matrix, row-major, 9 floats.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry holding other voxels (for example a mask of this image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)
