"""How LCPDN trains (papers/001): a DDPM on the images, then the segmentation through its features.

The paper reads the features of a pretrained diffusion U-Net; none exists here, so a new model trains in two
stages. First the U-Net, prompted through CPRFL, learns to denoise the images (the DDPM objective: the MSE of
the noise, timesteps drawn over the whole schedule), ``--autoencoder-steps`` steps, the length of every
family's first stage. Then everything but a frozen CLIP vision model trains end to end on the paper's loss,
cross-entropy and Dice of the pixel-wise classifier's output (binary, as a prompt names one structure). The Dice is
of the whole batch (``losses.batch_mask_loss``), as a Dice per sample collapses every prompt but the liver's to an
empty mask, plus the mean Dice of each structure's samples (``losses.structure_dice_loss``), so that a small
structure counts as much as a large one. Each sample's image is noised at a timestep drawn from ``timestep_range``;
``--steps`` steps, whose moving average is saved. A model trained on from another (``init_from``) trains the
second stage alone.

Samples are the universal family's 2D slice crops: one slice each (the paper's input is one image), or the slice with
its neighbours and lateral position as the config asks (``LCPDNConfig.context_slices``, ``lateral_position``); the
U-Net denoises the slice and its neighbours, each noised with its own noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..datasets import PreparedCase
from ..errors import DataError
from ..losses import prompted_mask_loss
from ..sampler import make_scheduler
from ..text_encoders import TextEmbedding
from .base import Recipe, Stage
from .lcpdn import noised
from .universal_training import SliceSampler, check_slice_crop


class LCPDNRecipe(Recipe):
    """The denoiser and segmentation stages."""

    def __init__(self, model, settings, trainer):
        super().__init__(model, settings, trainer)
        check_slice_crop(settings.crop, self.config.size_multiple)
        if settings.high_noise_share:
            raise DataError("the lcpdn family draws its timesteps uniformly over the whole schedule; "
                            "--high-noise-share is for the universal, progidiff and textdiffseg3d families")
        self.scheduler = make_scheduler("ddpm", self.config.num_train_timesteps, self.config.prediction_type)
        self.text = None  # the structures' prompts, one row each: set with the batch source

    def batch_source(self, cases: list[PreparedCase], structures: tuple[str, ...], text: TextEmbedding | None):
        self.text = TextEmbedding(*(tensor.to(self.trainer.device) for tensor in (text.tokens, text.mask, text.pooled)))
        return SliceSampler.for_run(cases, structures, self.config, self.settings)

    def stages(self) -> list[Stage]:
        settings = self.settings
        return [
            Stage("denoiser", settings.autoencoder_steps, settings.lr, self.trainable_parameters, self.denoiser_loss,
                  new_models_only=True),
            Stage("segmentation", settings.diffusion_steps, settings.lr, self.trainable_parameters,
                  self.segmentation_loss, averaged=True),
        ]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Those not frozen: all but a CLIP vision model's (and, when adapting, but the base weights)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _prompts(self, labels: torch.Tensor) -> TextEmbedding:
        return TextEmbedding(self.text.tokens[labels], self.text.mask[labels], self.text.pooled[labels])

    def _slices(self, images: torch.Tensor) -> torch.Tensor:
        """The slice channels of a batch's images (its lateral position left out): what the U-Net denoises."""
        return images[:, :self.config.slice_channels]

    def denoiser_loss(self, batch) -> torch.Tensor:
        images, _, labels = (tensor.to(self.trainer.device) for tensor in batch)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (len(labels),), device=images.device)
        slices = self._slices(images)
        noise = torch.randn_like(slices)
        with self.trainer.autocast():
            prediction, _ = self.model.diffuse(noised(self.scheduler, slices, noise, timesteps), images, timesteps,
                                               self._prompts(labels))
        return F.mse_loss(prediction.float(), noise)

    def segmentation_loss(self, batch) -> torch.Tensor:
        images, masks, labels = (tensor.to(self.trainer.device) for tensor in batch)
        first, last = self.config.timestep_range
        timesteps = torch.randint(first, last + 1, (len(labels),), device=images.device)
        slices = self._slices(images)
        noisy = noised(self.scheduler, slices, torch.randn_like(slices), timesteps)
        with self.trainer.autocast():
            logits = self.model.segment(noisy, images, timesteps, self._prompts(labels))
        logits = logits.float()
        return prompted_mask_loss(logits, masks, labels)
