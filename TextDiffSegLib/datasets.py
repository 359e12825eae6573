"""Decathlon-style datasets (``dataset.json`` with ``labels`` and ``training``) on the model grid.

Training and evaluation read the same file. Cases are resampled once onto the model's grid and
kept in a cache folder, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, PromptError
from .preprocessing import model_grid, normalize_intensity, to_model_grid
from .terminology import resolve_prompt
from .volume import read_volume


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    path: Path  # its dataset.json
    name: str
    modality: str
    labels: dict[int, str]  # label value -> canonical structure name
    cases: tuple[Case, ...]

    def label_values(self) -> dict[str, int]:
        """Structure name -> label value."""
        return {name: value for value, name in self.labels.items()}

    def require_labels(self, structures, why: str = "") -> None:
        """A ``DataError`` naming the ``structures`` this dataset does not label (``why`` says who needs them)."""
        unlabelled = [s for s in structures if s not in self.labels.values()]
        if unlabelled:
            raise DataError(f"{self.path} has no labels for {', '.join(unlabelled)}{why}; "
                            f"it labels {', '.join(self.labels.values())}")

    def select(self, case_ids: list[str] | None) -> tuple[Case, ...]:
        """The cases named in ``case_ids`` (all of them when ``None``)."""
        if case_ids is None:
            return self.cases
        known = {case.id: case for case in self.cases}
        missing = [case_id for case_id in case_ids if case_id not in known]
        if missing:
            raise DataError(f"unknown case ids {', '.join(missing)}; this dataset has {', '.join(known)}")
        return tuple(known[case_id] for case_id in case_ids)


def read_dataset(path: str | os.PathLike, split: str = "training") -> Dataset:
    """Read ``dataset.json``; label names are mapped to the terminology's canonical names."""
    path = Path(path)
    try:
        description = json.loads(path.read_text())
    except OSError as error:
        raise DataError(f"cannot read dataset description {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(description, dict) or "labels" not in description or split not in description:
        raise DataError(f"{path} needs 'labels' and a '{split}' list, as a Medical Segmentation Decathlon dataset.json")
    labels = {}
    for value, name in description["labels"].items():
        if int(value) == 0:
            continue
        try:
            labels[int(value)] = resolve_prompt(name).name
        except PromptError as error:
            raise DataError(f"{path}: label {value} ({name!r}) is not a known structure: {error}") from None
    cases = []
    for entry in description[split]:
        image, label = path.parent / entry["image"], path.parent / entry["label"]
        cases.append(Case(id=image.name.split(".")[0], image=image, label=label))
    modality = description.get("modality", "CT")
    modality = modality.get("0", "CT") if isinstance(modality, dict) else modality
    return Dataset(path=path, name=description.get("name", path.parent.name), modality=str(modality).upper(),
                   labels=labels, cases=tuple(cases))


def split_cases(cases: tuple[Case, ...], validation_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """A seeded random split into training and validation cases (at least one of each)."""
    if not 0 < validation_fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, not {validation_fraction}")
    if len(cases) < 2:
        raise DataError("a training run needs at least two cases: one to train on and one to validate")
    order = np.random.default_rng(seed).permutation(len(cases))
    count = min(max(1, round(validation_fraction * len(cases))), len(cases) - 1)
    validation = sorted((cases[i] for i in order[:count]), key=lambda c: c.id)
    training = sorted((cases[i] for i in order[count:]), key=lambda c: c.id)
    return training, validation


@dataclass
class PreparedCase:
    """A case on the model grid: image in [0, 1] as uint8 (x255), label map of structure names."""

    id: str
    image: np.ndarray  # uint8 [z, y, x]
    label: np.ndarray  # uint8 [z, y, x], values index ``structures``
    structures: tuple[str, ...]  # structures[value - 1] is the name of label value ``value``

    def mask(self, structure: str, index=...) -> np.ndarray:
        """The structure's mask over the whole case, or over ``label[index]`` (one slice: ``index=z``)."""
        label = self.label[index]
        if structure not in self.structures:
            return np.zeros(label.shape, dtype=bool)
        return label == self.structures.index(structure) + 1


def prepare_case(case: Case, dataset: Dataset, spacing: tuple[float, float, float], cache_dir: Path) -> PreparedCase:
    """Resample a case onto the model grid, or load it from the cache."""
    key = hashlib.sha256(f"{case.image.resolve()}|{case.label.resolve()}|{spacing}|{dataset.modality}|1".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"{case.id}-{key}.npz"
    structures = tuple(dataset.labels[value] for value in sorted(dataset.labels))
    if cached.is_file():
        stored = np.load(cached)
        return PreparedCase(case.id, stored["image"], stored["label"], structures)
    image = read_volume(case.image)
    label = read_volume(case.label)
    if label.array.shape != image.array.shape:
        raise DataError(f"{case.label} has shape {label.array.shape} but its image {case.image} has {image.array.shape}")
    grid = model_grid(image, spacing)
    normalized = image.with_array(normalize_intensity(image.array, dataset.modality))
    image_on_grid = np.round(to_model_grid(normalized, grid) * 255).astype(np.uint8)
    raw_labels = to_model_grid(label, grid, is_label=True)
    remapped = np.zeros(raw_labels.shape, dtype=np.uint8)
    for index, value in enumerate(sorted(dataset.labels)):
        remapped[raw_labels == value] = index + 1
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cached, image=image_on_grid, label=remapped)
    return PreparedCase(case.id, image_on_grid, remapped, structures)
