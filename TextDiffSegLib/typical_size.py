"""How large each structure was in a model's training cases, and a warning for a result far outside that.

A model trained on a few cases has seen each organ only in the sizes they show. On a scan unlike them
(an enlarged spleen, a scan that shows only part of the liver) every proposal can go wrong alike, so
they agree and the uncertainty map stays quiet; the fused mask's volume, against the training cases'
range, still tells. Training records the range in ``training.json`` (``model_card.VOLUME_RANGES``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .datasets import PreparedCase
from .model_card import TRAINING_RECORD, VOLUME_RANGES
from .terminology import Structure

# A fused volume from the smallest training volume / MARGIN to the largest * MARGIN raises no warning.
MARGIN = 1.5


def training_volume_ranges(cases: list[PreparedCase], structures: tuple[str, ...],
                           spacing: tuple[float, float, float]) -> dict[str, list[float]]:
    """Each structure's smallest and largest volume (ml) over the cases that contain it, on the model grid."""
    voxel_ml = float(np.prod(spacing)) / 1000
    ranges = {}
    for structure in structures:
        volumes = [float(case.mask(structure).sum()) * voxel_ml for case in cases]
        volumes = [volume for volume in volumes if volume > 0]
        if volumes:
            ranges[structure] = [round(min(volumes), 1), round(max(volumes), 1)]
    return ranges


def read_volume_ranges(model_dir: Path) -> dict[str, list[float]]:
    """The ranges a model folder's training record holds (none for a model trained before they were recorded)."""
    record = Path(model_dir) / TRAINING_RECORD
    return json.loads(record.read_text()).get(VOLUME_RANGES, {}) if record.is_file() else {}


def enlargement(structure: Structure, volume_ml: float, ranges: dict[str, list[float]]) -> float:
    """How many times the training cases' largest ``structure`` a fused volume of ``volume_ml`` measures
    in length, ``(volume / largest) ** (1/3)``, where it lies beyond the warning's margin; else 1.0.

    A model trained on organs of the usual size finds only the part of an enlarged one (a spleen of
    3 litres) that looks like them; on a grid coarser by this factor the organ looks their size.
    """
    if structure.name not in ranges or volume_ml <= ranges[structure.name][1] * MARGIN:
        return 1.0
    return (volume_ml / ranges[structure.name][1]) ** (1 / 3)


def size_warning(structure: Structure, volume_ml: float, ranges: dict[str, list[float]],
                 sampling_scale: float = 1.0) -> str | None:
    """A sentence for a fused volume far outside the training cases' range of ``structure``; else ``None``.

    ``sampling_scale`` > 1: the volume was found on a grid that much coarser (``enlargement``), which it names.
    """
    if structure.name not in ranges:
        return None
    low, high = ranges[structure.name]
    if low / MARGIN <= volume_ml <= high * MARGIN:
        return None
    if volume_ml > high:
        why = "the structure may be larger than any the model was trained on, or other tissue was taken for it"
    else:
        why = "the scan may show only part of it, or the model missed part of it"
    if sampling_scale > 1:
        why += f" (it was sampled a second time, on a grid {sampling_scale:.2f} times coarser, where it looks their size)"
    return (f"the {structure.display_name} found measures {volume_ml:.0f} ml, far outside the {low:.0f}-{high:.0f} ml "
            f"of the model's training cases: {why}; check it slice by slice")
