"""What a model family gives the engine (diffusers' split of models, schedulers and pipelines).

A family is a ``Family`` in ``FAMILIES``: its config class and model class, a ``Predictor`` that
samples the model on the model grid, a ``Recipe`` that trains it, its adapter rules and its card
text. ``Segmenter`` (prompts, seeds, fusion, grids) and ``training.train`` (loop, checkpoints, EMA)
work through these alone; see docs/adding-a-family.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..postprocessing import smooth_across_slices
from ..preprocessing import slice_stacks
from ..text_encoders import TextEmbedding

StepCallback = Callable[[int, int], None]  # (denoising steps done, of how many) while a proposal is sampled


class Predictor:
    """Samples one loaded model: built once per ``Segmenter``, used for every scan and prompt.

    The segmenter hands it the scan on the model grid: normalised to [0, 1], ``[z, y, x]``, padded at
    the end of each axis to a multiple of ``size_multiple`` (and mirrored front to back for odd seeds
    where ``mirrors``). How the scan is cut (2D slice stacks, 3D windows) is the family's business.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device, self.config = model, device, model.config

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """Per axis (z, y, x), what the padded model grid's sizes must be multiples of."""
        return (1, 1, 1)

    @property
    def mirrors(self) -> bool:
        """Whether proposals of odd seeds are sampled on the scan mirrored front to back (y)."""
        return False

    def prepare(self, image: np.ndarray, spacing: tuple[float, float, float]) -> Any:
        """What sampling needs of the scan ``image`` (model-grid ``spacing``, x y z in mm): computed once
        per scan, shared by every structure and proposal."""
        raise NotImplementedError

    def condition(self, text: TextEmbedding | None, index: int) -> Any:
        """The model's condition for one structure: ``text`` is its prompt's embedding (tokens, mask and
        pooled; ``None`` for a model with a learned embedding per structure), ``index`` its position in
        ``config.structures``."""
        raise NotImplementedError

    def sample(self, prepared: Any, condition: Any, seed: int, steps: int, scheduler: str,
               on_step: StepCallback) -> np.ndarray:
        """One proposal's probabilities (float32 [z, y, x] in [0, 1], the padded grid's shape), sampled
        with ``steps`` steps of ``scheduler`` (``sampler.SCHEDULERS``) from the seed alone, through
        ``sampler.sample`` with a ``denoise(x_t, t)`` the family builds."""
        raise NotImplementedError


@dataclasses.dataclass
class SliceWiseConfig(ModelConfig):
    """The options of the families that sample a scan slice by slice (universal, ProGiDiff, LCPDN): how proposals
    are sampled and what the model reads around each slice. All train on ``universal_training.SliceSampler``'s
    slices, which flips front to back at random."""

    # Sample the proposals of odd seeds on the scan mirrored front to back, and mirror them back: training
    # flips that axis at random, so both are scans the model knows, and the proposals differ by more than
    # their noise.
    mirror_proposals: bool = False
    # Smooth each proposal's probabilities along z with a Gaussian of this sigma, in slices of the
    # model grid (0: off): each slice is sampled from its own noise, so neighbouring slices of a
    # proposal disagree more than the anatomy does (see postprocessing.smooth_across_slices).
    slice_smoothing: float = 0.0
    # What the model reads of the scan around each slice (``preprocessing.slice_stacks``): ``context_slices``
    # neighbouring slices on each side, and with ``lateral_position`` one more channel, each voxel's left-right
    # distance from the middle of the body (``preprocessing.lateral_position``), so that the model can tell the
    # patient's left from the right where tissue looks alike (an enlarged spleen reaching across like a liver).
    context_slices: int = 0
    lateral_position: bool = False

    def problems(self) -> list[str]:
        found = super().problems()
        if self.context_slices < 0:
            found.append(f"context_slices must be 0 or more, not {self.context_slices}")
        if not self.slice_smoothing >= 0:
            found.append(f"slice_smoothing must be 0 or more (a sigma in slices), not {self.slice_smoothing}")
        if len(self.window) != 2:
            found.append(f"window must be two in-plane sizes (y, x) for this slice-wise family, not {self.window}")
        elif self.size_multiple >= 1 and any(w % self.size_multiple for w in self.window):  # below 1: a width is wrong
            found.append(f"window must be a multiple of {self.size_multiple} (the model's in-plane downsampling), "
                         f"not {self.window}")
        return found

    @property
    def size_multiple(self) -> int:
        """In-plane sizes (model-grid voxels) the model accepts."""
        raise NotImplementedError

    @property
    def slice_channels(self) -> int:
        """The slice and its neighbours (LCPDN's U-Net predicts the noise of each)."""
        return 2 * self.context_slices + 1

    @property
    def image_in_channels(self) -> int:
        """The channels of a slice's input: the slice and its neighbours, then the lateral position where read."""
        return self.slice_channels + int(self.lateral_position)

    def position_spacing(self, spacing: tuple[float, float, float]) -> float:
        """``slice_stacks``' ``position_spacing`` on a grid of ``spacing`` (x, y, z mm): its x spacing where the
        model reads the lateral position, else 0."""
        return spacing[0] if self.lateral_position else 0.0

    def inputs_card_text(self, reader: str) -> list[str]:
        """The model card's line on what ``reader`` (the part reading the scan) reads besides the slice, if anything."""
        if not (self.context_slices or self.lateral_position):
            return []
        slices = "slice" if self.context_slices == 1 else "slices"
        return [f"{reader} reads {self.context_slices} neighbouring {slices} each side"
                f"{' and the lateral position' if self.lateral_position else ''} (`context_slices`, `lateral_position`)"]

    def sampling_card_text(self) -> list[str]:
        """The model card's lines on these options, where set."""
        parts = []
        if self.mirror_proposals:
            parts.append("proposals of odd seeds are sampled on the scan mirrored front to back and mirrored back "
                         "(`mirror_proposals`)")
        if self.slice_smoothing:
            parts.append(f"each proposal is smoothed along z with a Gaussian of sigma {self.slice_smoothing:g} "
                         "(in slices of the model grid; `slice_smoothing`)")
        return parts


class SliceWisePredictor(Predictor):
    """A slice-wise family's predictor: whole slices, in-plane sizes of ``config.size_multiple``, odd seeds on the
    mirrored scan where the config says so, and ``smoothed`` proposals."""

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        return (1, self.config.size_multiple, self.config.size_multiple)

    @property
    def mirrors(self) -> bool:
        return self.config.mirror_proposals

    def slices(self, image: np.ndarray, centres, spacing: tuple[float, float, float]) -> torch.Tensor:
        """The model's input for the slices ``centres`` of ``image`` (on a grid of ``spacing``), as training cuts
        them (``slice_stacks``)."""
        return torch.from_numpy(slice_stacks(image, centres, self.config.context_slices,
                                             self.config.position_spacing(spacing)))

    def smoothed(self, probability: np.ndarray) -> np.ndarray:
        """A proposal's probabilities [z, y, x] smoothed along z as ``config.slice_smoothing`` says."""
        return smooth_across_slices(probability, self.config.slice_smoothing)


class BatchSource(Protocol):
    """Training samples of a family: ``batch(size)`` gives (images, masks, structure indices); ``rng``
    (a ``numpy.random.Generator``) is what the trainer reseeds on resuming and in worker processes."""

    rng: np.random.Generator

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def stacked(items: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training samples (image, mask, structure index) as one batch: images, masks and indices as tensors."""
    images, masks, labels = zip(*items)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), torch.tensor(labels)


@dataclasses.dataclass
class Stage:
    """One stage of a training recipe. The trainer builds an AdamW optimiser over ``parameters()`` at
    ``lr`` with a cosine schedule, and runs ``steps`` steps of ``loss(batch)`` (backward, optimiser step,
    log, checkpoint); with ``averaged``, the trained parameters' moving average is what is saved."""

    name: str
    steps: int
    lr: float
    parameters: Callable[[], list[nn.Parameter]]  # called when the stage starts (it may freeze others first)
    loss: Callable[[tuple], torch.Tensor]  # a batch -> the scalar loss to minimise
    averaged: bool = False
    new_models_only: bool = False  # skipped when training goes on from a trained model (init_from)
    finish: Callable[[], None] | None = None  # after the stage's last step (say, measuring a latent scale)


class Recipe:
    """How a family trains: built by the trainer with the model, the run's settings (``TrainSettings``)
    and ``trainer``, which gives ``device``, ``autocast()`` (bfloat16 where the run uses it; losses are
    computed in fp32 outside it), ``batch()`` (the next batch, as the stages' losses get them) and
    ``prompt_embeddings(structures, task)`` (the structures' prompts with another verb, encoded). The
    constructor checks the settings it uses (raising ``errors.DataError``) and lays out the model in
    memory as the family likes it."""

    def __init__(self, model: nn.Module, settings, trainer):
        self.model, self.config, self.settings, self.trainer = model, model.config, settings, trainer

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def batch_source(self, cases: list, structures: tuple[str, ...], text: TextEmbedding | None) -> BatchSource:
        """Where batches come from: ``cases`` are ``datasets.PreparedCase`` on the model grid; ``text`` holds
        the embeddings of ``structures``' prompts, one row each (``None`` for a learned embedding)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Anything besides the model and optimiser that a checkpoint must keep (tensors and plain values)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family, as ``FAMILIES`` holds it."""

    config: type[ModelConfig]
    model: type[nn.Module]
    predictor: type[Predictor]
    recipe: type[Recipe]
    lora_targets: Callable[[nn.Module], list[str]]  # module names that get low-rank adapters
    retrained: Callable[[nn.Module], list[str]]  # parameter names retrained in full when adapting
    card_text: Callable[[ModelConfig], list[str]]  # how the model samples, for its card
    # A model of a config that reads more of the scan (more context_slices, or a lateral_position it lacked)
    # holding a trained model's weights, those of the new inputs zero (scripts/widen_context.py); None: cannot.
    grown: Callable[[nn.Module, ModelConfig], nn.Module] | None = None


def normalisation_parameters(model: nn.Module) -> list[str]:
    """The parameters of every normalisation layer (retrained in full when adapting, as in ProGiDiff)."""
    norms = {f"{name}." for name, module in model.named_modules()
             if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.BatchNorm3d))}
    return [name for name, _ in model.named_parameters() if any(name.startswith(n) for n in norms)]


def widened_inputs(old: SliceWiseConfig, new: SliceWiseConfig) -> list[int]:
    """Where each input channel of a 2.5D model reading ``old.context_slices`` neighbours each side (and
    ``old.lateral_position``) goes in one of ``new``, which reads at least as much: the slices centred, the
    lateral position after them (``preprocessing.slice_stacks``)."""
    slices = [new.context_slices - old.context_slices + i for i in range(old.slice_channels)]
    return slices + ([new.slice_channels] if old.lateral_position else [])


def load_grown(bigger: nn.Module, model: nn.Module, placed: dict[str, tuple[int, torch.Tensor]]) -> nn.Module:
    """``bigger`` holding ``model``'s weights, where the tensors named in ``placed`` (``name: (dim, index)``) have
    grown along ``dim``: ``model``'s values at ``index``, zeros elsewhere (``Family.grown``)."""
    state = bigger.state_dict()
    for name, value in model.state_dict().items():
        if name in placed and state[name].shape != value.shape:
            dim, index = placed[name]
            value = torch.zeros_like(state[name]).index_copy_(dim, index.to(value.device), value)
        state[name] = value
    bigger.load_state_dict(state)
    return bigger
