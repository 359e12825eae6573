"""Checks of a scan before it is segmented: voxels that are not numbers, and whether the scan looks like
the modality the model was trained on (or like a label map given in its place).

The checks read a strided sample of the voxels (at most a few million), so they take a fraction of a
second on any scan. What they find is returned as sentences for the user; only a scan without a single
finite voxel is refused.
"""

from __future__ import annotations

import numpy as np

from .errors import InputImageError
from .volume import Volume

#: Below this, a CT in Hounsfield units shows fat (about -100 HU) and air (-1000 HU); an MR's intensities
#: (arbitrary, from 0 up) do not reach it. BTCV's CTs, clipped to [-125, 275] HU, still do.
CT_LOWEST_HU = -100.0
#: The percentile of the sampled voxels compared with ``CT_LOWEST_HU`` (robust to a few odd voxels).
LOW_PERCENTILE = 1.0
#: A volume of non-negative whole numbers with at most this many distinct values is a label map, not a scan.
LABEL_MAP_MAX_VALUES = 128
_SAMPLE_VOXELS = 2_000_000


def replace_non_finite(volume: Volume) -> tuple[Volume, str | None]:
    """The volume with NaN and infinite voxels set to its lowest finite value (as padding outside the field
    of view usually is), and a sentence saying how many there were (None where there were none). A scan with
    no finite voxel raises ``InputImageError``. The caller's array is never changed."""
    array = volume.array
    if not np.issubdtype(array.dtype, np.floating):
        return volume, None
    finite = np.isfinite(array)
    count = int(array.size - np.count_nonzero(finite))
    if count == 0:
        return volume, None
    if count == array.size:
        raise InputImageError("every voxel of the scan is NaN or infinite: there is nothing to segment; "
                              "check how the file was made")
    lowest = array[finite].min()
    cleaned = np.where(finite, array, lowest).astype(array.dtype, copy=False)
    return volume.with_array(cleaned), (
        f"{count} voxels of the scan ({100 * count / array.size:.2g}%) are NaN or infinite; they were taken as the "
        f"scan's lowest value ({lowest:g}), as padding outside the field of view usually is")


def modality_warning(volume: Volume, modality: str, model: str, alternatives: list[str]) -> str | None:
    """A sentence where the scan does not look like ``modality`` (``CT`` or ``MR``), the model's, or looks like a
    label map; it names ``alternatives``, the models for the modality the scan looks like. None where it looks right."""
    sample = _sample(volume.array)
    values = np.unique(sample)
    if values.size <= LABEL_MAP_MAX_VALUES and values[0] >= 0 and np.all(values == np.round(values)):
        return (f"the scan looks like a label map, not a {modality} image: it holds only {values.size} distinct "
                f"whole values, from {values[0]:g} to {values[-1]:g}. Give the image itself as the input")
    low = float(np.percentile(sample, LOW_PERCENTILE))
    looks_like_ct = low <= CT_LOWEST_HU
    if modality == "CT" and not looks_like_ct:
        return (f"the scan does not look like a CT in Hounsfield units, but model '{model}' is for CT: its lowest "
                f"values (percentile {LOW_PERCENTILE:g}: {low:g}) are above {CT_LOWEST_HU:g}, where a CT shows fat "
                f"and air. If it is an MR scan, {_use(alternatives, 'MR')}; if it is a CT stored without its "
                "rescale slope and intercept, convert it to Hounsfield units")
    if modality == "MR" and looks_like_ct:
        return (f"the scan looks like a CT in Hounsfield units (percentile {LOW_PERCENTILE:g}: {low:g}, below "
                f"{CT_LOWEST_HU:g} as fat and air are), but model '{model}' is for MR; {_use(alternatives, 'CT')}")
    return None


def _use(alternatives: list[str], modality: str) -> str:
    if not alternatives:
        return f"no installed model is for {modality} (textdiffseg models lists them)"
    return "use " + " or ".join(f"--model {name}" for name in alternatives)


def _sample(array: np.ndarray) -> np.ndarray:
    """At most about ``_SAMPLE_VOXELS`` voxels, every n-th along each axis."""
    step = max(1, round((array.size / _SAMPLE_VOXELS) ** (1 / 3)))
    return np.asarray(array[::step, ::step, ::step], dtype=np.float64).ravel()
