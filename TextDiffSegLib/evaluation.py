"""Evaluating a model on a Decathlon-style dataset: Dice, IoU, HD95, NSD, Oracle@k and RandTop-3."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from .datasets import read_dataset
from .errors import DataError
from .machine import device_name
from .metrics import dice, hd95_mm, iou, neighbouring_slice_dice, normalized_surface_dice, oracle_dice, randtop3_dice
from .segmenter import Segmenter
from .terminology import resolve_prompt
from .volume import read_volume

METRICS = ("dice", "single_dice", "oracle_dice", "randtop3_dice", "iou", "hd95_mm", "nsd",
           "proposal_slice_dice", "reference_slice_dice")


def evaluate(segmenter: Segmenter, data: str, split: str = "training", case_ids: list[str] | None = None,
             structures: list[str] | None = None, num_proposals: int = 5, seed: int = 0, steps: int | None = None,
             fusion: str = "mean", largest_component: bool = True, separate: bool = True, second_look: bool = True,
             progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Segment every case and structure and score it against the manual labels.

    The structures of a case are segmented in one ``propose_many`` call, so with ``separate`` their
    fused masks do not overlap.
    """
    dataset = read_dataset(data, split)
    cases = dataset.select(case_ids)
    available = set(dataset.labels.values()) & set(segmenter.structures)
    if structures is None:
        structures = [s for s in segmenter.structures if s in available]
    else:  # names or synonyms ("left kidney"); a misspelt one gets the nearest known names
        structures = list(dict.fromkeys(resolve_prompt(s).name for s in structures))
    missing = [s for s in structures if s not in available]
    if missing:
        raise DataError(f"cannot evaluate {', '.join(missing)}: the dataset does not label it or the model "
                        f"does not know it; both have {', '.join(sorted(available))}")
    absent = [f"{case.id}'s {what} {path}" for case in cases
              for what, path in (("image", case.image), ("label map", case.label)) if not path.is_file()]
    if absent:  # found before hours of work, not after
        raise DataError(f"{data} lists files that do not exist: {'; '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
    label_values = dataset.label_values()
    rng = np.random.default_rng(seed)
    rows, seconds = [], []
    for index, case in enumerate(cases):
        if progress is not None:
            progress(index, len(cases), case.id)
        image, label = read_volume(case.image), read_volume(case.label, "label map")
        started = time.perf_counter()
        results = segmenter.propose_many(image, structures, num_proposals, seed, steps, fusion=fusion,
                                         largest_component=largest_component, separate=separate,
                                         second_look=second_look)
        seconds.append(time.perf_counter() - started)
        for result in results:
            reference = label.array == label_values[result.structure.name]
            rows.append({
                "case": case.id, "structure": result.structure.name,
                "dice": dice(result.fused, reference),
                "single_dice": dice(result.proposals[0], reference),
                "oracle_dice": oracle_dice(result.proposals, reference),
                "randtop3_dice": randtop3_dice(result.proposals, reference, rng),
                "iou": iou(result.fused, reference),
                "hd95_mm": _finite_or_none(hd95_mm(result.fused, reference, image.spacing)),
                "nsd": normalized_surface_dice(result.fused, reference, image.spacing),
                # coherence along z: each proposal's, averaged, and the manual labels' own
                "proposal_slice_dice": _mean_slice_dice(result.proposals),
                "reference_slice_dice": _mean_slice_dice([reference]),
                "size_warning": result.warning is not None,
                "sampling_scale": result.sampling_scale,
            })
    if progress is not None:
        progress(len(cases), len(cases), "")
    summary = {name: {metric: mean_of_defined([row[metric] for row in rows if row["structure"] == name]) for metric in METRICS}
               for name in structures}
    return {
        "model": segmenter.name, "data": str(data), "split": split, "cases": [case.id for case in cases],
        "num_cases": len(cases), "num_proposals": num_proposals, "steps": steps or segmenter.config.default_steps,
        "fusion": fusion, "largest_component": largest_component,
        "separate": separate, "second_look": second_look, "seed": seed,
        "device": f"{segmenter.device.type} ({device_name(str(segmenter.device))})",
        "seconds_per_case": float(np.mean(seconds)), "mean_dice": mean_of_defined([s["dice"] for s in summary.values()]),
        "structures": summary, "rows": rows,
        # where the fused volume was far outside the model's training cases' (typical_size)
        "size_warnings": [f"{row['case']} {row['structure']}" for row in rows if row["size_warning"]],
    }


def _finite_or_none(value: float) -> float | None:
    """HD95 is undefined (NaN) when exactly one mask is empty; reports hold ``null`` there (strict JSON)."""
    return None if math.isnan(value) else value


def _mean_slice_dice(masks) -> float | None:
    """The masks' mean neighbouring-slice Dice (``metrics.neighbouring_slice_dice``), empty masks left out."""
    return mean_of_defined([None if math.isnan(value) else value for value in map(neighbouring_slice_dice, masks)])


def mean_of_defined(values: list[float | None]) -> float | None:
    """Mean of the defined values; ``None`` if there are none."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
