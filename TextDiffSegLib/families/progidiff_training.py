"""How ProGiDiff trains (papers/000): steer a text-conditioned mask generator with a ControlNet.

A new model trains in three stages: the mask autoencoder (BCE + Dice of the decoded mask, plus the small
KL term of SD's autoencoder), after which the latent scale is measured; the backbone alone, as a
text-conditioned generator of mask latents (SD's objective: the MSE of the noise, or of what the prediction
type names); then, with backbone and autoencoder frozen, the ControlNet and the conditioning-image encoder
on the same objective, whose moving average is saved. Beyond SD's objective, both diffusion stages decode the
clean latent each prediction implies and add ``decoded_mask_weight`` times the segmentation loss of LCPDN and
TextDiffSeg-3D on it (the batch's Dice and cross-entropy, and the Dice of each structure's samples): the
latent MSE alone says little of where a small organ lies (``--decoded-mask-weight 0``: SD's objective alone).
Both diffusion stages draw their timesteps in proportion to the loss they recently gave
(``timesteps.ImportanceTimesteps``, as the universal and 3D families), so that the ControlNet trains more where the
noisy latent holds little of the mask and only the image can place it.
The ControlNet starts as a copy of the trained backbone's encoder, its zero convolutions at zero. With
``pretrain_backbone`` false, backbone, ControlNet and encoder train together from scratch in one stage as
long as those two. A model trained on from another (``init_from``, or a LoRA adapter of it) trains the last
stage alone.

Each sample's prompt takes one of the task verbs at random ("Segment / Highlight / Show the liver in this
CT scan", section 3.1); sampling uses the first. Samples are the universal family's 2D slice crops: a
single slice each (the paper's condition), or with its neighbours and lateral position where the config
asks (``context_slices``, ``lateral_position``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..datasets import PreparedCase
from ..losses import clean_estimate, diffusion_target, mask_loss, prompted_mask_loss
from ..sampler import make_scheduler
from ..text_encoders import TASKS, TextEmbedding
from ..timesteps import ImportanceTimesteps
from .base import Recipe, Stage
from .progidiff import LATENT_CLAMP, prompt_tokens
from .progidiff_stable_diffusion import load_stable_diffusion
from .universal_training import SliceSampler, check_slice_crop

KL_WEIGHT = 1e-6  # SD's (LDM's) weight of its autoencoder's KL term, here per mask pixel


class ProGiDiffRecipe(Recipe):
    """The autoencoder, backbone and ControlNet stages; checkpoints keep the latent scale and the timesteps' losses."""

    def __init__(self, model, settings, trainer):
        super().__init__(model, settings, trainer)
        check_slice_crop(settings.crop, self.config.size_multiple)
        self.scheduler = make_scheduler("ddpm", self.config.num_train_timesteps, self.config.prediction_type)
        self.timesteps = ImportanceTimesteps(self.config.num_train_timesteps, high_noise_share=settings.high_noise_share)
        self.prompts = None  # [tasks, structures, tokens, embedding]: set with the batch source
        if self.config.stable_diffusion and not settings.init_from:
            load_stable_diffusion(model, self.config.stable_diffusion)

    def batch_source(self, cases: list[PreparedCase], structures: tuple[str, ...], text: TextEmbedding | None):
        synonyms = [self.trainer.prompt_embeddings(structures, task) for task in TASKS[1:]]
        self.prompts = torch.stack([prompt_tokens(embedding) for embedding in (text, *synonyms)])
        return SliceSampler.for_run(cases, structures, self.config, self.settings)

    def stages(self) -> list[Stage]:
        settings, model = self.settings, self.model
        autoencoder = Stage("autoencoder", settings.autoencoder_steps, settings.autoencoder_lr,
                            lambda: list(model.mask_autoencoder.parameters()), self.autoencoder_loss,
                            new_models_only=True, finish=self.measure_latent_scale)
        if not self.config.pretrain_backbone:
            return [autoencoder, Stage("diffusion", 2 * settings.diffusion_steps, settings.lr, self.unfrozen_parameters,
                                       self.controlled_loss, averaged=True)]
        return [
            autoencoder,
            Stage("backbone", settings.diffusion_steps, settings.lr, self.backbone_parameters, self.backbone_loss,
                  new_models_only=True, finish=model.start_controlnet_from_backbone),
            Stage("controlnet", settings.diffusion_steps, settings.lr, self.controlnet_parameters, self.controlled_loss,
                  averaged=True),
        ]

    def state(self) -> dict:
        return {"latent_scale": self.config.latent_scale, "timestep_losses": self.timesteps.losses}

    def load_state(self, state: dict) -> None:
        self.config.latent_scale = state["latent_scale"]
        self.timesteps.losses = state["timestep_losses"]

    def autoencoder_loss(self, batch) -> torch.Tensor:
        masks = batch[1].to(self.trainer.device)
        with self.trainer.autocast():
            posterior = self.model.mask_posterior(masks)
            logits = self.model.decode_mask(posterior.sample())  # the latent scale is 1 until measured
        kl = posterior.kl().float() / masks[0].numel()
        return (mask_loss(logits.float(), masks) + KL_WEIGHT * kl).mean()

    @torch.no_grad()
    def measure_latent_scale(self, batches: int = 20) -> None:
        latents = [self.model.mask_posterior(self.trainer.batch()[1].to(self.trainer.device)).mode()
                   for _ in range(batches)]
        self.config.latent_scale = float(1.0 / torch.cat(latents).std().clamp(min=1e-6))

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        self.model.mask_autoencoder.requires_grad_(False)
        return list(self.model.unet.parameters())

    def controlnet_parameters(self) -> list[torch.nn.Parameter]:
        self.model.unet.requires_grad_(False)
        return self.unfrozen_parameters()

    def unfrozen_parameters(self) -> list[torch.nn.Parameter]:
        """Those not frozen (a LoRA adapter leaves its own alone), less the autoencoder's."""
        self.model.mask_autoencoder.requires_grad_(False)
        return [p for p in self.model.parameters() if p.requires_grad]

    def backbone_loss(self, batch) -> torch.Tensor:
        return self.diffusion_loss(batch, steered=False)

    def controlled_loss(self, batch) -> torch.Tensor:
        return self.diffusion_loss(batch, steered=True)

    def diffusion_loss(self, batch, steered: bool) -> torch.Tensor:
        """SD's objective on the batch's mask latents and prompts, plus the decoded clean estimate's segmentation
        loss; ``steered``: through the ControlNet reading the images."""
        device, model, scheduler, config = self.trainer.device, self.model, self.scheduler, self.config
        images, masks, labels = (tensor.to(device) for tensor in batch)
        with torch.no_grad():
            clean = model.encode_mask(masks)
        noise = torch.randn_like(clean)
        timesteps = self.timesteps.sample(len(labels)).to(device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        tokens = self.prompts[torch.randint(len(TASKS), (len(labels),), device=device), labels]
        weight = self.settings.decoded_mask_weight
        with self.trainer.autocast():
            prediction = model.denoise(noisy, timesteps, tokens, model.conditioning_encoder(images) if steered else None)
            if weight > 0:
                estimate = clean_estimate(scheduler, config.prediction_type, noisy, prediction, timesteps)
                decoded = model.decode_mask(estimate.clamp(-LATENT_CLAMP, LATENT_CLAMP)).float()
        target = diffusion_target(scheduler, config.prediction_type, clean, noise, timesteps)
        losses = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        loss = losses.mean()
        if weight > 0:  # the optimised mask loss is of the batch; each sample's own weighs its timestep
            losses = losses + weight * mask_loss(decoded.detach(), masks)
            loss = loss + weight * prompted_mask_loss(decoded, masks, labels)
        self.timesteps.update(timesteps, losses)
        return loss
