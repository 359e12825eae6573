"""TextDiffSeg: text-guided latent diffusion for 3D segmentation (Ma, papers/003).

The only family that sees the volume whole. A 3D image encoder maps a window of the scan to features on
a grid four times coarser along each axis, with self-attention on that grid; a 3D cross-modal attention
lets every voxel's features query the prompt's text tokens and adds what it reads (eq. 2); a 3D label
encoder maps a mask to a small latent on the same grid, standardised to zero mean and unit variance by a
final normalisation, and a label decoder maps a latent back to mask logits. The denoiser, a 3D residual
U-Net with time embedding and self-attention (MONAI's ``DiffusionModelUNet``), predicts the clean label
latent (by default; or, as in the paper, the noise added to it, eq. 3) from the noisy latent concatenated
with the cross-modal embedding.

Sampling runs DDIM (10 steps by default) over the whole volume with one noise field per proposal:
every step denoises 3D sliding windows of the latent, blended (MONAI), so neighbouring slices are
sampled together rather than each from its own noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ..config import ModelConfig
from ..preprocessing import lateral_position
from ..sampler import make_scheduler, sample, windowed
from ..text_encoders import TextEmbedding
from .base import Predictor, StepCallback, normalisation_parameters

DOWNSAMPLING = 4  # the latent grid is four times coarser than the model grid along each axis
WINDOW_BATCH = 2  # 3D windows evaluated together: more gains no speed on a CPU and costs memory
#: Clean-latent estimates are clamped to this many standard deviations, in training's decoded-mask loss and
#: at every sampling step: under epsilon-prediction the noisiest steps divide them by sqrt(alpha_bar) ~ 0.07.
LATENT_CLAMP = 5.0


@dataclasses.dataclass
class TextDiffSeg3DConfig(ModelConfig):
    family: str = "textdiffseg3d"
    # The universal family's grid (2.5 x 2.5 x 5 mm), so that proposals of both can be fused voxel for voxel.
    # A window of 48 x 128 x 128 voxels (240 x 320 x 320 mm) holds any abdominal organ whole, and a BTCV scan
    # in 2 x 2 x 2 windows or fewer: larger windows overlap less, and a sampling step costs a CPU a quarter
    # less than with 32 x 96 x 96 windows (0.71 against 0.96 s; benchmarks/results/textdiffseg3d_sizes.json).
    window: tuple[int, ...] = (48, 128, 128)
    # The clean latent, not the noise of eq. 5 ("epsilon", still selectable): trained 600 steps on this CPU,
    # a noise-predicting model's first DDIM step (at t = 999, where the clean-latent estimate divides by
    # sqrt(alpha_bar) = 0.068) found 0.15 Dice of a liver patch, and its samples 0.01-0.05.
    prediction_type: str = "sample"
    default_steps: int = 10
    latent_channels: int = 4
    label_channels: tuple[int, int, int] = (8, 16, 32)
    image_channels: tuple[int, int, int] = (16, 32, 64)
    image_feature_channels: int = 32
    attention_heads: int = 4
    # Attention on the U-Net's coarsest grid alone (at the next level too, a step at this window
    # costs a CPU more than twice as much):
    # 5 proposals of an organ take 10 steps each, which must fit in a minute on a 2-core CPU.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (False, False, True)
    # One more input channel for the image encoder: each voxel's left-right position in the body
    # (preprocessing.lateral_position), what let the universal model tell the spleen from the liver.
    lateral_position: bool = False
    # The prompt read by the denoiser too: its pooled embedding added to the U-Net's time embedding, so that every
    # residual block is conditioned on it, as the universal family's U-Net reads it. Without it (the paper's
    # design) the prompt reaches the denoiser only through the voxels' reading of its tokens (eq. 2).
    prompt_in_denoiser: bool = False

    def problems(self) -> list[str]:
        found = super().problems()
        for field in ("label_channels", "image_channels"):
            if len(getattr(self, field)) != 3 or min(getattr(self, field)) < 1:
                found.append(f"{field} must be three positive widths, not {getattr(self, field)}")
        if len(self.unet_channels) != len(self.unet_attention) or min(self.unet_channels, default=0) < 8:
            found.append("unet_channels and unet_attention must have one entry per level, each width 8 or more")
        if any(c % 8 for c in (*self.unet_channels, *self.image_channels[1:], self.image_feature_channels)):
            found.append("unet_channels, image_channels (but the first) and image_feature_channels must be "
                         "multiples of 8 (group norm)")
        if self.image_feature_channels % self.attention_heads:
            found.append(f"image_feature_channels must be a multiple of attention_heads ({self.attention_heads})")
        if len(self.window) != 3 or any(w % self.size_multiple for w in self.window):
            found.append(f"window must be three sizes (z, y, x), multiples of {self.size_multiple}, not {self.window}")
        return found

    @property
    def size_multiple(self) -> int:
        """What each side of a window must be a multiple of: the latent downsampling times the U-Net's (and at
        least 8, the image encoder's attention grid)."""
        return max(2 * DOWNSAMPLING, DOWNSAMPLING * 2 ** (len(self.unet_channels) - 1))


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.SiLU())


def _up(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv(in_channels, out_channels))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _SelfAttention(nn.Module):
    """Self-attention over every voxel of a feature volume, added back (pre-norm)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + attended.transpose(1, 2).reshape(x.shape)


class ImageEncoder3D(nn.Module):
    """A scan window [B, C, D, H, W] (the scan, and its lateral position where the config asks) to features
    [B, F, D/4, H/4, W/4].

    Attention sits in the last down-sampling stage (the paper's last two): two self-attention blocks on a grid
    eight times coarser (a 48 x 128 x 128 window gives 6 x 16 x 16 = 1,536 tokens), whose output is
    upsampled and added to the features on the latent grid. One stage finer, a window would give 12,288
    tokens: 64 times the attention's cost, most of a CPU's time for a scan.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int, int], out_channels: int, heads: int):
        super().__init__()
        c0, c1, c2 = channels
        self.local = nn.Sequential(_conv(in_channels, c0), _conv(c0, c1, stride=2), _ResidualBlock(c1),
                                   _conv(c1, c2, stride=2), _ResidualBlock(c2))
        self.project = nn.Conv3d(c2, out_channels, 1)
        self.context = nn.Sequential(_conv(c2, out_channels, stride=2), _SelfAttention(out_channels, heads),
                                     _SelfAttention(out_channels, heads), nn.Upsample(scale_factor=2, mode="nearest"))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        local = self.local(image)
        return self.project(local) + self.context(local)


class CrossModalAttention3D(nn.Module):
    """Eq. 2: voxel features [B, F, d, h, w] as queries, text tokens [B, T, E] as keys and values, the result
    added back to the features. Padding tokens are masked out."""

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.attention = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = self.norm(features).flatten(2).transpose(1, 2)
        read, _ = self.attention(queries, tokens, tokens, key_padding_mask=mask == 0, need_weights=False)
        return features + read.transpose(1, 2).reshape(features.shape)


class _LatentStandardisation(nn.BatchNorm3d):
    """Latents standardised by the running mean and variance of the training masks' latents (no learnt scale), in
    training too: a training step updates them from its batch, then standardises with them. With the batch's own
    statistics, as batch normalisation trains, a mask's latent would depend on the other masks of its batch (in the
    models trained so, a kidney patch's by 0.3-0.6 of a standard deviation on average when its batch partner is a
    liver patch), a target the denoiser cannot know."""

    def __init__(self, channels: int):
        super().__init__(channels, affine=False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                super().forward(latent)
        return F.batch_norm(latent, self.running_mean, self.running_var, training=False, eps=self.eps)


class LabelAutoencoder3D(nn.Module):
    """A mask [B, 1, D, H, W] to a latent [B, k, D/4, H/4, W/4] and back to mask logits. The encoder ends in a
    standardisation by the training masks' running statistics: their latents come out zero-mean and
    unit-variance, as the noise they are mixed with."""

    def __init__(self, channels: tuple[int, int, int], latent_channels: int):
        super().__init__()
        c0, c1, c2 = channels
        self.encoder = nn.Sequential(
            _conv(1, c0), _conv(c0, c1, stride=2), _conv(c1, c2, stride=2), nn.Conv3d(c2, latent_channels, 1),
            _LatentStandardisation(latent_channels),
        )
        self.decoder = nn.Sequential(
            _conv(latent_channels, c2), _up(c2, c1), _up(c1, c0), nn.Conv3d(c0, 1, 3, padding=1),
        )

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(mask)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


class TextDiffSeg3DModel(nn.Module):
    """Image encoder, cross-modal attention, label autoencoder and the denoising 3D U-Net."""

    def __init__(self, config: TextDiffSeg3DConfig):
        super().__init__()
        self.config = config
        features = config.image_feature_channels
        self.image_encoder = ImageEncoder3D(1 + int(config.lateral_position), config.image_channels, features,
                                            config.attention_heads)
        # A model with a learnt embedding per structure reads it as a one-token "text".
        self.structure_tokens = (None if config.conditioning == "text"
                                 else nn.Embedding(len(config.structures), config.text_embed_dim))
        self.cross_attention = CrossModalAttention3D(features, config.text_embed_dim, config.attention_heads)
        self.label_autoencoder = LabelAutoencoder3D(config.label_channels, config.latent_channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=config.latent_channels + features, out_channels=config.latent_channels,
            num_res_blocks=1, channels=config.unet_channels, attention_levels=config.unet_attention,
            norm_num_groups=8, num_head_channels=config.unet_channels[-1] // 2,
            num_class_embeds=1 if config.prompt_in_denoiser else None,
        )
        if config.prompt_in_denoiser:
            # MONAI adds its class embedding to the time embedding: in its place, an MLP of the pooled prompt (what
            # diffusers' class_embed_type="identity" takes for the universal family).
            width = config.unet_channels[0] * 4
            self.unet.class_embedding = nn.Sequential(nn.Linear(config.text_embed_dim, width), nn.SiLU(),
                                                      nn.Linear(width, width))

    def text_of(self, text: TextEmbedding | None, indices: torch.Tensor) -> TextEmbedding:
        """What conditions structures ``indices``: the prompts' embeddings, or the learnt ones as one-token texts."""
        if text is None:
            learnt = self.structure_tokens(indices)
            return TextEmbedding(learnt[:, None], torch.ones(len(learnt), 1, device=learnt.device), learnt)
        return TextEmbedding(text.tokens[indices], text.mask[indices], text.pooled[indices])

    def cross_modal(self, image_features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.cross_attention(image_features, tokens, mask)

    def denoise(self, noisy_latent: torch.Tensor, timestep: torch.Tensor, embedding: torch.Tensor,
                prompt: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction (``config.prediction_type``: clean latent or noise), from the noisy label latent and the
        cross-modal embedding (concatenated), and the pooled prompt [B or 1, E] where the config sets
        ``prompt_in_denoiser``."""
        batch = noisy_latent.shape[0]
        timesteps = timestep.expand(batch) if timestep.dim() else timestep.repeat(batch)
        read = prompt.expand(batch, -1) if self.config.prompt_in_denoiser else None
        return self.unet(torch.cat([noisy_latent, embedding], dim=1), timesteps, class_labels=read)


class TextDiffSeg3DPredictor(Predictor):
    """3D sampling: the scan's features in 3D sliding windows once per scan, the cross-modal embedding once
    per structure, and for each proposal one noise field over the whole latent volume, denoised window by
    window at every step and decoded whole."""

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """A scan smaller than a window along an axis goes through whole there: its latent must suit the U-Net."""
        return (self.config.size_multiple,) * 3

    @torch.no_grad()
    def prepare(self, image: np.ndarray, spacing: tuple[float, float, float]) -> torch.Tensor:
        """Image features [1, F, z/4, y/4, x/4] (``image`` is padded to multiples of 4 along each axis), of the scan
        and, where the config asks, each voxel's lateral position (measured on whole slices, as in training)."""
        channels = [image, lateral_position(image, spacing[0])] if self.config.lateral_position else [image]
        volume = torch.from_numpy(np.stack(channels).astype(np.float32))[None].to(self.device)
        # MONAI blends windows whose output is 4 times smaller; a scan smaller than a window goes through whole.
        return windowed(self.model.image_encoder, volume, self.config.window, batch_size=WINDOW_BATCH)

    @torch.no_grad()
    def condition(self, text: TextEmbedding | None, index: int) -> TextEmbedding:
        return self.model.text_of(text, torch.tensor([0 if text is not None else index], device=self.device))

    @torch.no_grad()
    def sample(self, prepared: torch.Tensor, condition: TextEmbedding, seed: int, steps: int,
               scheduler: str, on_step: StepCallback) -> np.ndarray:
        config, model = self.config, self.model
        embedding = model.cross_modal(prepared, condition.tokens, condition.mask)
        scheduler = make_scheduler(scheduler, config.num_train_timesteps, config.prediction_type, LATENT_CLAMP)
        window = tuple(w // DOWNSAMPLING for w in config.window)
        channels = config.latent_channels

        def denoise(noisy, t):
            return windowed(lambda x: model.denoise(x[:, :channels], t, x[:, channels:], condition.pooled),
                            torch.cat([noisy, embedding], dim=1), window, batch_size=WINDOW_BATCH)

        shape = (1, channels, *prepared.shape[2:])
        latent = sample(denoise, scheduler, shape, steps, torch.Generator().manual_seed(seed), self.device, on_step)
        logits = model.label_autoencoder.decode(latent)
        return torch.sigmoid(logits)[0, 0].float().cpu().numpy()


def lora_targets(model: TextDiffSeg3DModel) -> list[str]:
    """The denoiser's and the cross-modal attention's linear and convolution layers."""
    return [name for name, module in model.named_modules()
            if name.startswith(("unet.", "cross_attention.")) and isinstance(module, (nn.Linear, nn.Conv3d))]


def retrained_parameters(model: TextDiffSeg3DModel) -> list[str]:
    """Retrained in full when adapting: the image encoder (a new modality looks different) and every normalisation."""
    norms = set(normalisation_parameters(model))
    return [name for name, _ in model.named_parameters() if name.startswith("image_encoder.") or name in norms]


def card_text(config: TextDiffSeg3DConfig) -> list[str]:
    return [f"{config.default_steps} DDIM steps by default over the whole volume, one noise field per proposal",
            f"3D sliding windows of {' x '.join(map(str, config.window))} voxels (z, y, x) of the model grid, "
            "blended at every step",
            *(["the image encoder reads each voxel's left-right position in the body beside the scan "
               "(`lateral_position`)"] if config.lateral_position else []),
            *(["the denoiser reads the prompt's pooled embedding beside the time step (`prompt_in_denoiser`)"]
              if config.prompt_in_denoiser else [])]
