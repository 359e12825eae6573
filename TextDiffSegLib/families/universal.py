"""Guided latent diffusion for universal segmentation (Salsi et al., papers/002).

One model for many structures. A mask autoencoder (trained with BCE + Dice and weight decay)
maps a binary mask to a small latent; an image encoder maps the scan (2.5D: a slice and its
neighbours) to features on the latent grid; a U-Net denoiser, conditioned on those features by
concatenation and on the structure by an embedding added to its timestep embedding, predicts
the clean mask latent (x0-prediction) from a noisy one. The structure embedding comes from a text
encoder (the paper's CLIP option) or is learnt per structure (the paper's "Learnt" option).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from diffusers import UNet2DModel
from torch import nn

from ..sampler import make_scheduler, sample, windowed
from ..text_encoders import TextEmbedding
from .base import SliceWiseConfig, SliceWisePredictor, StepCallback, load_grown, normalisation_parameters, widened_inputs

SLICE_BATCH = 32  # slices sampled together (one noise field, one generator each)


@dataclasses.dataclass
class UniversalConfig(SliceWiseConfig):
    family: str = "universal"
    latent_channels: int = 4
    mask_channels: tuple[int, int, int] = (16, 32, 64)
    image_channels: tuple[int, int, int] = (16, 32, 64)
    image_feature_channels: int = 32
    context_slices: int = 1  # neighbouring slices on each side given to the image encoder
    unet_channels: tuple[int, int, int] = (32, 64, 96)
    latent_scale: float = 1.0  # multiplies mask latents so that they have unit variance
    # Between sampling steps, replace the clean-latent estimate by the latent of the mask it decodes
    # to (see UniversalModel.project_to_mask); needs x0-prediction.
    project_to_masks: bool = False

    def problems(self) -> list[str]:
        found = super().problems()
        for field in ("mask_channels", "image_channels", "unet_channels"):
            value = getattr(self, field)
            if len(value) != 3 or min(value) < 1:
                found.append(f"{field} must be three positive widths, not {value}")
        for field in ("unet_channels", "image_channels"):
            if any(c % 8 for c in getattr(self, field)):
                found.append(f"{field} must be multiples of 8 (group norm), not {getattr(self, field)}")
        if self.project_to_masks and self.prediction_type != "sample":
            found.append("project_to_masks needs prediction_type 'sample' (the denoiser's output must be a clean latent)")
        return found

    def __post_init__(self):
        for field in ("mask_channels", "image_channels", "unet_channels"):
            setattr(self, field, tuple(int(c) for c in getattr(self, field)))
        super().__post_init__()

    @property
    def downsampling(self) -> int:
        return 4

    @property
    def size_multiple(self) -> int:
        """In-plane sizes (model-grid voxels) the model accepts: the latent downsampling times the U-Net's."""
        return self.downsampling * 2 ** (len(self.unet_channels) - 1)


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.SiLU())


def _up(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv(in_channels, out_channels))


class MaskAutoencoder(nn.Module):
    """A plain (not variational) autoencoder of binary masks, downsampling by 4."""

    def __init__(self, channels: tuple[int, int, int], latent_channels: int):
        super().__init__()
        c0, c1, c2 = channels
        self.encoder = nn.Sequential(
            _conv(1, c0), _conv(c0, c1, stride=2), _conv(c1, c1), _conv(c1, c2, stride=2), _conv(c2, c2),
            nn.Conv2d(c2, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            _conv(latent_channels, c2), _conv(c2, c2), _up(c2, c1), _conv(c1, c1), _up(c1, c0),
            nn.Conv2d(c0, 1, 3, padding=1),
        )

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(mask)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Mask logits."""
        return self.decoder(latent)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ImageEncoder(nn.Module):
    """Scan slices (with their neighbours, and the lateral position where the config asks for it, as channels) to
    features on the latent grid."""

    def __init__(self, in_channels: int, channels: tuple[int, int, int], out_channels: int):
        super().__init__()
        c0, c1, c2 = channels
        self.layers = nn.Sequential(
            _conv(in_channels, c0), _conv(c0, c1, stride=2), _ResidualBlock(c1),
            _conv(c1, c2, stride=2), _ResidualBlock(c2), _ResidualBlock(c2),
            nn.Conv2d(c2, out_channels, 1),
        )

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.layers(slices)


class UniversalModel(nn.Module):
    """Mask autoencoder, image encoder, structure embedding and x0-predicting U-Net."""

    def __init__(self, config: UniversalConfig):
        super().__init__()
        self.config = config
        self.mask_autoencoder = MaskAutoencoder(config.mask_channels, config.latent_channels)
        self.image_encoder = ImageEncoder(config.image_in_channels, config.image_channels, config.image_feature_channels)
        embed_dim = config.unet_channels[0] * 4
        if config.conditioning == "text":
            self.structure_embedding = nn.Sequential(
                nn.Linear(config.text_embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
            )
        else:
            self.structure_embedding = nn.Embedding(len(config.structures), embed_dim)
        self.unet = UNet2DModel(
            in_channels=config.latent_channels + config.image_feature_channels,
            out_channels=config.latent_channels,
            block_out_channels=config.unet_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=config.unet_channels[-1] // 2,
            class_embed_type="identity",
        )

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Binary masks [B, 1, H, W] to scaled latents [B, C, H/4, W/4]."""
        return self.mask_autoencoder.encode(mask) * self.config.latent_scale

    def decode_mask(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents to mask logits [B, 1, H, W]."""
        return self.mask_autoencoder.decode(latent / self.config.latent_scale)

    def project_to_mask(self, latent: torch.Tensor) -> torch.Tensor:
        """The latent of the binary mask that ``latent`` decodes to.

        Early in sampling the x0 estimate is the blurred average of the masks the model finds
        plausible; noised again, it is unlike anything the denoiser saw in training (latents of
        sharp masks), and each further step shrinks the result. Sending the estimate through the
        mask autoencoder puts it back among the latents the denoiser knows.
        """
        mask = (self.decode_mask(latent) > 0).to(latent.dtype)
        return self.encode_mask(mask)

    def embed_structure(self, condition: torch.Tensor) -> torch.Tensor:
        """Pooled text embeddings [B, text_embed_dim] or structure indices [B] to U-Net class embeddings."""
        return self.structure_embedding(condition)

    def denoise(self, noisy_latent: torch.Tensor, timestep: torch.Tensor, image_features: torch.Tensor,
                structure_embedding: torch.Tensor) -> torch.Tensor:
        """The U-Net's prediction (for this family: the clean latent)."""
        inputs = torch.cat([noisy_latent, image_features], dim=1)
        timesteps = timestep.expand(inputs.shape[0]) if timestep.dim() else timestep.repeat(inputs.shape[0])
        embedding = structure_embedding.expand(inputs.shape[0], -1)
        return self.unet(inputs, timesteps, class_labels=embedding).sample


def sample_slices(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], features: torch.Tensor,
                  latent_channels: int, window: tuple[int, int], scheduler, seed: int, steps: int,
                  device: torch.device, on_step: StepCallback) -> torch.Tensor:
    """The sampled latents [z, latent_channels, h, w] of every slice of a 2D family's scan, ``SLICE_BATCH`` slices
    at a time, each batch from its own generator (seeded from ``seed`` and its first slice). ``features`` [z, F, h, w]
    are the slices' image features on the latent grid; ``predict(x, t)`` is the denoiser's output for ``x``, the
    noisy latents of an in-plane ``window`` with their features concatenated."""
    starts = range(0, features.shape[0], SLICE_BATCH)
    latents = []
    for batch, start in enumerate(starts):
        batch_features = features[start:start + SLICE_BATCH]

        def denoise(noisy, t, batch_features=batch_features):
            return windowed(lambda x: predict(x, t), torch.cat([noisy, batch_features], dim=1), window)

        generator = torch.Generator().manual_seed(seed * 100003 + start)
        shape = (batch_features.shape[0], latent_channels, *batch_features.shape[-2:])
        latents.append(sample(denoise, scheduler, shape, steps, generator, device,
                              on_step=lambda step, total, batch=batch: on_step(batch * total + step, len(starts) * total)))
    return torch.cat(latents)


class UniversalPredictor(SliceWisePredictor):
    """2.5D sampling: every slice of the scan (with its neighbours) is encoded once; each proposal samples
    the mask latents of ``SLICE_BATCH`` slices at a time, in in-plane sliding windows of the latent grid,
    and decodes them."""

    def __init__(self, model: UniversalModel, device: torch.device):
        # Channels-last convolutions: on a CPU, 1.5-1.6 times as fast as the default layout (oneDNN).
        super().__init__(model.to(memory_format=torch.channels_last), device)

    def prepare(self, image: np.ndarray, spacing: tuple[float, float, float]) -> torch.Tensor:
        """Image features [z, channels, y, x] of every slice on the latent grid."""
        depth = image.shape[0]
        features = []
        for start in range(0, depth, SLICE_BATCH):
            slices = self.slices(image, np.arange(start, min(start + SLICE_BATCH, depth)), spacing)
            features.append(self.model.image_encoder(slices.to(self.device)))
        return torch.cat(features)

    def condition(self, text: TextEmbedding | None, index: int) -> torch.Tensor:
        if text is None:
            return self.model.embed_structure(torch.tensor([index], device=self.device))
        return self.model.embed_structure(text.pooled)

    def sample(self, prepared: torch.Tensor, condition: torch.Tensor, seed: int, steps: int, scheduler: str,
               on_step: StepCallback) -> np.ndarray:
        config, model = self.config, self.model
        scheduler = make_scheduler(scheduler, config.num_train_timesteps, config.prediction_type)
        latent_channels = config.latent_channels

        def predict(x, t):
            clean = model.denoise(x[:, :latent_channels], t, x[:, latent_channels:], condition)
            project = config.project_to_masks and t != scheduler.timesteps[-1]  # the last estimate is decoded as it is
            return model.project_to_mask(clean) if project else clean

        window = tuple(w // config.downsampling for w in config.window)
        latents = sample_slices(predict, prepared, latent_channels, window, scheduler, seed, steps, self.device, on_step)
        probability = torch.sigmoid(model.decode_mask(latents))[:, 0].float().cpu().numpy()
        return self.smoothed(probability)


def grown(model: UniversalModel, config: UniversalConfig) -> UniversalModel:
    """A model of ``config``, whose image encoder reads more of the scan than ``model``'s, holding its weights
    (``Family.grown``): the encoder's first convolution has zero weights on the new inputs, so it starts out
    computing exactly what ``model`` does."""
    inputs = torch.tensor(widened_inputs(model.config, config))
    return load_grown(UniversalModel(config), model, {"image_encoder.layers.0.0.weight": (1, inputs)})


def lora_targets(model: UniversalModel) -> list[str]:
    """The denoiser's linear and convolution layers, where the low-rank adapters go."""
    return [name for name, module in model.named_modules()
            if name.startswith("unet.") and isinstance(module, (nn.Linear, nn.Conv2d))]


def retrained_parameters(model: UniversalModel) -> list[str]:
    """Parameters retrained in full when adapting: the image encoder's, and those of every normalisation layer."""
    norms = set(normalisation_parameters(model))
    return [name for name, _ in model.named_parameters() if name.startswith("image_encoder.") or name in norms]


def card_text(config: UniversalConfig) -> list[str]:
    """How the model samples."""
    parts = [f"{config.default_steps} DDIM steps by default"]
    if config.project_to_masks:
        parts.append("between steps each clean-mask estimate goes through the mask autoencoder (`project_to_masks`)")
    return parts + config.sampling_card_text()
