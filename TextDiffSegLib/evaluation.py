"""Evaluating a model, or an ensemble and each of its models, on a Decathlon-style dataset: Dice, IoU, HD95,
NSD, Oracle@k, RandTop-3, and whether the uncertainty map points at the errors (its AUROC)."""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable

import numpy as np

from .datasets import read_dataset
from .errors import DataError
from .ensemble import Ensemble
from .machine import device_name
from .metrics import (dice, hd95_mm, iou, neighbouring_slice_dice, normalized_surface_dice, proposal_dices,
                      randtop3_of_dices, uncertainty_auroc)
from .segmenter import ProposalSet, Segmenter
from .terminology import resolve_prompt
from .volume import Volume, read_volume

METRICS = ("dice", "single_dice", "oracle_dice", "randtop3_dice", "iou", "hd95_mm", "nsd",
           "proposal_slice_dice", "reference_slice_dice", "uncertainty_auroc")


def evaluate(segmenter: Segmenter | Ensemble, data: str, split: str = "training", case_ids: list[str] | None = None,
             structures: list[str] | None = None, num_proposals: int = 5, seed: int = 0, steps: int | None = None,
             fusion: str = "mean", largest_component: bool = True, separate: bool = True, second_look: bool = True,
             progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Segment every case and structure and score it against the manual labels.

    The structures of a case are segmented in one ``propose_many`` call, so with ``separate`` their
    fused masks do not overlap. ``uncertainty_auroc`` says how well the uncertainty map points at the
    fused mask's errors (``metrics.uncertainty_auroc``: within 10 mm of the manual label).

    An ``Ensemble`` is scored as one model, and each of its models on the same proposals, as it would be
    alone (``Ensemble.propose_each``; RandTop-3 from its own generator seeded with ``seed``): the report's
    ``models`` holds each model's scores of the structures it knows (its ``steps``, ``parameters``, ``structures``,
    ``mean_dice``, ``mean_uncertainty_auroc``, ``rows`` and ``size_warnings``), and its ``steps`` is None
    where each model took its own default. With ``fusion`` mean, the one fusion that model weights enter (majority
    and STAPLE count every proposal alike), its ``weighting`` says which weights pay (``cross_validated_weighting``):
    each row's ``weighted_dice`` is its fused Dice with every structure fused at each of the ``weight_candidates``.
    """
    dataset = read_dataset(data, split)
    cases = dataset.select(case_ids)
    ensemble = segmenter if isinstance(segmenter, Ensemble) else None
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
    models = ensemble.segmenters if ensemble is not None else []
    rng, rngs = np.random.default_rng(seed), {model.name: np.random.default_rng(seed) for model in models}
    rows, seconds = [], []
    candidates = weight_candidates([model.name for model in models]) if fusion == "mean" else []
    rows_of = {model.name: [] for model in models}
    settings = dict(fusion=fusion, largest_component=largest_component, separate=separate)
    for index, case in enumerate(cases):
        if progress is not None:
            progress(index, len(cases), case.id)
        image, label = read_volume(case.image), read_volume(case.label, "label map")
        started = time.perf_counter()
        if ensemble is None:
            results = segmenter.propose_many(image, structures, num_proposals, seed, steps, second_look=second_look,
                                             **settings)
        else:
            each = ensemble.propose_each(image, structures, num_proposals, seed, steps, second_look=second_look,
                                         **settings)
            results = ensemble.combine(image, each, **settings)
        seconds.append(time.perf_counter() - started)
        references = {name: label.array == label_values[name] for name in structures}
        case_rows = [_row(case.id, result, references[result.structure.name], image, rng) for result in results]
        if ensemble is not None:  # the same proposals fused at each candidate's weights
            for weights in candidates:
                weighted = ensemble.combine(image, each, weights={name: weights for name in structures}, **settings)
                for row, result in zip(case_rows, weighted):
                    row.setdefault("weighted_dice", []).append(dice(result.fused, references[result.structure.name]))
        rows += case_rows
        for name, model_rows in rows_of.items():
            model_rows += [_row(case.id, sets[name], references[sets[name].structure.name], image, rngs[name])
                           for sets in each if name in sets]
    if progress is not None:
        progress(len(cases), len(cases), "")
    device = (models[0] if models else segmenter).device
    report = {
        "model": segmenter.name, "data": str(data), "split": split, "cases": [case.id for case in cases],
        "num_cases": len(cases), "num_proposals": num_proposals,
        "steps": steps or (None if ensemble is not None else segmenter.config.default_steps),
        "fusion": fusion, "largest_component": largest_component,
        "separate": separate, "second_look": second_look, "seed": seed,
        "device": f"{device.type} ({device_name(str(device))})",
        "seconds_per_case": float(np.mean(seconds)),
        "parameters": sum(_parameters(model) for model in models or [segmenter]),
        **_scores(rows, structures),
    }
    if candidates:
        report["weighting"] = {"weight_candidates": candidates,
                               **cross_validated_weighting(rows, candidates, structures)}
    if ensemble is not None:
        report["models"] = {model.name: {"steps": steps or model.config.default_steps,
                                         "parameters": _parameters(model),
                                         **_scores(rows_of[model.name], [s for s in structures if s in model.structures])}
                            for model in models}
    return report


def model_report(report: dict, name: str) -> dict:
    """One model's scores in an ensemble's report (``report["models"][name]``) as a report of its own: scored on the
    same proposals as alone, its seconds None (the run did not time its models apart), its ``ensemble`` named."""
    if name not in report.get("models", {}):
        raise DataError(f"the report of {report['model']} scores no model '{name}'; it scores "
                        f"{', '.join(report.get('models', {})) or 'no ensemble'}")
    alone = {key: value for key, value in report.items() if key not in ("models", "weighting")}
    return {**alone, "model": name, "ensemble": report["model"], "seconds_per_case": None, **report["models"][name]}


def weight_candidates(names: list[str], divisions: int = 4) -> list[dict[str, float]]:
    """Every weighting of the models ``names`` in steps of 1 / ``divisions`` that sums to 1 (two models: 1 and 0,
    0.75 and 0.25, ... 0 and 1)."""
    return [dict(zip(names, (part / divisions for part in parts)))
            for parts in itertools.product(range(divisions, -1, -1), repeat=len(names)) if sum(parts) == divisions]


def cross_validated_weighting(rows: list[dict], candidates: list[dict[str, float]], structures: list[str]) -> dict:
    """Which model weights pay, per structure, measured on cases the weights were not chosen on.

    For each structure and case, the candidate whose mean ``weighted_dice`` over the **other** cases is highest (a
    tie: the more even weights) is ``chosen``, and its fused Dice on this case counted (leave one case out): the
    ``cross_validated`` ``mean_dice`` and each structure's ``dice`` are what weights chosen on some cases give on
    another. ``weights`` are those chosen on all the cases, for ``--model-weights``. With one case, nothing is left
    to choose on: ``cross_validated`` is None.
    """
    evenness = [-float(np.var(list(candidate.values()))) for candidate in candidates]
    by_structure, weights = {}, {}
    for name in structures:
        own = [row for row in rows if row["structure"] == name]
        scores = np.array([row["weighted_dice"] for row in own])

        def best(mask: np.ndarray) -> int:
            means = scores[mask].mean(0)
            return max(range(len(candidates)), key=lambda k: (round(float(means[k]), 6), evenness[k]))

        weights[name] = candidates[best(np.ones(len(own), bool))]
        if len(own) > 1:
            chosen = [best(np.arange(len(own)) != i) for i in range(len(own))]
            by_structure[name] = {"dice": float(np.mean([scores[i, k] for i, k in enumerate(chosen)])),
                                  "chosen": [{"case": row["case"], **candidates[k]} for row, k in zip(own, chosen)]}
    cross_validated = None
    if by_structure:
        cross_validated = {"mean_dice": mean_of_defined([s["dice"] for s in by_structure.values()]),
                           "structures": by_structure}
    return {"cross_validated": cross_validated, "weights": weights}


def _parameters(segmenter: Segmenter) -> int:
    """How many parameters a loaded model has (a frozen CLIP vision model's included)."""
    return sum(parameter.numel() for parameter in segmenter.model.parameters())


def _row(case_id: str, result: ProposalSet, reference, image: Volume, rng: np.random.Generator) -> dict:
    """The scores of one structure's proposals and fused mask against its manual label."""
    each_dice = [float(value) for value in proposal_dices(result.proposals, reference)]
    return {
        "case": case_id, "structure": result.structure.name,
        "dice": dice(result.fused, reference),
        "single_dice": each_dice[0],
        "oracle_dice": max(each_dice),
        "randtop3_dice": randtop3_of_dices(each_dice, rng),
        "iou": iou(result.fused, reference),
        "hd95_mm": _finite_or_none(hd95_mm(result.fused, reference, image.spacing)),
        "nsd": normalized_surface_dice(result.fused, reference, image.spacing),
        # coherence along z: each proposal's, averaged, and the manual labels' own
        "proposal_slice_dice": _mean_slice_dice(result.proposals),
        "reference_slice_dice": _mean_slice_dice([reference]),
        "uncertainty_auroc": _finite_or_none(uncertainty_auroc(result.uncertainty, result.fused, reference,
                                                               image.spacing)),
        "size_warning": result.warning is not None,
        "sampling_scale": result.sampling_scale,
        # each proposal's Dice and model, in order: Oracle@k and RandTop-3 over k (docs/proposal_curves.py)
        "proposal_dice": each_dice,
        "proposal_models": list(result.models),
    }


def _scores(rows: list[dict], structures: list[str]) -> dict:
    """A report's scores of ``rows``: each structure's mean of each metric, the means over the structures, the
    rows, and the results whose fused volume was far outside the training cases' (``typical_size``)."""
    summary = {name: {metric: mean_of_defined([row[metric] for row in rows if row["structure"] == name])
                      for metric in METRICS} for name in structures}
    return {
        "mean_dice": mean_of_defined([s["dice"] for s in summary.values()]),
        "mean_uncertainty_auroc": mean_of_defined([s["uncertainty_auroc"] for s in summary.values()]),
        "structures": summary, "rows": rows,
        "size_warnings": [f"{row['case']} {row['structure']}" for row in rows if row["size_warning"]],
    }


def _finite_or_none(value: float) -> float | None:
    """HD95 is undefined (NaN) when exactly one mask is empty, an AUROC where there is no error or nothing but
    errors; reports hold ``null`` there (strict JSON)."""
    return None if math.isnan(value) else value


def _mean_slice_dice(masks) -> float | None:
    """The masks' mean neighbouring-slice Dice (``metrics.neighbouring_slice_dice``), empty masks left out."""
    return mean_of_defined([None if math.isnan(value) else value for value in map(neighbouring_slice_dice, masks)])


def mean_of_defined(values: list[float | None]) -> float | None:
    """Mean of the defined values; ``None`` if there are none."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
