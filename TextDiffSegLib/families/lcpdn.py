"""LCPDN: a lightweight cross-text-vision prompting diffusion network (papers/001).

A diffusion U-Net is a *feature extractor* here, not a generator (the paper after Baranchuk et al.): the
**image** is noised (the paper's N_img; the mask is never noised), the U-Net reads it at a few fixed
timesteps (the paper's t = 50, 150, 250) and the outputs of its decoder blocks are the multi-scale features.
A pixel-wise classifier turns them into the mask of the structure the prompt names.

- CPRFL (section 3.3): the prompt's token embeddings (``TextEmbedding.tokens``) attend the image's patch
  tokens (eq. 1: Q from the text, K and V from the image), ``tanh(Z) * QW^Q`` (eq. 2), the mean over the
  prompt's tokens (eq. 3), projected (eq. 4) and added to the U-Net's timestep embedding (eq. 5; diffusers'
  ``class_embed_type="identity"``). The patch tokens come from a CLIP vision model in a local folder
  (``clip_vision``, frozen as in the paper) or, by default, from a small patch encoder trained here. The
  U-Net's blocks cross-attend the prompt's tokens (section 3.2).
- LTFR (section 3.4), at each decoder scale: the prompt's tokens, projected to the scale's width, replicated
  or truncated to one per pixel, concatenated with the pixel's features (eq. 7), an MLP (eq. 8), a sigmoid gate
  lambda mixing that with the visual features (eq. 9), times the visual features (eq. 10); every scale upsampled
  (bilinear) to the input's size and concatenated (eq. 11), then a pixel-wise classifier (1 x 1 convolutions).
- The paper's Table 2 ablations are config options: ``cprfl=False`` (no image encoder and no prompt in the
  timestep embedding; the U-Net still cross-attends the prompt) and ``fusion="cross_attention"`` (each scale's
  pixels attend the prompt's tokens, with a residual connection, instead of LTFR).

With ``context_slices`` the U-Net reads each slice with that many neighbours each side, all noised (each with
its own noise) and all denoised, and with ``lateral_position`` each pixel's left-right distance from the middle of the
body, unnoised (``preprocessing.slice_stacks``, as the universal family's image encoder reads them); the patch encoder
reads the same channels clean, a CLIP vision model the slice alone. The paper reads one slice: these are for the
pancreas and stomach, which one slice shows poorly, and for telling left from right. ``grown`` turns a trained model
into one that reads more of them, starting out exactly as it was.

On this CPU the U-Net reads each slice folded ``stem`` x ``stem`` pixels into channels (a space-to-depth stem,
``F.pixel_unshuffle``; its noise prediction unfolded back): at ``stem=2`` its finest level runs on 5 mm pixels of
the 2.5 mm slice, which costs a quarter of the pixel-space U-Net; the features are upsampled to the slice for the
classifier as every coarser scale is. ``stem=1`` is the paper's pixel-space U-Net.

The paper does not say how its timesteps combine; here the classifier is shared by all timesteps and its
logits are averaged over those read, with one noise field for all of them (the paper's "shared noise"). So
``steps``, when sampling, is **how many timesteps are read**: spread evenly over ``timestep_range`` (3 by
default: 50, 150, 250). A proposal's seed draws that noise: proposals differ by the noise the image is read
through. Sampling is slice by slice, ``universal.SLICE_BATCH`` slices at a time, in in-plane windows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from ..errors import ModelError
from ..sampler import make_scheduler, windowed
from ..text_encoders import TextEmbedding
from .base import SliceWiseConfig, SliceWisePredictor, StepCallback, load_grown, normalisation_parameters, widened_inputs
from .universal import SLICE_BATCH

FUSIONS = ("ltfr", "cross_attention")
PATCH_SIZE = 16  # the default patch encoder's patches: two 4 x 4 strided convolutions


@dataclasses.dataclass
class LCPDNConfig(SliceWiseConfig):
    """Tiny-but-real defaults, to train on a 2-core CPU: 2.1 M parameters, 4.2 MB in fp16 (the paper's: 4.52 M).

    The U-Net's finest level is narrow (16 channels) and only its two coarsest levels attend (self- and
    cross-attention over 24 x 24 and 12 x 12 tokens of a 192 x 192 window with the stem of 2). Of the parameters,
    the U-Net has 1.9 M, the fusions 0.1 M.
    """

    family: str = "lcpdn"
    prediction_type: str = "epsilon"  # the U-Net is first trained as a DDPM on the images (the paper's pretrained one)
    default_steps: int = 3  # timesteps read (the paper's 50, 150, 250)
    timestep_range: tuple[int, int] = (50, 250)  # the first and last timestep read
    # The diffusion U-Net: widths per level, residual blocks per level, whether a level attends (self- and
    # cross-attention on the prompt's tokens), attention heads, group-norm groups.
    stem: int = 2  # the U-Net reads slices folded stem x stem pixels into channels (1: the pixel-space U-Net)
    unet_channels: tuple[int, ...] = (16, 32, 64, 64)
    unet_layers: int = 1
    cross_attention: tuple[bool, ...] = (False, False, True, True)
    attention_heads: int = 4
    norm_groups: int = 8
    # CPRFL: with it, the image's patch tokens (from ``clip_vision``, a CLIP vision model's folder, or else
    # the patch encoder of these widths) and the prompt's width D (W^Q, W^K, W^V).
    cprfl: bool = True
    clip_vision: str = ""
    encoder_channels: tuple[int, int] = (32, 64)
    prompt_dim: int = 64
    fusion: str = "ltfr"  # or "cross_attention" (the paper's Table 2 ablation)
    classifier_channels: int = 64

    def problems(self) -> list[str]:
        found = super().problems()
        if self.conditioning != "text":
            found.append("conditioning must be 'text': LCPDN reads the prompt's token embeddings")
        if any(c % self.norm_groups or c % self.attention_heads for c in self.unet_channels):
            found.append(f"unet_channels must be multiples of norm_groups ({self.norm_groups}) and attention_heads "
                         f"({self.attention_heads}), not {self.unet_channels}")
        if len(self.cross_attention) != len(self.unet_channels):
            found.append("cross_attention must say for each level of unet_channels whether it attends the prompt")
        low, high = self.timestep_range if len(self.timestep_range) == 2 else (-1, -1)
        if not 0 <= low <= high < self.num_train_timesteps:
            found.append(f"timestep_range must be a first and last timestep, 0 <= first <= last < "
                         f"{self.num_train_timesteps}, not {self.timestep_range}")
        if self.fusion not in FUSIONS:
            found.append(f"fusion must be one of {', '.join(FUSIONS)}, not {self.fusion!r}")
        if len(self.encoder_channels) != 2 or min(self.encoder_channels) < 1:
            found.append(f"encoder_channels must be two positive widths, not {self.encoder_channels}")
        if min(self.stem, self.unet_layers, self.prompt_dim, self.classifier_channels) < 1:
            found.append("stem, unet_layers, prompt_dim and classifier_channels must be at least 1")
        return found

    @property
    def size_multiple(self) -> int:
        """In-plane sizes (model-grid voxels) the stem and the U-Net accept."""
        return self.stem * 2 ** (len(self.unet_channels) - 1)

    def timesteps(self, count: int) -> torch.Tensor:
        """The ``count`` timesteps read, spread evenly over ``timestep_range``."""
        return torch.linspace(*self.timestep_range, count).round().long()


class PatchEncoder(nn.Module):
    """Slices [B, in_channels, H, W] to patch tokens [B, M, D] (16 x 16-pixel patches), trained here."""

    def __init__(self, in_channels: int, channels: tuple[int, int], norm_groups: int):
        super().__init__()
        self.width = channels[1]
        self.layers = nn.Sequential(nn.Conv2d(in_channels, channels[0], 4, stride=4),
                                    nn.GroupNorm(norm_groups, channels[0]), nn.GELU(),
                                    nn.Conv2d(channels[0], channels[1], 4, stride=4))

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.layers(slices).flatten(2).transpose(1, 2)


class CLIPPatchEncoder(nn.Module):
    """A frozen CLIP vision model from a local folder (saved with ``save_pretrained``): slices to its tokens
    (the class token and the patches' [B, 1 + M, D]), each slice (channel ``centre`` of the input) resized to its
    image size as three channels."""

    def __init__(self, folder: str, centre: int = 0):
        super().__init__()
        self.centre = centre
        from transformers import CLIPVisionModel
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if not (Path(folder).expanduser() / "config.json").is_file():
            raise ModelError(f"clip_vision folder {folder} has no config.json: give a CLIP vision model's folder saved "
                             "with save_pretrained, or leave clip_vision empty for the patch encoder trained here")
        self.clip = CLIPVisionModel.from_pretrained(Path(folder).expanduser(), local_files_only=True)
        self.clip.requires_grad_(False)
        self.width = self.clip.config.hidden_size
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        size = self.clip.config.image_size
        slices = slices[:, self.centre:self.centre + 1]
        pixels = F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        return self.clip(pixel_values=(pixels - self.mean) / self.std).last_hidden_state


def real_token_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``tokens`` [B, N, D] over each prompt's real tokens (``mask`` [B, N])."""
    weights = mask[..., None].to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


class CPRFLPrompt(nn.Module):
    """The text-vision-alignment prompt block (eqs. 1-4): the prompt's tokens attend the image's patch tokens;
    the result, projected to the U-Net's timestep-embedding width, is added to its timestep embedding (eq. 5)."""

    def __init__(self, text_dim: int, visual_dim: int, dim: int, embedding_dim: int):
        super().__init__()
        self.query = nn.Linear(text_dim, dim, bias=False)  # W^Q
        self.key = nn.Linear(visual_dim, dim, bias=False)  # W^K
        self.value = nn.Linear(visual_dim, dim, bias=False)  # W^V
        self.to_timestep_embedding = nn.Linear(dim, embedding_dim)  # W_t, b_t (eq. 4)

    def forward(self, text: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``text`` [B, N, E] (``mask`` [B, N]) and ``visual`` [B, M, V] to TextProj(E) [B, embedding_dim]."""
        query = self.query(text)
        attended = F.scaled_dot_product_attention(query, self.key(visual), self.value(visual))  # Z (eq. 1)
        fused = torch.tanh(attended) * query  # Q* (eq. 2)
        return self.to_timestep_embedding(real_token_mean(fused, mask))  # E (eq. 3), projected (eq. 4)


def replicated_tokens(tokens: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """Each prompt's real tokens [B, N, C] replicated in turn, or truncated, to ``count`` tokens [B, count, C]
    (section 3.4's alignment); padding is never used, so a prompt gives the same alone and in a batch."""
    lengths = mask.sum(1).clamp(min=1).long()
    index = torch.arange(count, device=tokens.device)[None] % lengths[:, None]
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def pixel_tokens(features: torch.Tensor) -> torch.Tensor:
    """Feature maps [B, C, H, W] as one token per pixel [B, H * W, C]."""
    return features.flatten(2).transpose(1, 2)


def feature_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pixel tokens [B, H * W, C] back to feature maps shaped as ``like``."""
    return tokens.transpose(1, 2).reshape(like.shape)


class LTFR(nn.Module):
    """The lightweight text-vision fusion representation at one scale (eqs. 7-10)."""

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        self.align_text = nn.Linear(text_dim, channels)
        self.mlp = nn.Sequential(nn.Linear(2 * channels, channels), nn.GELU(), nn.Linear(channels, channels))
        self.gate = nn.Linear(2 * channels, 1)  # lambda, one per position

    def mix(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F*_fuse and lambda for pixel tokens ``visual`` [B, M, C] and aligned text tokens [B, M, C] (eqs. 7-9)."""
        joined = torch.cat([visual, text], -1)
        weight = torch.sigmoid(self.gate(joined))
        return weight * self.mlp(joined) + (1 - weight) * visual, weight

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visual = pixel_tokens(features)
        text = replicated_tokens(self.align_text(tokens), mask, visual.shape[1])
        mixed, _ = self.mix(visual, text)
        return feature_map(mixed * visual, features)  # H_fuse (eq. 10)


class CrossAttentionFusion(nn.Module):
    """The paper's ablation in place of LTFR: each pixel attends the prompt's tokens (a residual cross-attention)."""

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visual = pixel_tokens(features)
        attended, _ = self.attention(visual, tokens, tokens, key_padding_mask=~mask.bool(), need_weights=False)
        return feature_map(visual + attended, features)


class LCPDNModel(nn.Module):
    """Image encoder and CPRFL prompt, diffusion U-Net, a fusion per decoder scale, pixel-wise classifier."""

    def __init__(self, config: LCPDNConfig):
        super().__init__()
        self.config = config
        levels = len(config.unet_channels)
        # diffusers' attention_head_dim of this class is the number of heads (its documented naming slip).
        folded = config.stem ** 2  # channels of a slice folded by the stem
        self.unet = UNet2DConditionModel(
            in_channels=folded * config.image_in_channels, out_channels=folded * config.slice_channels,
            block_out_channels=config.unet_channels, layers_per_block=config.unet_layers,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention)),
            norm_num_groups=config.norm_groups, cross_attention_dim=config.text_embed_dim,
            attention_head_dim=config.attention_heads, class_embed_type="identity" if config.cprfl else None,
        )
        if config.cprfl:
            self.image_encoder = (
                CLIPPatchEncoder(config.clip_vision, config.context_slices) if config.clip_vision
                else PatchEncoder(config.image_in_channels, config.encoder_channels, config.norm_groups))
            self.prompt = CPRFLPrompt(config.text_embed_dim, self.image_encoder.width, config.prompt_dim,
                                      4 * config.unet_channels[0])  # diffusers' timestep-embedding width
        widths = [config.unet_channels[levels - 1 - i] for i in range(levels)]  # the decoder blocks' outputs
        self.fusions = nn.ModuleList(
            LTFR(width, config.text_embed_dim) if config.fusion == "ltfr"
            else CrossAttentionFusion(width, config.text_embed_dim, config.attention_heads) for width in widths)
        self.classifier = nn.Sequential(nn.Conv2d(sum(widths), config.classifier_channels, 1), nn.GELU(),
                                        nn.Conv2d(config.classifier_channels, 1, 1))

    def diffuse(self, noisy: torch.Tensor, image: torch.Tensor, timestep: torch.Tensor,
                text: TextEmbedding) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The U-Net on ``noisy`` slices [B, slice_channels, H, W] at ``timestep``, prompted by ``text`` (and, with
        CPRFL, the clean ``image`` [B, image_in_channels, H, W], whose lateral position, where it has one, the U-Net
        reads too): its noise prediction, and the outputs of its decoder blocks, coarsest first."""
        count = noisy.shape[0]
        tokens, mask = text.tokens.expand(count, -1, -1), text.mask.expand(count, -1)
        prompt = self.prompt(tokens, mask, self.image_encoder(image)) if self.config.cprfl else None
        features = []
        hooks = [block.register_forward_hook(lambda module, inputs, output: features.append(output))
                 for block in self.unet.up_blocks]
        try:
            inputs = torch.cat([noisy, image[:, self.config.slice_channels:]], 1)
            prediction = self.unet(F.pixel_unshuffle(inputs, self.config.stem), timestep, tokens, class_labels=prompt,
                                   encoder_attention_mask=mask).sample
        finally:
            for hook in hooks:
                hook.remove()
        return F.pixel_shuffle(prediction, self.config.stem), features

    def segment(self, noisy: torch.Tensor, image: torch.Tensor, timestep: torch.Tensor,
                text: TextEmbedding) -> torch.Tensor:
        """Mask logits [B, 1, H, W] of the structure ``text`` names, from the U-Net's features of ``noisy``."""
        _, features = self.diffuse(noisy, image, timestep, text)
        tokens, mask = text.tokens.expand(noisy.shape[0], -1, -1), text.mask.expand(noisy.shape[0], -1)
        fused = [F.interpolate(fusion(feature, tokens, mask), size=noisy.shape[-2:], mode="bilinear",
                               align_corners=False) for fusion, feature in zip(self.fusions, features)]
        return self.classifier(torch.cat(fused, 1))  # H (eq. 11), classified pixel by pixel


def noised(scheduler, image: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Slices in [0, 1] noised to ``timesteps`` (the DDPM's images lie in [-1, 1])."""
    return scheduler.add_noise(image * 2 - 1, noise, timesteps)


class LCPDNPredictor(SliceWisePredictor):
    """Slice-wise: each proposal draws one noise field per batch of ``SLICE_BATCH`` slices, reads the U-Net's features
    of the slices noised with it at each timestep, in in-plane windows, and averages the classifier's logits."""

    def prepare(self, image: np.ndarray, spacing: tuple[float, float, float]) -> torch.Tensor:
        """The slices [z, image_in_channels, y, x], as training cuts them."""
        return self.slices(image, np.arange(image.shape[0]), spacing)

    def condition(self, text: TextEmbedding | None, index: int) -> TextEmbedding:
        return TextEmbedding(text.tokens.to(self.device), text.mask.to(self.device), text.pooled.to(self.device))

    @torch.no_grad()
    def sample(self, prepared: torch.Tensor, condition: TextEmbedding, seed: int, steps: int, scheduler: str,
               on_step: StepCallback) -> np.ndarray:
        config, model = self.config, self.model
        scheduler = make_scheduler(scheduler, config.num_train_timesteps, config.prediction_type)
        timesteps = config.timesteps(steps).to(self.device)
        starts = range(0, prepared.shape[0], SLICE_BATCH)
        probabilities = []
        for batch, start in enumerate(starts):
            slices = prepared[start:start + SLICE_BATCH].to(self.device)
            generator = torch.Generator().manual_seed(seed * 100003 + start)  # as universal.sample_slices seeds
            count = config.slice_channels
            noise = torch.randn((len(slices), count, *slices.shape[2:]), generator=generator).to(self.device)
            logits = torch.zeros_like(slices[:, :1])
            for index, timestep in enumerate(timesteps):
                inputs = torch.cat([noised(scheduler, slices[:, :count], noise, timestep), slices], 1)
                logits += windowed(lambda x, t=timestep: model.segment(x[:, :count], x[:, count:], t, condition),
                                   inputs, config.window)
                on_step(batch * len(timesteps) + index + 1, len(starts) * len(timesteps))
            probabilities.append(torch.sigmoid(logits / len(timesteps)))
        return self.smoothed(torch.cat(probabilities)[:, 0].float().cpu().numpy())


def grown(model: LCPDNModel, config: LCPDNConfig) -> LCPDNModel:
    """A model of ``config``, which reads more of the scan than ``model``, holding its weights (``Family.grown``):
    the U-Net's first convolution and the patch encoder's have zero weights on the new inputs, the U-Net's last
    predicts zero noise for the new slices, so it starts out segmenting exactly as ``model`` does."""
    folded = config.stem ** 2

    def unfolded(channels: list[int]) -> torch.Tensor:  # each channel's stem x stem pixels, as pixel_unshuffle folds them
        return torch.tensor([channel * folded + k for channel in channels for k in range(folded)])

    inputs = widened_inputs(model.config, config)
    slices = inputs[:model.config.slice_channels]
    return load_grown(LCPDNModel(config), model, {
        "unet.conv_in.weight": (1, unfolded(inputs)), "unet.conv_out.weight": (0, unfolded(slices)),
        "unet.conv_out.bias": (0, unfolded(slices)), "image_encoder.layers.0.weight": (1, torch.tensor(inputs))})


def lora_targets(model: LCPDNModel) -> list[str]:
    """The diffusion U-Net's linear and convolution layers."""
    return [name for name, module in model.named_modules()
            if name.startswith("unet.") and isinstance(module, (nn.Linear, nn.Conv2d))]


def retrained_parameters(model: LCPDNModel) -> list[str]:
    """Retrained in full when adapting: the light modules (CPRFL's prompt block, the fusions, the classifier, the
    patch encoder trained here) and every normalisation layer; a CLIP vision model stays frozen."""
    light = ("prompt.", "fusions.", "classifier.", "image_encoder.layers.")
    norms = set(normalisation_parameters(model))
    return [name for name, _ in model.named_parameters()
            if name.startswith(light) or (name in norms and not name.startswith("image_encoder.clip."))]


def card_text(config: LCPDNConfig) -> list[str]:
    first, last = config.timestep_range
    parts = [f"{config.default_steps} timesteps read by default (spread over {first}-{last}), slice by slice: a "
             "diffusion U-Net's features of the noised slice, fused with the prompt, classified pixel by pixel"]
    parts += config.inputs_card_text("the U-Net")
    if config.stem > 1:
        parts.append(f"the U-Net reads each slice folded {config.stem} x {config.stem} pixels into channels (`stem`)")
    if not config.cprfl:
        parts.append("without CPRFL (`cprfl`: the image does not prompt the U-Net)")
    elif config.clip_vision:
        parts.append(f"CPRFL reads the frozen CLIP vision model of {config.clip_vision}")
    if config.fusion != "ltfr":
        parts.append("plain cross-attention in place of LTFR (`fusion`)")
    return parts + config.sampling_card_text()
