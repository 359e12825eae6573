"""``Ensemble``: several loaded models asked together, their proposals fused as one set.

A model's proposals differ little, so its uncertainty map mostly shows sampling noise; models of different
families disagree where the anatomy is really ambiguous, and their fusion is usually more accurate than
any one model's. Each model samples exactly as it does alone (``Segmenter.propose_many``: its own grid,
seeds and second look, and the results brought back to the input's grid); the ensemble then puts each
structure's proposals of all its models in one ``ProposalSet`` (``models`` names each proposal's model),
and fuses, scores, keeps apart and size-checks them as it would one model's.

A model better at one structure than another can be given more say in it: ``weights`` (``--model-weights``) gives,
per structure, each model's weight in the mean probability, which the mean fusion and the uncertainty map read;
``textdiffseg evaluate`` measures which weights pay, cross-validated over the cases (``evaluation``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import EnsembleWarning, PromptError, SettingsError
from .registry import model_names
from .segmenter import (ProgressCallback, ProposalSet, Segmenter, check_sampling_settings, fused_proposal_set,
                        keep_apart, resolve_prompt_list, warn_of_sizes)
from .terminology import Structure, resolve_prompt
from .volume import Volume, as_volume


def asked_together(segmenters: list[Segmenter],
                   weights: dict[str, dict[str, float]] | None = None) -> "Segmenter | Ensemble":
    """The one model, or the ``Ensemble`` of several: what a run given one or more models asks; ``weights``
    (``Ensemble``'s) only an ensemble takes."""
    if weights and len(segmenters) == 1:
        raise SettingsError("model weights weigh the models of an ensemble against each other: ask several models "
                            "together (--model a,b), or leave the weights out")
    return segmenters[0] if len(segmenters) == 1 else Ensemble(segmenters, weights)


def load_models(text: str | None, device: str | torch.device = "cpu",
                weights: dict[str, dict[str, float]] | None = None) -> "Segmenter | Ensemble":
    """The model ``--model`` names (a ``Segmenter``), or the ``Ensemble`` of the models it lists (``a,b,c``)."""
    return asked_together([Segmenter.from_pretrained(name, device=device) for name in model_names(text)], weights)


def read_model_weights(path: str | Path) -> dict[str, dict[str, float]]:
    """``--model-weights``: each structure's model weights, from a JSON file of them or from the report of
    ``textdiffseg evaluate`` of an ensemble (the weights it chose), or ``SettingsError`` saying what is wrong."""
    try:
        weights = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as error:
        raise SettingsError(f"cannot read the model weights {path}: {error}") from None
    if isinstance(weights, dict) and "weighting" in weights:  # an evaluate report of an ensemble
        weights = weights["weighting"]["weights"]
    if not isinstance(weights, dict) or not all(isinstance(value, dict) for value in weights.values()):
        raise SettingsError(f"{path} holds no model weights: give each structure's weight of each model, "
                            '{"pancreas": {"a": 1, "b": 0}, ...}, or an evaluate report of an ensemble')
    return weights


class Ensemble:
    """Several loaded models. ``Ensemble.from_pretrained(["a", "b"], device="cpu")``, then ``propose_many``.

    ``weights``: per structure (a name or synonym), each model's weight in its mean probability, e.g.
    ``{"pancreas": {"universal-btcv": 1, "lcpdn-btcv": 0}}`` (any scale, each model of the ensemble named); a
    structure not listed weighs each model by its share of the proposals. Majority voting and STAPLE count every
    proposal alike.
    """

    def __init__(self, segmenters: list[Segmenter], weights: dict[str, dict[str, float]] | None = None):
        names = [segmenter.name for segmenter in segmenters]
        if not names:
            raise SettingsError("an ensemble needs at least one model")
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise SettingsError(f"two of the ensemble's models are named '{twice}': name each model once (a "
                                "model asked twice gives the same proposals twice)")
        self.segmenters = list(segmenters)
        self.name = ",".join(names)
        self.weights = checked_weights(weights or {}, names)

    @classmethod
    def from_pretrained(cls, names_or_dirs: list[str | Path | None], device: str | torch.device = "cpu",
                        weights: dict[str, dict[str, float]] | None = None) -> "Ensemble":
        """Load each model once (``Segmenter.from_pretrained``)."""
        return cls([Segmenter.from_pretrained(name, device=device) for name in names_or_dirs], weights)

    @property
    def structures(self) -> tuple[str, ...]:
        """Every structure that at least one of the models knows, in the order the models list them."""
        return tuple(dict.fromkeys(name for segmenter in self.segmenters for name in segmenter.structures))

    def propose(self, volume: Volume | str | Path, prompt: str, num_proposals: int = 5, **settings) -> ProposalSet:
        """``propose_many`` for one prompt."""
        return self.propose_many(volume, [prompt], num_proposals, **settings)[0]

    def propose_many(self, volume: Volume | str | Path, prompts: list[str], num_proposals: int = 5, seed: int = 0,
                     steps: int | None = None, scheduler: str = "ddim", fusion: str = "mean",
                     largest_component: bool = True, separate: bool = True, second_look: bool = True,
                     callback: ProgressCallback | None = None) -> list[ProposalSet]:
        """``Segmenter.propose_many`` over all the models: ``propose_each``, then ``combine``.

        Each model samples ``num_proposals`` of every structure it knows, from seeds ``seed`` to
        ``seed + num_proposals - 1`` (``steps`` None: each model's own default). Each structure's set holds
        the proposals of its models in their order; its mean probability, and so its uncertainty map and
        mean fusion, is the mean over all those proposals; ``majority`` and ``staple`` fuse all of them.
        """
        volume = as_volume(volume)
        each = self.propose_each(volume, prompts, num_proposals, seed, steps, scheduler, fusion, largest_component,
                                 separate, second_look, callback)
        results = self.combine(volume, each, fusion, largest_component, separate)
        if callback is not None:
            callback({"type": "progress", "stage": "done", "fraction": 1.0, "message": "finished"})
        return results

    def propose_each(self, volume: Volume | str | Path, prompts: list[str], num_proposals: int = 5, seed: int = 0,
                     steps: int | None = None, scheduler: str = "ddim", fusion: str = "mean",
                     largest_component: bool = True, separate: bool = True, second_look: bool = True,
                     callback: ProgressCallback | None = None) -> list[dict[str, ProposalSet]]:
        """For each prompt, the proposal sets of the models that know its structure, by model name: what each
        model gives alone (``Segmenter.propose_many``, asked the structures it knows), so that an evaluation
        scores each model and the ensemble on the same proposals.

        A structure that only some of the models know is asked of those, with an ``EnsembleWarning`` naming
        the others; one that none knows raises ``PromptError`` before any sampling. Progress events cover
        all the models, each message naming its model; the scan's warnings are given once, after the
        sampling, not once per model.
        """
        check_sampling_settings(num_proposals, seed, steps)
        asked = self._models_asked(resolve_prompt_list(prompts))
        volume = as_volume(volume)
        report = callback or (lambda event: None)
        working = [segmenter for segmenter in self.segmenters if any(segmenter in models for models in asked)]
        each: list[dict[str, ProposalSet]] = [{} for _ in asked]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for index, segmenter in enumerate(working):
                mine = [number for number, models in enumerate(asked) if segmenter in models]
                sets = segmenter.propose_many(volume, [prompts[number] for number in mine], num_proposals, seed,
                                              steps, scheduler, fusion, largest_component, separate, second_look,
                                              _share(report, index, len(working), segmenter.name))
                for number, proposal_set in zip(mine, sets):
                    each[number][segmenter.name] = proposal_set
        once: dict = {}
        for caught_warning in caught:
            once.setdefault((str(caught_warning.message), caught_warning.category), caught_warning.message)
        for message in once.values():
            warnings.warn(message, stacklevel=2)
        return each

    def combine(self, volume: Volume, each: list[dict[str, ProposalSet]], fusion: str = "mean",
                largest_component: bool = True, separate: bool = True,
                weights: dict[str, dict[str, float]] | None = None) -> list[ProposalSet]:
        """The ensemble's sets of the ``propose_each`` sets of ``volume``: one per prompt, holding its models'
        proposals, fused (``fusion``) and scored anew, the models' mean probabilities weighed by ``weights``
        (structure names to model weights; None: the ensemble's). With ``separate`` the fused masks are kept
        apart by the ensemble's mean probabilities. A set's ``sampling_scale`` is the largest of its models'
        (where one looked again at an enlarged structure), and its size is checked against the widest training
        range of the models."""
        weights = self.weights if weights is None else weights
        results = [_combined(list(sets.values()), fusion, largest_component,
                             weights.get(next(iter(sets.values())).structure.name)) for sets in each]
        if separate and len(results) > 1:
            keep_apart(results, [result.fused for result in results], largest_component)
        warn_of_sizes(results, float(np.prod(volume.spacing)) / 1000, self._widest_volume_ranges())
        return results

    def _models_asked(self, structures: list[Structure]) -> list[list[Segmenter]]:
        """For each structure, the models that know it; ``PromptError`` where none does, else an
        ``EnsembleWarning`` for each structure that some do not know."""
        asked = [[s for s in self.segmenters if structure.name in s.structures] for structure in structures]
        for structure, models in zip(structures, asked):
            if not models:
                raise PromptError(f"none of the models {', '.join(s.name for s in self.segmenters)} can segment "
                                  f"'{structure.display_name}'; together they know: {', '.join(self.structures)}. "
                                  "Choose other models (textdiffseg models).")
        for structure, models in zip(structures, asked):
            if len(models) < len(self.segmenters):
                others = [s.name for s in self.segmenters if s not in models]
                warnings.warn(EnsembleWarning(f"{structure.display_name} is asked only of "
                                              f"{', '.join(s.name for s in models)}: {' and '.join(others)} cannot "
                                              "segment it", structure.name), stacklevel=3)
        return asked

    def _widest_volume_ranges(self) -> dict[str, list[float]]:
        """Each structure's training volumes from the smallest to the largest of any model's: a fused volume
        that some model's training cases had the like of raises no size warning."""
        ranges: dict[str, list[float]] = {}
        for segmenter in self.segmenters:
            for name, (low, high) in segmenter.volume_ranges.items():
                known_low, known_high = ranges.get(name, (low, high))
                ranges[name] = [min(low, known_low), max(high, known_high)]
        return ranges


def checked_weights(weights: dict[str, dict[str, float]], names: list[str]) -> dict[str, dict[str, float]]:
    """``Ensemble``'s ``weights`` by structure name, or ``SettingsError`` saying what is wrong with them."""
    checked = {}
    for structure, of_models in weights.items():
        name = resolve_prompt(structure).name
        if not isinstance(of_models, dict) or sorted(of_models) != sorted(names):
            raise SettingsError(f"the model weights of {structure} must give each model of the ensemble a weight: "
                                f"{', '.join(names)}; they give {of_models}")
        values = list(of_models.values())
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values) or not sum(values):
            raise SettingsError(f"the model weights of {structure} must be numbers, 0 or more, not all 0: {of_models}")
        checked[name] = {model: float(weight) for model, weight in of_models.items()}
    return checked


def _combined(sets: list[ProposalSet], fusion: str, largest_component: bool,
              weights: dict[str, float] | None = None) -> ProposalSet:
    """One structure's proposal sets, of the models asked, as one set: their proposals, seeds and models in
    order, and the mean probability: of the models' means weighed by ``weights`` (model names to weights, the
    models asked renormalised; where they all weigh 0, or without ``weights``: each model's mean by its share of
    the proposals, so a single model's stays as it was), fused and scored anew."""
    proposals = [mask for proposal_set in sets for mask in proposal_set.proposals]
    shares = [weights[proposal_set.model] for proposal_set in sets] if weights else []
    if not sum(shares):
        shares = [len(proposal_set.proposals) for proposal_set in sets]
    mean_probability = np.zeros_like(sets[0].mean_probability)
    for proposal_set, share in zip(sets, shares):
        mean_probability += np.float32(share / sum(shares)) * proposal_set.mean_probability
    np.clip(mean_probability, 0, 1, out=mean_probability)  # shares like 1/3 can round past 1
    combined = fused_proposal_set(
        sets[0].structure, sets[0].prompt, ",".join(proposal_set.model for proposal_set in sets),
        [seed for proposal_set in sets for seed in proposal_set.seeds],
        [model for proposal_set in sets for model in proposal_set.models], proposals, mean_probability, fusion,
        largest_component)
    combined.sampling_scale = max(proposal_set.sampling_scale for proposal_set in sets)
    return combined


def _share(report: ProgressCallback, index: int, count: int, name: str) -> ProgressCallback:
    """The progress callback of the ``index``-th of ``count`` models: its fractions scaled into its share of the
    run, its messages naming it, and its end a step of the run (the run's own ``done`` comes last)."""
    def on_event(event: dict) -> None:
        report({**event, "stage": "sample" if event["stage"] == "done" else event["stage"],
                "fraction": round((index + event["fraction"]) / count, 4), "message": f"{name}: {event['message']}"})
    return on_event
