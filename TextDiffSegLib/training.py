"""Training a model family on a Decathlon-style dataset, resumable from checkpoints.

Two stages, as in the universal-model paper: the mask autoencoder first (BCE + Dice, weight
decay), then, with it frozen, the image encoder, structure embedding and denoiser (MSE on the
predicted clean latent, plus BCE + Dice of its decoded mask). The saved model holds an exponential
moving average of the second stage's weights, as diffusion models usually do (steadier than the
last step's weights). A checkpoint is written every few hundred steps; running the same command
again resumes from it. Every step's loss goes to ``loss_log.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .adaptation import add_adapter, save_adapter, weights_sha256
from .datasets import PreparedCase, prepare_case, read_dataset, split_cases
from .errors import DataError, ModelError, SettingsError
from .families import FAMILIES
from .modelio import load_model, save_model
from .model_card import TRAINING_RECORD, VOLUME_RANGES, render_card
from .preprocessing import lateral_position
from .registry import resolve_model
from .sampler import make_scheduler
from .terminology import get_structure, resolve_prompt
from .text_encoders import conditioning_text, load_text_encoder
from .typical_size import training_volume_ranges
from .volume import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "loss_log.csv"
NEAR_NEGATIVE_MM = 40.0  # how far past a structure's ends the near negative slices reach
# Config fields that are not model options: the dataset, the run's settings and training set them.
NOT_OPTIONS = ("family", "name", "modality", "structures", "adapter", "latent_scale")


@dataclasses.dataclass
class TrainSettings:
    data: str
    output: str
    family: str = "universal"
    name: str = ""
    structures: tuple[str, ...] = ()  # empty: every structure the dataset labels
    validation_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 16
    crop: tuple[int, int] = (128, 128)  # training crop, voxels of the model grid (slices smaller than it are padded)
    autoencoder_steps: int = 600
    diffusion_steps: int = 6000
    autoencoder_lr: float = 1e-3
    lr: float = 3e-4
    weight_decay: float = 1e-5
    decoded_mask_weight: float = 1.0
    present_fraction: float = 0.75  # share of samples drawn from slices that contain the structure
    near_negative_fraction: float = 0.5  # of the other samples, the share from slices within 40 mm past its ends
    rotation_degrees: float = 10.0  # in-plane rotations drawn from ±this (0: none)
    scaling: float = 0.15  # in-plane zoom drawn from 1 ± this (0: none)
    gamma: float = 1.0  # intensity gamma drawn log-uniformly from 1/this to this (1: none)
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 where the CPU or GPU computes it natively
    cache_dir: str = ""
    # Config fields of a new model (spacing, widths...); training from init_from accepts only its own values.
    model_options: dict = dataclasses.field(default_factory=dict)
    init_from: str = ""  # a model (folder or name) to start from: its config and weights; no autoencoder stage
    lora_rank: int = 0  # > 0: adapt init_from with LoRA of this rank (see adaptation) instead of training it all
    lora_alpha: float = 0.0  # LoRA scale numerator (0: the rank)
    ema_decay: float = 0.999  # the saved denoiser: a moving average of its weights with this decay (0: the last ones)
    workers: int = 0  # processes drawing batches ahead of the training step (0: drawn in the training process)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice of each sample; ``eps`` keeps empty masks well defined."""
    probabilities = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probabilities * target).sum(1)
    return 1 - (2 * intersection + eps) / (probabilities.sum(1) + target.sum(1) + eps)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice of each sample (the mask autoencoder's loss in papers/002)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    return bce + soft_dice_loss(logits, target)


class ImportanceTimesteps:
    """Timesteps drawn in proportion to the loss they recently gave (papers/002, after Nichol & Dhariwal).

    The range is cut into buckets; each bucket keeps its last few losses, and a bucket is drawn with
    probability proportional to the root mean square of those, mixed with a little of the uniform
    distribution. Until every bucket has a history, timesteps are uniform. Without this, x0-prediction
    learns to copy the lightly noised mask and stays weak at the high timesteps sampling starts from.
    """

    def __init__(self, num_timesteps: int, buckets: int = 20, history: int = 10, uniform: float = 0.1):
        self.num_timesteps, self.uniform = num_timesteps, uniform
        self.edges = torch.linspace(0, num_timesteps, buckets + 1).long()
        self.losses = torch.full((buckets, history), float("nan"))

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if torch.isnan(self.losses).any():
            return torch.randint(0, self.num_timesteps, (count,), generator=generator)
        weights = self.losses.pow(2).mean(1).sqrt()
        weights = (1 - self.uniform) * weights / weights.sum() + self.uniform / len(weights)
        buckets = torch.multinomial(weights, count, replacement=True, generator=generator)
        low, high = self.edges[buckets], self.edges[buckets + 1]
        return low + (torch.rand(count, generator=generator) * (high - low)).long()

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        buckets = torch.bucketize(timesteps.cpu(), self.edges[1:-1], right=True)
        for bucket, loss in zip(buckets.tolist(), losses.detach().cpu().tolist()):
            self.losses[bucket] = torch.cat([self.losses[bucket, 1:], torch.tensor([loss])])


class SliceSampler:
    """Random 2.5D crops with the mask of one structure, from cases on the model grid.

    A share ``present_fraction`` of the samples comes from slices that contain the structure; the
    rest from slices that do not, and of those a share ``near_negative_fraction`` from the
    ``near_slices`` just past its ends, where a slice-wise model is least sure whether the structure
    is there (the kidney and pancreas prompts on slices past their ends, the liver prompt on the heart).

    Anterior-posterior flips are an augmentation: BTCV as redistributed stores that axis flipped
    relative to its header, so the model must not rely on it. Left-right is never flipped. Small
    in-plane rotations and zooms stand in for the variety of patients a few cases lack; with
    ``gamma`` above 1, a random gamma curve on the intensities (as nnU-Net's augmentation) for the
    variety of scanners and contrast phases: each tissue's brightness moves, its order is kept.

    With ``position_spacing`` (the model grid's x spacing in mm), each sample gets one more channel
    after its slices: the lateral position (``preprocessing.lateral_position``) of the slice as padded,
    cropped, turned and zoomed with it, so that it stays the position of the anatomy under it.
    """

    def __init__(self, cases: list[PreparedCase], structures: tuple[str, ...], crop: tuple[int, int],
                 context: int, present_fraction: float, seed: int, rotation_degrees: float = 0.0,
                 scaling: float = 0.0, near_negative_fraction: float = 0.0, near_slices: int = 8,
                 position_spacing: float = 0.0, gamma: float = 1.0):
        self.cases, self.structures, self.crop = cases, structures, crop
        self.position_spacing = position_spacing
        self.context, self.present_fraction = context, present_fraction
        self.slice_channels = 2 * context + 1  # the slice and its neighbours; the lateral position comes after them
        self.rotation_degrees, self.scaling, self.gamma = rotation_degrees, scaling, gamma
        self.near_negative_fraction = near_negative_fraction
        self.rng = np.random.default_rng(seed)
        self.slices_with, self.slices_without, self.slices_near = {}, {}, {}
        for i, case in enumerate(cases):
            for s in structures:
                present = case.mask(s).any(axis=(1, 2))
                near = ndimage.binary_dilation(present, iterations=near_slices) & ~present
                self.slices_with[(i, s)] = np.flatnonzero(present)
                self.slices_without[(i, s)] = np.flatnonzero(~present)
                self.slices_near[(i, s)] = np.flatnonzero(near)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, masks, labels = [], [], []
        for _ in range(size):
            image, mask, label = self._item()
            images.append(image)
            masks.append(mask)
            labels.append(label)
        images, masks = self._rotate_and_zoom(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)))
        return images, masks, torch.tensor(labels)

    def _rotate_and_zoom(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample turned and zoomed about its centre; what comes in from outside is air (0)."""
        if not (self.rotation_degrees or self.scaling):
            return images, masks
        count = images.shape[0]
        angles = np.deg2rad(self.rng.uniform(-self.rotation_degrees, self.rotation_degrees, count))
        zooms = self.rng.uniform(1 - self.scaling, 1 + self.scaling, count)
        height, width = images.shape[-2:]
        cos, sin = np.cos(angles) / zooms, np.sin(angles) / zooms
        # A rotation in voxels, written in grid_sample's coordinates (-1..1 along each side).
        theta = np.stack([np.stack([cos, -sin * height / width, np.zeros(count)], 1),
                          np.stack([sin * width / height, cos, np.zeros(count)], 1)], 1)
        grid = F.affine_grid(torch.from_numpy(theta).float(), list(images.shape), align_corners=False)
        slices = self.slice_channels
        turned = F.grid_sample(images[:, :slices], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if images.shape[1] > slices:  # the lateral position: held at its edge value outside, not 0
            position = F.grid_sample(images[:, slices:], grid, mode="bilinear", padding_mode="border", align_corners=False)
            turned = torch.cat([turned, position], dim=1)
        images = turned
        masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return images, masks

    def _item(self):
        rng = self.rng
        label = int(rng.integers(len(self.structures)))
        case_index = int(rng.integers(len(self.cases)))
        case = self.cases[case_index]
        key = (case_index, self.structures[label])
        if rng.random() < self.present_fraction:
            choices = self.slices_with[key]
        elif rng.random() < self.near_negative_fraction:
            choices = self.slices_near[key]
        else:
            choices = self.slices_without[key]
        depth = case.image.shape[0]
        z = int(rng.choice(choices)) if len(choices) else int(rng.integers(depth))
        neighbours = np.clip(np.arange(z - self.context, z + self.context + 1), 0, depth - 1)
        image = case.image[neighbours].astype(np.float32) / 255.0
        mask = case.mask(self.structures[label], z)[None].astype(np.float32)
        image, mask = self._pad(image, mask)
        if self.position_spacing:
            image = np.concatenate([image, lateral_position(image[self.context][None], self.position_spacing)])
        image, mask = self._crop(image, mask)
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        slices = self.slice_channels
        intensities = image[:slices]
        if self.gamma != 1:
            intensities = intensities ** np.float32(np.exp(rng.uniform(-np.log(self.gamma), np.log(self.gamma))))
        scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
        image = np.concatenate([np.clip(intensities * scale + shift, 0, 1), image[slices:]])
        return np.ascontiguousarray(image), np.ascontiguousarray(mask), label

    def _pad(self, image: np.ndarray, mask: np.ndarray):
        """A slice smaller than the crop, padded with air to the crop's size; it lands anywhere in it."""
        height, width = self.crop
        pad_y, pad_x = max(0, height - image.shape[1]), max(0, width - image.shape[2])
        if not (pad_y or pad_x):
            return image, mask
        top, left = int(self.rng.integers(pad_y + 1)), int(self.rng.integers(pad_x + 1))
        pads = ((0, 0), (top, pad_y - top), (left, pad_x - left))
        return np.pad(image, pads), np.pad(mask, pads)

    def _crop(self, image: np.ndarray, mask: np.ndarray):
        height, width = self.crop
        y = int(self.rng.integers(image.shape[1] - height + 1))
        x = int(self.rng.integers(image.shape[2] - width + 1))
        return image[:, y:y + height, x:x + width], mask[:, y:y + height, x:x + width]


class WorkerBatches(torch.utils.data.IterableDataset):
    """Endless batches of a ``SliceSampler`` for a ``DataLoader`` with worker processes.

    Each worker draws from its own random stream, seeded by ``seed`` (the run's seed and position)
    and the worker's number: forked with one copy of the sampler, they would otherwise all send
    the same batches.
    """

    def __init__(self, sampler: SliceSampler, batch_size: int, seed: list[int]):
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            self.sampler.rng = np.random.default_rng([*self.seed, worker.id])
        while True:
            yield self.sampler.batch(self.batch_size)


def _new_config(settings: TrainSettings, name: str, modality: str, structures: tuple[str, ...]):
    """The config of a model trained from scratch: its family's defaults, with ``settings.model_options``."""
    if settings.family not in FAMILIES:
        raise DataError(f"unknown model family {settings.family!r}; known families are {', '.join(FAMILIES)}")
    config_class = FAMILIES[settings.family][0]
    options = settings.model_options
    known = sorted({f.name for f in dataclasses.fields(config_class)} - set(NOT_OPTIONS))
    misplaced = sorted(set(options) & set(NOT_OPTIONS))
    if misplaced:
        raise DataError(f"{', '.join(misplaced)} cannot be set as model options: the dataset, the run's settings "
                        "and training set them")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DataError(f"the {settings.family} family has no option {', '.join(unknown)}; its options are {', '.join(known)}")
    try:
        return config_class(family=settings.family, name=name, modality=modality, structures=structures, **options)
    except (TypeError, ValueError) as error:
        raise DataError(f"the model options do not fit the {settings.family} family: {error}") from None


def _check_options_kept(config, options: dict, init_from: str) -> None:
    """Refuse model options that differ from those of the model training continues from."""
    current = config.to_dict()
    for key, value in options.items():
        if key not in current or key in NOT_OPTIONS:
            raise DataError(f"{key} is not a model option; leave it out when training from {init_from}")
        if current[key] != (list(value) if isinstance(value, tuple) else value):
            raise DataError(f"{init_from} has {key} = {current[key]}, and training from it cannot change that "
                            f"to {value}; leave that model option out, or train a new model without init_from")


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (CPUs with AVX-512 BF16 or AMX; Ampere and later GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise DataError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision == "bf16" and not bf16_is_native(device):
        raise DataError(f"{device} has no native bfloat16 arithmetic; train with precision fp32 (--precision fp32)")
    return precision == "bf16" or (precision == "auto" and bf16_is_native(device))


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _check_steps(settings: TrainSettings) -> None:
    """Raise ``SettingsError`` for counts that are not whole numbers of at least 1: step counts that would
    leave a model untrained (no model is written that was not trained), a batch or checkpoint interval of 0."""
    counts = {"diffusion_steps (--steps)": settings.diffusion_steps, "batch_size (--batch-size)": settings.batch_size,
              "checkpoint_every (--checkpoint-every)": settings.checkpoint_every}
    if not settings.init_from:  # a model trained on from another keeps that model's mask autoencoder
        counts["autoencoder_steps (--autoencoder-steps) of a new model"] = settings.autoencoder_steps
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingsError(f"{name} must be a whole number of at least 1, not {value!r}")


class _Run:
    """State of one training run: model, optimiser, step counters, log."""

    def __init__(self, settings: TrainSettings, progress: Callable[[str, int, int, float], None] | None):
        self.settings, self.progress = settings, progress
        _check_steps(settings)
        self.output = Path(settings.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(settings.device)
        # Weights and optimiser stay fp32; only the forward pass runs in bfloat16 (1.7x faster on a
        # CPU with AVX-512 BF16), and losses are computed in fp32.
        self.bf16 = _use_bf16(settings.precision, self.device)
        if not 0 <= settings.ema_decay < 1:
            raise DataError(f"ema_decay must be at least 0 and below 1 (0: no averaging), not {settings.ema_decay}")
        if not (0 <= settings.present_fraction <= 1 and 0 <= settings.near_negative_fraction <= 1):
            raise DataError(f"present_fraction and near_negative_fraction are shares between 0 and 1, not "
                            f"{settings.present_fraction} and {settings.near_negative_fraction}")
        if settings.workers < 0:
            raise DataError(f"workers is a number of processes, 0 or more, not {settings.workers}")
        if not 0 <= settings.scaling < 1 or settings.rotation_degrees < 0 or settings.gamma < 1:
            raise DataError(f"augmentation needs 0 <= scaling < 1, rotation_degrees >= 0 and gamma >= 1, not "
                            f"scaling {settings.scaling}, rotation_degrees {settings.rotation_degrees} and "
                            f"gamma {settings.gamma}")
        dataset = read_dataset(settings.data)
        # Names or synonyms ("left kidney"); a misspelt one gets the nearest known names.
        structures = (tuple(dict.fromkeys(resolve_prompt(s).name for s in settings.structures))
                      or tuple(dataset.labels[v] for v in sorted(dataset.labels)))
        dataset.require_labels(structures)
        self.training_cases, self.validation_cases = split_cases(dataset.cases, settings.validation_fraction, settings.split_seed)
        self.stage, self.step = "autoencoder", 0
        if settings.lora_rank and not settings.init_from:
            raise DataError("LoRA adapts a trained model: name it with init_from (--init-from)")
        if settings.init_from:
            base = resolve_model(settings.init_from)
            self.model = load_model(base, device=self.device).train()
            self.config = self.model.config
            self.config.name = settings.name or self.output.name
            self.config.modality = dataset.modality  # the scans it now learns from are normalised as such
            if settings.lora_rank:
                self._add_adapter(base, structures)
            _check_options_kept(self.config, settings.model_options, settings.init_from)
            structures = self.config.structures
            dataset.require_labels(structures, f", which {settings.init_from} segments; training from it needs all of them")
            self.stage = "diffusion"
        else:
            self.config = _new_config(settings, settings.name or self.output.name, dataset.modality, structures)
            self.model = FAMILIES[settings.family][1](self.config).to(self.device)
        multiple = self.config.size_multiple
        if any(side <= 0 or side % multiple for side in settings.crop):
            raise DataError(f"training crops need sides that are positive multiples of {multiple} (the model's "
                            f"downsampling), not {tuple(settings.crop)}")
        self.model.to(memory_format=torch.channels_last)
        cache = Path(settings.cache_dir) if settings.cache_dir else self.output / "cache"
        prepared = [prepare_case(case, dataset, self.config.spacing, cache) for case in self.training_cases]
        self.sampler = SliceSampler(prepared, structures, tuple(settings.crop), self.config.context_slices,
                                    settings.present_fraction, settings.seed, settings.rotation_degrees,
                                    settings.scaling, settings.near_negative_fraction,
                                    near_slices=max(1, round(NEAR_NEGATIVE_MM / self.config.spacing[2])),
                                    position_spacing=self.config.spacing[0] if self.config.lateral_position else 0.0,
                                    gamma=settings.gamma)
        self.conditions = self._conditions()
        self.timesteps = ImportanceTimesteps(self.config.num_train_timesteps)
        self.optimizer = self._optimizer()
        self.average: dict[str, torch.Tensor] | None = None  # the moving average, once the diffusion stage runs
        self._resume()
        self.worker_batches = None  # started at the first batch, after resuming has set the run's position

    def position_seed(self) -> list[int]:
        """The seed of the batches drawn from the run's current position (so that a resumed run draws new ones)."""
        return [self.settings.seed, self.step, len(self.stage)]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch of images, masks and structure indices, drawn here or by the worker processes."""
        if not self.settings.workers:
            return self.sampler.batch(self.settings.batch_size)
        if self.worker_batches is None:
            batches = WorkerBatches(self.sampler, self.settings.batch_size, self.position_seed())
            self.worker_batches = iter(torch.utils.data.DataLoader(
                batches, batch_size=None, num_workers=self.settings.workers, prefetch_factor=4,
                pin_memory=self.device.type == "cuda"))
        return next(self.worker_batches)

    def _add_adapter(self, base: Path, structures: tuple[str, ...]) -> None:
        """LoRA into the model; the adapter segments ``structures``, those the new modality's data labels."""
        init_from = self.settings.init_from
        if self.config.adapter is not None:
            raise DataError(f"{init_from} is itself an adapter; adapt its base model '{self.config.adapter['base']}' instead")
        if self.config.conditioning != "text":
            raise DataError(f"{init_from} names structures by a learnt embedding; LoRA adaptation needs a model "
                            "conditioned on text, which can be adapted for some of its structures")
        new = [s for s in structures if s not in self.config.structures]
        if new:
            raise DataError(f"{init_from} does not segment {', '.join(new)}: adaptation teaches a model a new "
                            "modality, not new structures; leave them out with --structures")
        self.config.structures = structures
        # A registered model is recorded by name, so that the adapter finds it on any machine.
        reference = str(base.resolve()) if Path(init_from).expanduser().is_dir() else init_from
        add_adapter(self.model, reference, weights_sha256(base), self.settings.lora_rank,
                    self.settings.lora_alpha or self.settings.lora_rank)

    def _conditions(self) -> torch.Tensor:
        """Per structure: pooled text embeddings of its canonical prompt, or its index (learned option)."""
        if self.config.conditioning == "learned":
            return torch.arange(len(self.config.structures), device=self.device)
        encoder = load_text_encoder(self.config.text_encoder, device=self.device)
        texts = [conditioning_text(get_structure(s), self.config.modality) for s in self.config.structures]
        return encoder.encode(texts).pooled

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.stage == "autoencoder":
            parameters, lr = self.model.mask_autoencoder.parameters(), self.settings.autoencoder_lr
        else:
            self.model.mask_autoencoder.requires_grad_(False)
            parameters = [p for p in self.model.parameters() if p.requires_grad]
            lr = self.settings.lr
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=self.settings.weight_decay)

    def _resume(self) -> None:
        path = self.output / CHECKPOINT_NAME
        if path.is_file():
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                self.config.latent_scale = state["latent_scale"]
                self.model.load_state_dict(state["model"])
                self.stage, self.step = state["stage"], state["step"]
                self.optimizer = self._optimizer()
                self.optimizer.load_state_dict(state["optimizer"])
                self.timesteps.losses = state["timestep_losses"]
                self.average = state.get("average")
            except (RuntimeError, ValueError, KeyError, EOFError, OSError) as error:
                lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().endswith(":")]
                first_line = lines[0][:200] if lines else type(error).__name__
                raise ModelError(
                    f"cannot resume from {path}: it is corrupt or was written with other model settings ({first_line}). "
                    "Resume with the settings of that run, or choose a new output folder (or delete the checkpoint) "
                    "to start over."
                ) from None
            self.sampler.rng = np.random.default_rng(self.position_seed())
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop log rows past the resumed position (steps done after the last checkpoint are done again)."""
        path = self.output / LOG_NAME
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        stages = ("autoencoder", "diffusion")

        def done(row: list[str]) -> bool:
            try:
                stage, step = row[0], int(row[1])
                return stages.index(stage) < stages.index(self.stage) or (stage == self.stage and step <= self.step)
            except (IndexError, ValueError):  # a malformed row (say, half written when the run was killed)
                return False

        kept = rows[:1] + [row for row in rows[1:] if done(row)]
        if len(kept) < len(rows):
            text = io.StringIO()
            csv.writer(text).writerows(kept)
            write_atomically(path, lambda p: p.write_text(text.getvalue()), overwrite=True)

    def checkpoint(self) -> None:
        state = {"stage": self.stage, "step": self.step, "latent_scale": self.config.latent_scale,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "timestep_losses": self.timesteps.losses, "average": self.average}
        write_atomically(self.output / CHECKPOINT_NAME, lambda p: torch.save(state, p), overwrite=True)

    def log(self, loss: float, seconds: float) -> None:
        path = self.output / LOG_NAME
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["stage", "step", "loss", "lr", "seconds"])
            writer.writerow([self.stage, self.step, f"{loss:.6f}", f"{self.optimizer.param_groups[0]['lr']:.3g}", f"{seconds:.3f}"])

    def run_stage(self, total: int, train_step: Callable[[], float], base_lr: float) -> None:
        while self.step < total:
            started = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = _cosine_lr(self.step, total, base_lr)
            loss = train_step()
            self.step += 1
            self.log(loss, time.perf_counter() - started)
            if self.progress is not None:
                self.progress(self.stage, self.step, total, loss)
            if self.step % self.settings.checkpoint_every == 0 or self.step == total:
                self.checkpoint()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the training device, laid out channels-last (faster convolutions)."""
        return tensor.to(self.device, memory_format=torch.channels_last)

    def autoencoder_step(self) -> float:
        _, masks, _ = self.batch()
        masks = self._to_device(masks)
        autoencoder = self.model.mask_autoencoder
        with self.autocast():
            logits = autoencoder.decode(autoencoder.encode(masks))
        loss = mask_loss(logits.float(), masks).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def measure_latent_scale(self, batches: int = 20) -> float:
        latents = [self.model.mask_autoencoder.encode(self.batch()[1].to(self.device))
                   for _ in range(batches)]
        return float(1.0 / torch.cat(latents).std().clamp(min=1e-6))

    def diffusion_step(self, scheduler) -> float:
        images, masks, labels = self.batch()
        images, masks, labels = self._to_device(images), self._to_device(masks), labels.to(self.device)
        model = self.model
        with torch.no_grad():
            clean = model.encode_mask(masks)
        noise = torch.randn_like(clean)
        timesteps = self.timesteps.sample(clean.shape[0]).to(self.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        decoded = self.config.prediction_type == "sample" and self.settings.decoded_mask_weight > 0
        with self.autocast():
            prediction = model.denoise(noisy, timesteps, model.image_encoder(images),
                                       model.embed_structure(self.conditions[labels]))
            logits = model.decode_mask(prediction) if decoded else None
        target = {"sample": clean, "epsilon": noise}.get(self.config.prediction_type)
        if target is None:
            target = scheduler.get_velocity(clean, noise, timesteps)
        losses = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        if decoded:
            losses = losses + self.settings.decoded_mask_weight * mask_loss(logits.float(), masks)
        self.timesteps.update(timesteps, losses)
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_average()
        return loss.item()

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update_average(self) -> None:
        """Move the average towards the current weights; early on it follows them closely (as diffusers' EMAModel)."""
        if not self.settings.ema_decay:
            return
        parameters = self._trained_parameters()
        if self.average is None:
            self.average = {name: p.detach().clone() for name, p in parameters.items()}
        decay = min(self.settings.ema_decay, (1 + self.step) / (10 + self.step))
        for name, parameter in parameters.items():
            self.average[name].lerp_(parameter, 1 - decay)

    @torch.no_grad()
    def use_average(self) -> None:
        """Put the averaged weights into the model (before saving it)."""
        if not self.settings.ema_decay:
            return
        parameters = self._trained_parameters()
        for name, value in (self.average or {}).items():
            parameters[name].copy_(value)


def train(settings: TrainSettings, progress: Callable[[str, int, int, float], None] | None = None) -> Path:
    """Train (or resume) and write the model folder ``<output>/model``; returns that folder."""
    torch.manual_seed(settings.seed)
    run = _Run(settings, progress)
    run.model.train()
    if run.stage == "autoencoder":
        run.run_stage(settings.autoencoder_steps, run.autoencoder_step, settings.autoencoder_lr)
        run.config.latent_scale = run.measure_latent_scale()
        run.stage, run.step = "diffusion", 0
        run.optimizer = run._optimizer()
        run.checkpoint()
    scheduler = make_scheduler("ddpm", run.config.num_train_timesteps, run.config.prediction_type)
    run.run_stage(settings.diffusion_steps, lambda: run.diffusion_step(scheduler), settings.lr)
    run.use_average()
    run.model.eval()
    split = {"training": [c.id for c in run.training_cases], "validation": [c.id for c in run.validation_cases]}
    record = {"settings": dataclasses.asdict(settings), "split": split,
              VOLUME_RANGES: training_volume_ranges(run.sampler.cases, run.sampler.structures, run.config.spacing)}
    save = save_adapter if run.config.adapter is not None else save_model
    folder = save(run.model, run.output / "model", card=render_card(run.config, record))
    (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return folder
