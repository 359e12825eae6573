"""How the TextDiffSeg 3D family trains (papers/003, eqs. 4-6): one end-to-end stage on 3D patches.

Each step encodes the patches' masks to label latents, noises them (eq. 3) at timesteps drawn where the loss is
still high (``timesteps.ImportanceTimesteps``; drawn uniformly, the denoiser learnt to copy the lightly noised
latent and found no kidney from pure noise, where sampling starts) and has the denoiser predict
from the cross-modal embedding of the patch and the prompt what the model's prediction type names: the
clean latent, or the noise as in the paper. The loss is the MSE of that prediction (eq. 5: the noise MSE)
plus BCE + Dice (eq. 4, binary per prompt) of the mask decoded from the clean latent the prediction
implies, plus BCE + Dice of the mask decoded from the clean latent itself, so that the label decoder
learns to read latents from the first step on. The decoded mask answers the prompt, so its Dice is LCPDN's
(``segmentation_loss``): of the whole batch, and of each structure's patches pooled, as a Dice per patch
drives a prompt the model cannot yet place to an empty mask and lets it leave a small structure out; the
autoencoder's reconstruction keeps the Dice per patch. The noised latents are taken without gradient, so that
the label encoder is not pushed towards latents that are easy to denoise rather than faithful.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import PreparedCase
from ..errors import DataError
from ..losses import clean_estimate, diffusion_target, mask_loss, prompted_mask_loss
from ..preprocessing import lateral_position
from ..sampler import make_scheduler
from ..text_encoders import TextEmbedding
from ..timesteps import ImportanceTimesteps
from .base import Recipe, Stage, stacked
from .textdiffseg3d import LATENT_CLAMP


class PatchSampler:
    """Random 3D patches (z, y, x) with the mask of one structure, from cases on the model grid.

    A share ``present_fraction`` of the patches is centred near a voxel of the structure, the others
    anywhere. A case smaller than the patch is padded with air. Front-back flips, as in the universal
    family (BTCV stores that axis flipped against its header); intensities scaled and shifted a little.
    With ``position_spacing`` (the grid's x spacing in mm) each patch carries its voxels' lateral position as a
    second channel, measured on the case's whole slices as sampling measures it on the scan's.
    """

    def __init__(self, cases: list[PreparedCase], structures: tuple[str, ...], crop: tuple[int, int, int],
                 present_fraction: float, seed: int, position_spacing: float = 0.0):
        self.cases, self.structures, self.crop = cases, structures, crop
        self.present_fraction = present_fraction
        self.rng = np.random.default_rng(seed)
        self.positions = [lateral_position(case.image / np.float32(255), position_spacing).astype(np.float16)
                          for case in cases] if position_spacing else None
        # every 4th voxel of each structure in each case: where a patch with the structure is centred
        self.inside = {(i, s): np.argwhere(case.mask(s))[::4] for i, case in enumerate(cases) for s in structures}

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return stacked([self._item() for _ in range(size)])

    def _item(self):
        rng = self.rng
        label, case_index = int(rng.integers(len(self.structures))), int(rng.integers(len(self.cases)))
        case, structure = self.cases[case_index], self.structures[label]
        padding = [(0, max(0, c - s)) for c, s in zip(self.crop, case.image.shape)]
        image, mask = np.pad(case.image, padding), np.pad(case.mask(structure), padding)
        channels = [] if self.positions is None else [np.pad(self.positions[case_index], padding, mode="edge")]
        inside = self.inside[(case_index, structure)]
        if len(inside) and rng.random() < self.present_fraction:
            centre = inside[rng.integers(len(inside))] + rng.integers(-np.array(self.crop) // 4, np.array(self.crop) // 4 + 1)
        else:
            centre = [rng.integers(s) for s in image.shape]
        corner = [int(np.clip(c - w // 2, 0, s - w)) for c, w, s in zip(centre, self.crop, image.shape)]
        window = tuple(slice(o, o + w) for o, w in zip(corner, self.crop))
        image, mask = image[window].astype(np.float32) / 255, mask[window].astype(np.float32)
        channels = [channel[window].astype(np.float32) for channel in channels]
        if rng.random() < 0.5:  # (the lateral position is the same all along the front-back axis)
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = np.clip(image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05), 0, 1)
        return np.ascontiguousarray(np.stack([image, *channels])), np.ascontiguousarray(mask[None]), label


class TextDiffSeg3DRecipe(Recipe):
    """One averaged stage, image encoder to label decoder trained together."""

    def __init__(self, model, settings, trainer):
        super().__init__(model, settings, trainer)
        multiple = self.config.size_multiple
        crop = tuple(settings.crop)
        if len(crop) != 3 or any(side <= 0 or side % multiple for side in crop):
            raise DataError(f"this 3D family trains on patches of three sides (z, y, x), each a positive multiple of "
                            f"{multiple} (its downsampling), e.g. --crop {','.join(map(str, self.config.window))}; "
                            f"not {crop}")
        # Channels-last convolutions: a step 1.5 times as fast on a 2-core Xeon
        # (benchmarks/textdiffseg3d_training_layout.py).
        model.to(memory_format=torch.channels_last_3d)
        self.scheduler = make_scheduler("ddpm", self.config.num_train_timesteps, self.config.prediction_type)
        self.timesteps = ImportanceTimesteps(self.config.num_train_timesteps, high_noise_share=settings.high_noise_share)
        self.text = None

    def batch_source(self, cases: list[PreparedCase], structures: tuple[str, ...], text: TextEmbedding | None):
        self.text = None if text is None else TextEmbedding(*(t.to(self.trainer.device) for t in
                                                               (text.tokens, text.mask, text.pooled)))
        return PatchSampler(cases, structures, tuple(self.settings.crop), self.settings.present_fraction,
                            self.settings.seed, self.config.spacing[0] if self.config.lateral_position else 0.0)

    def stages(self) -> list[Stage]:
        return [Stage("diffusion", self.settings.diffusion_steps, self.settings.lr,
                      lambda: list(self.model.parameters()), self.loss, averaged=True)]

    def state(self) -> dict:
        return {"timestep_losses": self.timesteps.losses}

    def load_state(self, state: dict) -> None:
        self.timesteps.losses = state["timestep_losses"]

    def loss(self, batch) -> torch.Tensor:
        device, model, scheduler = self.trainer.device, self.model, self.scheduler
        images, masks = (tensor.to(device, memory_format=torch.channels_last_3d) for tensor in batch[:2])
        labels = batch[2].to(device)
        prompt = model.text_of(self.text, labels)
        timesteps = self.timesteps.sample(len(labels)).to(device)
        with self.trainer.autocast():
            clean = model.label_autoencoder.encode(masks)
            reconstructed = model.label_autoencoder.decode(clean)
            noise = torch.randn_like(clean)
            noisy = scheduler.add_noise(clean.detach(), noise, timesteps)
            embedding = model.cross_modal(model.image_encoder(images), prompt.tokens, prompt.mask)
            predicted = model.denoise(noisy, timesteps, embedding, prompt.pooled)
            estimate = clean_estimate(scheduler, self.config.prediction_type, noisy, predicted, timesteps)
            decoded = model.label_autoencoder.decode(estimate.clamp(-LATENT_CLAMP, LATENT_CLAMP))
        target = diffusion_target(scheduler, self.config.prediction_type, clean.detach(), noise, timesteps)
        diffusion_losses = F.mse_loss(predicted.float(), target.float(), reduction="none").flatten(1).mean(1)
        # each patch's own loss, for the timesteps' weights (the optimised mask loss is of the batch)
        self.timesteps.update(timesteps, diffusion_losses + self.settings.decoded_mask_weight
                              * mask_loss(decoded.detach().float(), masks))
        segmentation = self.segmentation_loss(decoded.float(), reconstructed.float(), masks, labels)
        return self.settings.decoded_mask_weight * segmentation + diffusion_losses.mean()

    @staticmethod
    def segmentation_loss(decoded: torch.Tensor, reconstructed: torch.Tensor, masks: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
        """The decoded mask's batch DiceCE and Dice per structure, and the reconstruction's BCE + Dice per patch."""
        return prompted_mask_loss(decoded, masks, labels) + mask_loss(reconstructed, masks).mean()
