"""How the universal family trains (papers/002): its recipe, and the 2.5D slice crops it learns from.

Two stages: the mask autoencoder first (BCE + Dice, weight decay), then, with it frozen, the image
encoder, structure embedding and denoiser (MSE on the predicted clean latent, plus BCE + Dice of its
decoded mask), whose moving average is what is saved. Between them the latent scale is measured.
A model trained on from another (``init_from``) has its autoencoder already: only the second stage runs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..datasets import PreparedCase
from ..errors import DataError
from ..losses import diffusion_target, mask_loss
from ..preprocessing import slice_stacks
from ..sampler import make_scheduler
from ..text_encoders import TextEmbedding
from ..timesteps import ImportanceTimesteps
from .base import Recipe, Stage, stacked

NEAR_NEGATIVE_MM = 40.0  # how far past a structure's ends the near negative slices reach


def check_slice_crop(crop: tuple[int, ...], multiple: int) -> None:
    """Raise ``DataError`` unless ``crop`` is two in-plane sides (y, x), positive multiples of ``multiple`` (the
    model's downsampling): the training crops of every 2D family."""
    if len(crop) != 2 or any(side <= 0 or side % multiple for side in crop):
        raise DataError(f"training crops need two sides (y, x) that are positive multiples of {multiple} (the "
                        f"model's downsampling), not {tuple(crop)}")


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

    @classmethod
    def for_run(cls, cases: list[PreparedCase], structures: tuple[str, ...], config, settings) -> "SliceSampler":
        """The samples of a slice-wise family's training run: the inputs and grid of its ``config``
        (``base.SliceWiseConfig``), the crops and augmentation of its ``settings``."""
        return cls(cases, structures, tuple(settings.crop), config.context_slices, settings.present_fraction,
                   settings.seed, settings.rotation_degrees, settings.scaling, settings.near_negative_fraction,
                   near_slices=max(1, round(NEAR_NEGATIVE_MM / config.spacing[2])),
                   position_spacing=config.position_spacing(config.spacing), gamma=settings.gamma)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, masks, labels = stacked([self._item() for _ in range(size)])
        return *self._rotate_and_zoom(images, masks), labels

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
        mask = case.mask(self.structures[label], z)[None].astype(np.float32)
        padding = self._padding(mask.shape[1:])
        image = slice_stacks(case.image, [z], self.context, self.position_spacing, padding)[0]
        if padding is not None:
            mask = np.pad(mask, ((0, 0), *padding))
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

    def _padding(self, shape: tuple[int, int]):
        """How a slice of ``shape`` smaller than the crop is padded with air to the crop's size (it lands
        anywhere in it): ((top, bottom), (left, right)), or None where it is not smaller."""
        height, width = self.crop
        pad_y, pad_x = max(0, height - shape[0]), max(0, width - shape[1])
        if not (pad_y or pad_x):
            return None
        top, left = int(self.rng.integers(pad_y + 1)), int(self.rng.integers(pad_x + 1))
        return (top, pad_y - top), (left, pad_x - left)

    def _crop(self, image: np.ndarray, mask: np.ndarray):
        height, width = self.crop
        y = int(self.rng.integers(image.shape[1] - height + 1))
        x = int(self.rng.integers(image.shape[2] - width + 1))
        return image[:, y:y + height, x:x + width], mask[:, y:y + height, x:x + width]


class UniversalRecipe(Recipe):
    """The two stages of the universal family; checkpoints keep the latent scale and the timesteps' losses."""

    def __init__(self, model, settings, trainer):
        super().__init__(model, settings, trainer)
        check_slice_crop(settings.crop, self.config.size_multiple)
        model.to(memory_format=torch.channels_last)  # faster convolutions (see UniversalPredictor)
        self.timesteps = ImportanceTimesteps(self.config.num_train_timesteps, high_noise_share=settings.high_noise_share)
        self.scheduler = make_scheduler("ddpm", self.config.num_train_timesteps, self.config.prediction_type)
        self.conditions = None  # per structure: its prompt's pooled embedding, or its index (set with the batch source)

    def batch_source(self, cases: list[PreparedCase], structures: tuple[str, ...], text: TextEmbedding | None):
        self.conditions = (torch.arange(len(structures), device=self.trainer.device) if text is None
                           else text.pooled)
        return SliceSampler.for_run(cases, structures, self.config, self.settings)

    def stages(self) -> list[Stage]:
        settings = self.settings
        return [
            Stage("autoencoder", settings.autoencoder_steps, settings.autoencoder_lr,
                  lambda: list(self.model.mask_autoencoder.parameters()), self.autoencoder_loss,
                  new_models_only=True, finish=self.measure_latent_scale),
            Stage("diffusion", settings.diffusion_steps, settings.lr, self.diffusion_parameters, self.diffusion_loss,
                  averaged=True),
        ]

    def state(self) -> dict:
        return {"latent_scale": self.config.latent_scale, "timestep_losses": self.timesteps.losses}

    def load_state(self, state: dict) -> None:
        self.config.latent_scale = state["latent_scale"]
        self.timesteps.losses = state["timestep_losses"]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the training device, laid out channels-last."""
        return tensor.to(self.trainer.device, memory_format=torch.channels_last)

    def autoencoder_loss(self, batch) -> torch.Tensor:
        masks = self._to_device(batch[1])
        autoencoder = self.model.mask_autoencoder
        with self.trainer.autocast():
            logits = autoencoder.decode(autoencoder.encode(masks))
        return mask_loss(logits.float(), masks).mean()

    @torch.no_grad()
    def measure_latent_scale(self, batches: int = 20) -> None:
        latents = [self.model.mask_autoencoder.encode(self.trainer.batch()[1].to(self.trainer.device))
                   for _ in range(batches)]
        self.config.latent_scale = float(1.0 / torch.cat(latents).std().clamp(min=1e-6))

    def diffusion_parameters(self) -> list[torch.nn.Parameter]:
        self.model.mask_autoencoder.requires_grad_(False)
        return [p for p in self.model.parameters() if p.requires_grad]

    def diffusion_loss(self, batch) -> torch.Tensor:
        images, masks, labels = batch
        trainer, model, scheduler = self.trainer, self.model, self.scheduler
        images, masks, labels = self._to_device(images), self._to_device(masks), labels.to(trainer.device)
        with torch.no_grad():
            clean = model.encode_mask(masks)
        noise = torch.randn_like(clean)
        timesteps = self.timesteps.sample(clean.shape[0]).to(trainer.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        decoded = self.config.prediction_type == "sample" and self.settings.decoded_mask_weight > 0
        with trainer.autocast():
            prediction = model.denoise(noisy, timesteps, model.image_encoder(images),
                                       model.embed_structure(self.conditions[labels]))
            logits = model.decode_mask(prediction) if decoded else None
        target = diffusion_target(scheduler, self.config.prediction_type, clean, noise, timesteps)
        losses = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        if decoded:
            losses = losses + self.settings.decoded_mask_weight * mask_loss(logits.float(), masks)
        self.timesteps.update(timesteps, losses)
        return losses.mean()
