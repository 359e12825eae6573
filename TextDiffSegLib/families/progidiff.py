"""ProGiDiff: prompt-guided diffusion steered by a ControlNet (Lin et al., papers/000).

A Stable-Diffusion-style latent diffusion model generates the *mask*; the scan is its condition. A mask
autoencoder (diffusers' ``AutoencoderKL``, SD's VAE) maps a binary mask, as a three-channel image in
[-1, 1], to a latent; the backbone, a ``UNet2DConditionModel``, denoises mask latents with cross-attention
on the prompt's token embeddings ("Segment the liver in this CT scan"). A ``ControlNetModel`` (a trainable
copy of the backbone's encoder) reads the scan slice through the paper's conditioning-image encoder: SD's
VAE encoder design with channels 16 -> 32 -> 64 -> 128 and 256 out (section 3.2), on the latent grid, which
enters the ControlNet through a zero convolution; the ControlNet's zero-convolution residuals are added to
the backbone's skip connections and middle block. At the start of its training the ControlNet changes
nothing: the backbone generates masks for the prompt alone.

Sampling is slice-wise as in the universal family: every slice's conditioning features once per scan, then
each proposal samples ``universal.SLICE_BATCH`` slices at a time in in-plane windows of the latent grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.controlnets.controlnet import zero_module
from torch import nn

from ..sampler import make_scheduler
from ..text_encoders import TextEmbedding
from .base import SliceWiseConfig, SliceWisePredictor, StepCallback, load_grown, normalisation_parameters, widened_inputs
from .progidiff_stable_diffusion import stable_diffusion_options
from .universal import SLICE_BATCH, sample_slices

MASK_CHANNELS = 3  # a mask enters the autoencoder as an RGB image (the paper's x0 in R^{H x W x 3}; SD's VAE layout)
# The prompt's token embeddings, their padding zeroed, are padded with zeros to this many tokens (CLIP's
# length, which the text encoder truncates to), in training and sampling alike: the ControlNet's
# cross-attention cannot mask padding (diffusers' ControlNetModel takes no encoder attention mask), so
# every prompt must reach it with the same number of tokens, as Stable Diffusion always sees 77.
PROMPT_TOKENS = 77
CONDITIONING_LAYERS = 2  # residual blocks per level of the conditioning-image encoder, as in SD's VAE encoder
CONDITIONING_GROUPS = 8  # its group norms (SD's 32 do not divide its 16-channel first level)
# Clean-latent estimates are clamped to this many standard deviations at every sampling step: under
# epsilon-prediction the noisiest steps divide them by sqrt(alpha_bar), about 0.07.
LATENT_CLAMP = 5.0


@dataclasses.dataclass
class ProGiDiffConfig(SliceWiseConfig):
    """Tiny-but-real defaults, to train on a 2-core CPU: 5.4 M parameters, 11 MB in fp16 (SD 1.x: about 1,000 M).

    The latent grid is 8 times coarser than the model grid, as SD's (four autoencoder levels): on the 2.5 mm
    grid a 192 x 192 window is 24 x 24 latents, so that a denoising step of backbone and ControlNet costs
    0.7 GFLOP a slice, and a proposal of an 80-slice scan in 10 steps about 0.5 TFLOP. The autoencoder's
    full-resolution level is 8 channels wide: decoding a proposal is the other large cost of sampling (1.6
    GFLOP a slice; 4.4 at 16 channels). The conditioning-image encoder is the paper's at full width (1.7 M
    parameters, 3.7 GFLOP a slice, once per scan when sampling; most of a training step's cost). A Stable
    Diffusion 1.x folder (``stable_diffusion``) replaces the backbone's, autoencoder's and text encoder's
    settings with its own.
    """

    family: str = "progidiff"
    # SD's objective (the paper trains "identical to SD"), and what SD 1.x weights predict.
    prediction_type: str = "epsilon"
    default_steps: int = 10
    # The mask autoencoder: widths of its levels (the latent grid is 2 ** (levels - 1) times coarser), residual
    # blocks per level, latent channels.
    autoencoder_channels: tuple[int, ...] = (8, 16, 32, 64)
    autoencoder_layers: int = 1
    latent_channels: int = 4
    latent_scale: float = 1.0  # multiplies mask latents so that they have unit variance (measured in training)
    # The backbone (and the ControlNet, its copy): widths per level, residual blocks per level, whether a level
    # cross-attends the prompt (SD 1.x: all but the coarsest), attention heads, group-norm groups.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers: int = 1
    cross_attention: tuple[bool, ...] = (True, True, True)
    attention_heads: int = 4
    norm_groups: int = 8
    # The conditioning-image encoder: the widths of its levels, then its output width (section 3.2). It has
    # as many levels as the mask autoencoder, so that its features lie on the latent grid.
    conditioning_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    # True: the paper's recipe, the backbone pretrained as a text-conditioned mask generator (--steps steps),
    # then frozen while the ControlNet learns (--steps steps). False: backbone and ControlNet trained together
    # from scratch in one stage of twice --steps, the same budget (the paper's "from scratch" comparison).
    pretrain_backbone: bool = True
    # A Stable Diffusion 1.x folder (unet/, vae/, text_encoder/, tokenizer/) whose weights a new model starts
    # from; see progidiff_stable_diffusion.
    stable_diffusion: str = ""

    def problems(self) -> list[str]:
        found = super().problems()
        if self.conditioning != "text":
            found.append("conditioning must be 'text': ProGiDiff is steered by prompts")
        widths = {"autoencoder_channels": self.autoencoder_channels, "unet_channels": self.unet_channels}
        for field, value in widths.items():
            if not value or any(c % self.norm_groups for c in value):
                found.append(f"{field} must be widths that are multiples of norm_groups ({self.norm_groups}), not {value}")
        if any(c % self.attention_heads for c in self.unet_channels):
            found.append(f"unet_channels must be multiples of attention_heads ({self.attention_heads})")
        if len(self.cross_attention) != len(self.unet_channels):
            found.append("cross_attention must say for each level of unet_channels whether it attends the prompt")
        if (len(self.conditioning_channels) != len(self.autoencoder_channels) + 1
                or any(c % CONDITIONING_GROUPS for c in self.conditioning_channels)):
            found.append(f"conditioning_channels must be one width per autoencoder level and an output width, each a "
                         f"multiple of {CONDITIONING_GROUPS}, not {self.conditioning_channels}")
        if min(self.autoencoder_layers, self.unet_layers) < 1:
            found.append("autoencoder_layers and unet_layers must be at least 1")
        return found

    @classmethod
    def from_options(cls, values: dict) -> "ProGiDiffConfig":
        """With ``stable_diffusion``, the backbone's, autoencoder's and text encoder's settings are that folder's."""
        if values.get("stable_diffusion"):
            values = {**values, **stable_diffusion_options(values["stable_diffusion"], values)}
        return cls(**values)

    @property
    def downsampling(self) -> int:
        """How much coarser the latent grid is than the model grid."""
        return 2 ** (len(self.autoencoder_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """In-plane sizes (model-grid voxels) the model accepts: the latent downsampling times the U-Net's."""
        return self.downsampling * 2 ** (len(self.unet_channels) - 1)


def prompt_tokens(text: TextEmbedding) -> torch.Tensor:
    """The cross-attention input of prompts: their token embeddings [B, PROMPT_TOKENS, E], padding zeroed."""
    tokens = text.tokens * text.mask[..., None].to(text.tokens.dtype)
    return F.pad(tokens, (0, 0, 0, PROMPT_TOKENS - tokens.shape[1]))


class ProGiDiffModel(nn.Module):
    """Mask autoencoder, text-conditioned backbone, conditioning-image encoder and ControlNet."""

    def __init__(self, config: ProGiDiffConfig):
        super().__init__()
        self.config = config
        levels = len(config.autoencoder_channels)
        self.mask_autoencoder = AutoencoderKL(
            in_channels=MASK_CHANNELS, out_channels=MASK_CHANNELS, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=config.autoencoder_channels,
            layers_per_block=config.autoencoder_layers, latent_channels=config.latent_channels,
            norm_num_groups=config.norm_groups,
        )
        # diffusers' attention_head_dim of this class is the number of heads (its documented naming slip).
        self.unet = UNet2DConditionModel(
            in_channels=config.latent_channels, out_channels=config.latent_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention)),
            block_out_channels=config.unet_channels, layers_per_block=config.unet_layers,
            norm_num_groups=config.norm_groups, cross_attention_dim=config.text_embed_dim,
            attention_head_dim=config.attention_heads,
        )
        *widths, features = config.conditioning_channels
        self.conditioning_encoder = Encoder(
            in_channels=config.image_in_channels, out_channels=features,
            down_block_types=("DownEncoderBlock2D",) * len(widths), block_out_channels=tuple(widths),
            layers_per_block=CONDITIONING_LAYERS, norm_num_groups=CONDITIONING_GROUPS, double_z=False,
        )
        self.controlnet = ControlNetModel.from_unet(self.unet)
        # The conditioning features enter the ControlNet through a zero convolution (its own shallow image encoder
        # is replaced by the one above, which runs once per scan when sampling).
        self.controlnet.controlnet_cond_embedding = zero_module(nn.Conv2d(features, config.unet_channels[0], 1))

    def mask_posterior(self, mask: torch.Tensor):
        """The autoencoder's distribution of (unscaled) latents of binary masks [B, 1, H, W], each entering as an
        image in [-1, 1]."""
        return self.mask_autoencoder.encode((mask * 2 - 1).expand(-1, MASK_CHANNELS, -1, -1)).latent_dist

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Binary masks [B, 1, H, W] to scaled latents (the posterior's mode) on the latent grid."""
        return self.mask_posterior(mask).mode() * self.config.latent_scale

    def decode_mask(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents to mask logits [B, 1, H, W] (the decoded image's mean over its three channels)."""
        return self.mask_autoencoder.decode(latent / self.config.latent_scale).sample.mean(1, keepdim=True)

    def start_controlnet_from_backbone(self) -> None:
        """Make the ControlNet's trunk a copy of the backbone's encoder, as ``ControlNetModel.from_unet`` does; its
        zero convolutions stay as they are."""
        for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(self.controlnet, part).load_state_dict(getattr(self.unet, part).state_dict())

    def denoise(self, noisy_latent: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's prediction for the prompt ``tokens`` (``prompt_tokens``); with ``image_features`` (of the
        conditioning encoder, on the latent grid) steered by the ControlNet's residuals."""
        tokens = tokens.expand(noisy_latent.shape[0], -1, -1)
        residuals = {}
        if image_features is not None:
            down, middle = self.controlnet(noisy_latent, timestep, tokens, image_features, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": middle}
        return self.unet(noisy_latent, timestep, tokens, **residuals).sample


class ProGiDiffPredictor(SliceWisePredictor):
    """Slice-wise sampling: each slice's conditioning features once per scan; each proposal samples the mask
    latents of ``SLICE_BATCH`` slices at a time, in in-plane windows of the latent grid, and decodes them."""

    @torch.no_grad()
    def prepare(self, image: np.ndarray, spacing: tuple[float, float, float]) -> torch.Tensor:
        """Conditioning features [z, F, y/d, x/d] of every slice (d: ``config.downsampling``)."""
        features = []
        for start in range(0, image.shape[0], SLICE_BATCH):
            slices = self.slices(image, np.arange(start, min(start + SLICE_BATCH, image.shape[0])), spacing)
            features.append(self.model.conditioning_encoder(slices.to(self.device)))
        return torch.cat(features)

    @torch.no_grad()
    def condition(self, text: TextEmbedding | None, index: int) -> torch.Tensor:
        return prompt_tokens(text).to(self.device)

    @torch.no_grad()
    def sample(self, prepared: torch.Tensor, condition: torch.Tensor, seed: int, steps: int, scheduler: str,
               on_step: StepCallback) -> np.ndarray:
        config, model = self.config, self.model
        scheduler = make_scheduler(scheduler, config.num_train_timesteps, config.prediction_type, LATENT_CLAMP)
        channels = config.latent_channels

        def predict(x, t):
            return model.denoise(x[:, :channels], t, condition, x[:, channels:])

        window = tuple(w // config.downsampling for w in config.window)
        latents = sample_slices(predict, prepared, channels, window, scheduler, seed, steps, self.device, on_step)
        return self.smoothed(torch.sigmoid(model.decode_mask(latents))[:, 0].float().cpu().numpy())


def grown(model: ProGiDiffModel, config: ProGiDiffConfig) -> ProGiDiffModel:
    """A model of ``config``, whose conditioning-image encoder reads more of the scan than ``model``'s, holding its
    weights (``Family.grown``): the encoder's first convolution has zero weights on the new inputs, so it starts
    out steering exactly as ``model`` does."""
    inputs = torch.tensor(widened_inputs(model.config, config))
    return load_grown(ProGiDiffModel(config), model, {"conditioning_encoder.conv_in.weight": (1, inputs)})


def lora_targets(model: ProGiDiffModel) -> list[str]:
    """Every linear layer of the ControlNet (section 3.3)."""
    return [name for name, module in model.named_modules()
            if name.startswith("controlnet.") and isinstance(module, nn.Linear)]


ZERO_CONVOLUTIONS = ("controlnet.controlnet_cond_embedding.", "controlnet.controlnet_down_blocks.",
                     "controlnet.controlnet_mid_block.")


def retrained_parameters(model: ProGiDiffModel) -> list[str]:
    """Retrained in full when adapting (section 3.3): the conditioning-image encoder, and the ControlNet's
    normalisation layers and zero convolutions. The backbone and the mask autoencoder stay frozen."""
    norms = {name for name in normalisation_parameters(model) if name.startswith("controlnet.")}
    return [name for name, _ in model.named_parameters()
            if name.startswith(("conditioning_encoder.", *ZERO_CONVOLUTIONS)) or name in norms]


def card_text(config: ProGiDiffConfig) -> list[str]:
    return [f"{config.default_steps} DDIM steps by default, slice by slice: the backbone generates the prompt's mask, "
            "steered by a ControlNet reading the slice", *config.inputs_card_text("its conditioning-image encoder"),
            *config.sampling_card_text()]
