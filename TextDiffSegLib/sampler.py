"""The one sampling loop every model family uses.

A family supplies ``denoise(x_t, t)`` (latent or pixel space, concatenated or cross-attended
conditioning, sliding windows: all inside that function); the loop only asks a diffusers
scheduler for the next sample. Each call takes its own ``torch.Generator``, so any proposal can be
reproduced from its seed alone.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from monai.inferers import sliding_window_inference

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(kind: str, num_train_timesteps: int, prediction_type: str, clip_sample: float | None = None):
    """A diffusers scheduler, the same noise schedule in training and sampling.

    ``trailing`` spacing makes even a few steps start from the last timestep. For sample- and
    v-prediction the schedule is rescaled to zero terminal SNR (Lin et al. 2024): the last timestep
    is pure noise, as sampling assumes; otherwise a model learns to read the faint trace of the
    true mask left at that step and fails from pure noise. Epsilon-prediction is undefined there
    and keeps the plain schedule. With ``clip_sample``, each step's clean-sample estimate is clamped to
    ±that (under epsilon-prediction the noisiest steps divide it by sqrt(alpha_bar), about 0.07).
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[kind](
        num_train_timesteps=num_train_timesteps,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=clip_sample is not None,
        clip_sample_range=clip_sample or 1.0,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=prediction_type != "epsilon",
    )


def sample(denoise: Denoiser, scheduler, shape: tuple[int, ...], steps: int, generator: torch.Generator,
           device: torch.device | str = "cpu", on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the reverse process from Gaussian noise of ``shape`` and return the final sample."""
    scheduler.set_timesteps(steps, device=device)
    noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
    x = noise * scheduler.init_noise_sigma
    for index, t in enumerate(scheduler.timesteps):
        model_output = denoise(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step(index + 1, len(scheduler.timesteps))
    return x


def windowed(predict: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, window: tuple[int, ...],
             overlap: float = 0.25, batch_size: int = 64) -> torch.Tensor:
    """``predict`` over sliding windows of ``inputs`` [B, C, *spatial] (2D windows (h, w) or 3D (d, h, w)),
    blended with Gaussian weights (MONAI's ``sliding_window_inference``).

    Inputs no larger than ``window`` go through in one piece.
    """
    spatial = inputs.shape[-len(window):]
    if all(size <= side for size, side in zip(spatial, window)):
        return predict(inputs)
    roi = tuple(min(side, size) for side, size in zip(window, spatial))
    return sliding_window_inference(inputs, roi, batch_size, predict, overlap=overlap, mode="gaussian")
