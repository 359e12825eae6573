"""Losses of segmentation masks, for any family's training recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


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


_BATCH_DICE_CE = DiceCELoss(sigmoid=True, batch=True)


def batch_mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice of the whole batch as one (nnU-Net's batch Dice; MONAI's ``DiceCELoss(batch=True)``), for a model
    whose logits answer a prompt directly. With Dice per sample, a sample without the structure costs as much as a
    missed one unless its mask is empty to the last pixel, so a prompt the model cannot yet tell apart is driven to
    an empty mask everywhere, and stays there (LCPDN's first run: logits below -9 for every structure but the liver).
    Over the batch, a false positive costs in proportion to its size."""
    return _BATCH_DICE_CE(logits, target)


def structure_dice_loss(logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - Dice of each structure's samples in the batch pooled (``labels``: each sample's structure), averaged over
    the structures with some foreground in the batch. In the Dice of the whole batch a small structure's pixels are
    few among a liver's, so a model can leave the pancreas out at little cost (``lcpdn-btcv`` before this loss: a
    probability of 0.003 inside the pancreas); here a missed pancreas costs as much as a missed liver. Samples of
    structures with no foreground in the batch are left out, so no prompt is driven to an empty mask (see
    ``batch_mask_loss``); 0 when the batch has no foreground at all."""
    groups = F.one_hot(labels).float().T  # [structures, samples]
    probabilities, target = torch.sigmoid(logits).flatten(1), target.flatten(1)
    intersection = groups @ (probabilities * target).sum(1)
    sizes = groups @ (probabilities.sum(1) + target.sum(1))
    present = (groups @ target.sum(1)) > 0
    if not present.any():
        return logits.sum() * 0
    return 1 - (2 * intersection[present] / sizes[present]).mean()


def prompted_mask_loss(logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of masks that answer prompts (``labels``: each sample's structure): the whole batch's BCE + Dice
    (``batch_mask_loss``) plus each structure's Dice (``structure_dice_loss``); LCPDN's, ProGiDiff's decoded
    estimates' and TextDiffSeg-3D's."""
    return batch_mask_loss(logits, target) + structure_dice_loss(logits, target, labels)


def diffusion_target(scheduler, prediction_type: str, clean: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to predict: the noise, the clean sample, or v (diffusers' prediction types)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    return scheduler.get_velocity(clean, noise, timesteps)


def clean_estimate(scheduler, prediction_type: str, noisy: torch.Tensor, prediction: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """The clean sample a prediction of ``prediction_type`` implies for ``noisy`` at ``timesteps``."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, *[1] * (noisy.dim() - 1))
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if prediction_type == "sample":
        return prediction
    return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
