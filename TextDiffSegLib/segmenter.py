"""``Segmenter``: load a model once, then sample proposals for any scan and prompt.

Only plain data crosses this boundary: a ``Volume`` and prompt text in; masks, probabilities,
an uncertainty map and scores out, all on the input's exact grid. What is particular to a model
family (how the scan is cut and encoded, the condition, the denoiser) is its predictor's
(``families.base.Predictor``); the segmenter does the rest for every family.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import InputImageError, ModelError, PromptError, ScanWarning, SettingsError
from .families import FAMILIES
from .fusion import agreement_scores, fuse, uncertainty_map
from .modelio import load_model
from .postprocessing import keep_largest_component, separate_overlaps
from .preprocessing import from_model_grid, model_grid, normalize_intensity, to_model_grid
from .registry import list_models, resolve_model
from .scan_checks import modality_warning, replace_non_finite
from .terminology import Structure, resolve_prompt, resolve_prompts
from .text_encoders import TextEmbedding, conditioning_text, load_text_encoder
from .typical_size import enlargement, read_volume_ranges, size_warning
from .volume import Volume, as_volume

ProgressCallback = Callable[[dict], None]


@dataclass
class ProposalSet:
    """Proposals for one structure, on the input volume's grid."""

    structure: Structure
    prompt: str
    model: str  # the model; of an ensemble's set, the names of the models asked, joined by commas
    seeds: list[int]
    models: list[str]  # the model of each proposal, beside its seed
    proposals: list[np.ndarray]  # uint8 masks [z, y, x] per proposal
    mean_probability: np.ndarray  # float32 in [0, 1]: the proposals' mean probability
    fused: np.ndarray  # uint8
    scores: list[float]  # agreement of each proposal with the others
    fusion: str = "mean"
    warning: str | None = None  # the fused mask's volume is far outside the training cases' (typical_size)
    # > 1: sampled again on a grid this much coarser in-plane (an enlarged structure); of an ensemble's set, the
    # largest of its models'
    sampling_scale: float = 1.0

    @property
    def uncertainty(self) -> np.ndarray:
        """Voxel-wise uncertainty in [0, 1] (float32), computed when read: the binary entropy of
        ``mean_probability`` (``fusion.uncertainty_map``)."""
        return uncertainty_map([self.mean_probability])


@dataclass
class _PreparedScan:
    grid: object  # SimpleITK image of the model grid
    prepared: object  # what the family's predictor prepared of the scan
    mirrored: object | None  # the same for the scan mirrored front to back (where the family mirrors)
    shape: tuple[int, int, int]  # model-grid shape before padding


class Segmenter:
    """A loaded model. ``Segmenter.from_pretrained(name_or_dir, device="cpu")``, then ``propose``."""

    def __init__(self, model: torch.nn.Module, name: str, device: torch.device,
                 volume_ranges: dict[str, list[float]] | None = None, source: Path | None = None):
        self.model, self.name, self.device = model, name, device
        self.volume_ranges = volume_ranges or {}  # structure -> training cases' [smallest, largest] ml
        self.source = source  # the model folder, named where the model fails
        self.config = model.config
        self.predictor = FAMILIES[self.config.family].predictor(model, device)
        self._text_encoder = None

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path | None = None, device: str | torch.device = "cpu") -> "Segmenter":
        """Load a registered model by name, or a model folder (``config.json`` + ``model.safetensors``)."""
        directory = resolve_model(name_or_dir)
        device = torch.device(device)
        model = load_model(directory, device=device)
        return cls(model, model.config.name or directory.name, device, read_volume_ranges(directory), directory)

    @property
    def structures(self) -> tuple[str, ...]:
        return self.config.structures

    def resolve(self, prompt: str) -> Structure:
        """The structure a prompt names, checked against what this model was trained for."""
        return self._check_known(resolve_prompt(prompt))

    def _check_known(self, structure: Structure) -> Structure:
        if structure.name not in self.config.structures:
            raise PromptError(
                f"model '{self.name}' cannot segment '{structure.display_name}'; it knows: "
                f"{', '.join(self.config.structures)}. Choose another model (textdiffseg models)."
            )
        return structure

    def propose(self, volume: Volume | str | Path, prompt: str, num_proposals: int = 5, seed: int = 0, steps: int | None = None,
                scheduler: str = "ddim", fusion: str = "mean", largest_component: bool = True,
                second_look: bool = True, callback: ProgressCallback | None = None) -> ProposalSet:
        """Sample ``num_proposals`` segmentations of the structure ``prompt`` names.

        Proposal k is sampled from seed ``seed + k`` (on the mirrored scan where the model's family
        mirrors, as the universal family's ``mirror_proposals`` says, and the seed is odd); ``largest_component`` keeps only the largest
        connected region of each proposal and of the fused mask; ``fusion`` is ``mean``, ``majority``
        or ``staple``; ``second_look`` is explained in ``propose_many``.
        """
        return self.propose_many(volume, [prompt], num_proposals, seed, steps, scheduler, fusion,
                                 largest_component, second_look=second_look, callback=callback)[0]

    def propose_many(self, volume: Volume | str | Path, prompts: list[str], num_proposals: int = 5, seed: int = 0,
                     steps: int | None = None, scheduler: str = "ddim", fusion: str = "mean",
                     largest_component: bool = True, separate: bool = True, second_look: bool = True,
                     callback: ProgressCallback | None = None) -> list[ProposalSet]:
        """``propose`` for several prompts, encoding the scan once.

        ``volume`` is a ``Volume``, a ``SimpleITK.Image`` or the path of a scan (``volume.as_volume``);
        the results lie on its grid. The scan is checked first (``scan_checks``): NaN or infinite voxels
        are replaced by its lowest value, and a scan unlike the model's modality, or a label map, is
        named; each finding is issued as a ``ScanWarning`` (``warnings.warn``), and the run goes on.
        ``num_proposals``, ``seed`` and ``steps`` are checked by ``check_sampling_settings``.

        With ``separate``, the fused masks of the structures do not overlap: a voxel two of them
        claim goes to the structure with the higher mean probability there (``separate_overlaps``),
        and with ``largest_component`` each fused mask then keeps its largest region again. The
        proposals themselves are left as sampled.

        With ``second_look``, a structure found far larger than any of the model's training cases
        (``typical_size.enlargement``) is sampled again on a model grid coarser in-plane by that
        factor, where it looks the size the model knows; the second look replaces the first where it
        finds more of the structure (``ProposalSet.sampling_scale`` says so), and otherwise the first
        stands, as it does when the excess was other tissue taken for the structure.
        """
        check_sampling_settings(num_proposals, seed, steps)
        num_proposals, seed = int(num_proposals), int(seed)  # numpy integers too, which torch's generator refuses
        structures = [self._check_known(structure) for structure in resolve_prompt_list(prompts)]
        volume = self._checked_scan(as_volume(volume))
        steps = int(steps or self.config.default_steps)
        report = callback or (lambda event: None)
        report(_event("preprocess", 0.0, "resampling the scan to the model grid"))
        any_odd_seed = num_proposals > 1 or seed % 2 == 1  # only odd seeds sample the mirrored scan
        mirror = self.predictor.mirrors and any_odd_seed
        scan = self._prepare(volume, mirror)
        sampling = (num_proposals, seed, steps, scheduler, fusion, largest_component)
        results = []
        for index, (prompt, structure) in enumerate(zip(prompts, structures)):
            def on_proposal(k: int, step: int, total: int, fraction_base=index / len(prompts)):
                done = (k + step / total) / num_proposals
                report(_event("sample", fraction_base + done / len(prompts),
                              f"{structure.display_name}: proposal {k + 1}/{num_proposals}, step {step}/{total}"))
            results.append(self._propose_structure(volume, scan, prompt, structure, *sampling, on_proposal))
        unseparated = [result.fused for result in results]
        separate = separate and len(results) > 1
        if separate:
            keep_apart(results, unseparated, largest_component)
        voxel_ml = float(np.prod(volume.spacing)) / 1000
        if second_look:
            replaced = self._look_again_at_enlarged(volume, results, unseparated, mirror, sampling, voxel_ml, report)
            if replaced and separate:
                keep_apart(results, unseparated, largest_component)
        warn_of_sizes(results, voxel_ml, self.volume_ranges)
        report(_event("done", 1.0, "finished"))
        return results

    def _checked_scan(self, volume: Volume) -> Volume:
        """The scan with non-finite voxels replaced; what ``scan_checks`` finds is issued as ``ScanWarning``s."""
        _check_volume(volume)
        volume, non_finite = replace_non_finite(volume)
        apparent = "MR" if self.config.modality == "CT" else "CT"
        alternatives = [m.name for m in list_models() if m.modality == apparent]
        for note in (non_finite, modality_warning(volume, self.config.modality, self.name, alternatives)):
            if note is not None:
                warnings.warn(note, ScanWarning, stacklevel=4)
        return volume

    def _look_again_at_enlarged(self, volume: Volume, results: list[ProposalSet], unseparated: list[np.ndarray],
                                mirror: bool, sampling: tuple, voxel_ml: float, report: ProgressCallback) -> bool:
        """``propose_many``'s second look: each result whose structure is far larger than the training
        cases' is replaced, with its ``unseparated`` mask, by one sampled on a coarser grid where that
        finds more of it. Whether any was replaced."""
        replaced = False
        for index, result in enumerate(results):
            factor = enlargement(result.structure, float(result.fused.sum()) * voxel_ml, self.volume_ranges)
            if factor == 1.0:
                continue
            report(_event("sample", 1.0, f"{result.structure.display_name}: larger than any the model was trained "
                                         f"on; sampling it again on a grid {factor:.2f} times coarser"))
            coarse = self._prepare(volume, mirror, scale=factor)
            again = self._propose_structure(volume, coarse, result.prompt, result.structure, *sampling,
                                            lambda k, step, total: None)
            if again.fused.sum() > unseparated[index].sum():
                again.sampling_scale = factor
                results[index], unseparated[index] = again, again.fused
                replaced = True
        return replaced

    @torch.no_grad()
    def _prepare(self, volume: Volume, mirror: bool, scale: float = 1.0) -> _PreparedScan:
        """The scan on the model grid (its in-plane spacing times ``scale``), normalised, padded at the end of
        each axis to the predictor's multiples, and what the predictor prepares of it; with ``mirror`` also
        of the scan mirrored front to back."""
        config = self.config
        spacing = (config.spacing[0] * scale, config.spacing[1] * scale, config.spacing[2])
        grid = model_grid(volume, spacing)
        normalized = volume.with_array(normalize_intensity(volume.array, config.modality))
        image = to_model_grid(normalized, grid)
        shape = image.shape
        # Scans narrower than a window go through the model whole, padded to sizes it accepts.
        image = np.pad(image, [(0, -size % multiple) for size, multiple in zip(shape, self.predictor.size_multiple)])
        mirrored = self.predictor.prepare(np.ascontiguousarray(image[:, ::-1]), spacing) if mirror else None
        return _PreparedScan(grid=grid, prepared=self.predictor.prepare(image, spacing), mirrored=mirrored, shape=shape)

    def _text(self, structure: Structure) -> TextEmbedding | None:
        """The embedding of the structure's prompt, for a model conditioned on text."""
        config = self.config
        if config.conditioning == "learned":
            return None
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(config.text_encoder, device=self.device)
        return self._text_encoder.encode([conditioning_text(structure, config.modality)])

    @torch.no_grad()
    def _propose_structure(self, volume, scan: _PreparedScan, prompt, structure, num_proposals, seed, steps,
                           scheduler, fusion, largest_component, on_proposal) -> ProposalSet:
        condition = self.predictor.condition(self._text(structure), self.config.structures.index(structure.name))
        seeds = [seed + k for k in range(num_proposals)]
        on_model_grid = []  # each proposal's probabilities, cleaned, on the (small) model grid
        for k, proposal_seed in enumerate(seeds):
            mirrored = scan.mirrored is not None and proposal_seed % 2 == 1
            probability = self.predictor.sample(scan.mirrored if mirrored else scan.prepared, condition, proposal_seed,
                                                steps, scheduler, lambda step, total, k=k: on_proposal(k, step, total))
            if not np.isfinite(probability).all():
                raise ModelError(f"model '{self.name}' ({self.source or 'in memory'}) gave values that are not numbers "
                                 "(NaN): its weights are corrupt; download or copy the model folder again")
            if mirrored:
                probability = probability[:, ::-1]
            probability = np.ascontiguousarray(probability[tuple(slice(0, size) for size in scan.shape)])
            on_model_grid.append(keep_largest_component(probability) if largest_component else probability)
        # Only the masks and the mean probability are resampled to the input's grid, which can be 50 times
        # the model grid's size (a thin-slice CT); resampling is linear, so that is the resampled maps' mean.
        proposals = [(from_model_grid(p, scan.grid, volume) >= 0.5).astype(np.uint8) for p in on_model_grid]
        mean_probability = from_model_grid(np.mean(on_model_grid, axis=0), scan.grid, volume)
        np.clip(mean_probability, 0, 1, out=mean_probability)  # interpolation can round past 1
        return fused_proposal_set(structure, prompt, self.name, seeds, [self.name] * len(seeds), proposals,
                                  mean_probability, fusion, largest_component)


def fused_proposal_set(structure: Structure, prompt: str, model: str, seeds: list[int], models: list[str],
                       proposals: list[np.ndarray], mean_probability: np.ndarray, fusion: str,
                       largest_component: bool) -> ProposalSet:
    """A structure's proposals with their fusion and agreement scores: one place for a model's proposals and
    an ensemble's (``ensemble.Ensemble``), so that both are fused alike."""
    fused = fuse([mean_probability] if fusion == "mean" else proposals, fusion)  # the others read masks
    return ProposalSet(
        structure=structure, prompt=prompt, model=model, seeds=seeds, models=models, proposals=proposals,
        mean_probability=mean_probability, fused=keep_largest_component(fused) if largest_component else fused,
        scores=agreement_scores(proposals), fusion=fusion,
    )


def keep_apart(results: list[ProposalSet], unseparated: list[np.ndarray], largest_component: bool) -> None:
    """Each result's fused mask set to its ``unseparated`` mask less the voxels a more probable structure claims
    (``postprocessing.separate_overlaps``), keeping its largest region with ``largest_component``."""
    separated = separate_overlaps(unseparated, [result.mean_probability for result in results])
    for result, fused in zip(results, separated):
        result.fused = keep_largest_component(fused) if largest_component else fused


def warn_of_sizes(results: list[ProposalSet], voxel_ml: float, volume_ranges: dict[str, list[float]]) -> None:
    """Each result's ``warning`` set where its fused volume is far outside ``volume_ranges`` (``typical_size``)."""
    for result in results:
        result.warning = size_warning(result.structure, float(result.fused.sum()) * voxel_ml, volume_ranges,
                                      result.sampling_scale)


def resolve_prompt_list(prompts: list[str]) -> list[Structure]:
    """The structures a list of prompts names (``terminology.resolve_prompts``); ``PromptError`` for a string
    or an empty list, which would otherwise be read letter by letter or give nothing to do."""
    if isinstance(prompts, str) or not prompts:
        raise PromptError("no prompt given: pass a list naming at least one structure, e.g. ['liver']")
    return resolve_prompts(prompts)


def check_sampling_settings(num_proposals: int, seed: int, steps: int | None) -> None:
    """Raise ``SettingsError`` unless ``num_proposals`` and ``steps`` (or None: the model's default) are whole
    numbers of at least 1 and ``seed`` is a whole number of at least 0: the one rule for the API, the CLI and
    the Slicer worker."""
    for name, value, lowest in (("num_proposals (--proposals)", num_proposals, 1), ("seed (--seed)", seed, 0),
                                ("steps (--steps)", steps, 1)):
        if name.startswith("steps") and value is None:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise SettingsError(f"{name} must be a whole number, not {value!r} ({type(value).__name__})")
        if value < lowest:
            raise SettingsError(f"{name} must be at least {lowest}, not {value}")


def _check_volume(volume: Volume) -> None:
    if volume.array.ndim != 3:
        raise InputImageError(f"expected a 3D volume, got an array of {volume.array.ndim} dimensions {volume.array.shape}")
    if min(volume.array.shape) < 1 or not np.issubdtype(volume.array.dtype, np.number):
        raise InputImageError(f"the volume is empty or not numeric (shape {volume.array.shape}, type {volume.array.dtype})")


def _event(stage: str, fraction: float, message: str) -> dict:
    return {"type": "progress", "stage": stage, "fraction": round(min(max(fraction, 0.0), 1.0), 4), "message": message}
