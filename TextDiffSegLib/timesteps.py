"""Which timesteps a diffusion model trains on: those whose loss is still high, more often."""

from __future__ import annotations

import torch


class ImportanceTimesteps:
    """Timesteps drawn in proportion to the loss they recently gave (papers/002, after Nichol & Dhariwal).

    The range is cut into buckets; each bucket keeps its last few losses, and a bucket is drawn with
    probability proportional to the root mean square of those, mixed with a little of the uniform
    distribution. Until every bucket has a history, timesteps are uniform. Without this, x0-prediction
    learns to copy the lightly noised mask and stays weak at the high timesteps sampling starts from.

    A share ``high_noise_share`` of the draws is instead taken uniformly from the last tenth of the schedule,
    where sampling starts and the model must find the structure from almost pure noise: the loss there
    is not the highest, so importance alone gave it a fifth of the draws (docs/families.md).
    """

    def __init__(self, num_timesteps: int, buckets: int = 20, history: int = 10, uniform: float = 0.1,
                 high_noise_share: float = 0.0):
        if not 0 <= high_noise_share <= 1:
            raise ValueError(f"high_noise_share is a share between 0 and 1, not {high_noise_share}")
        self.num_timesteps, self.uniform, self.high_noise_share = num_timesteps, uniform, high_noise_share
        self.edges = torch.linspace(0, num_timesteps, buckets + 1).long()
        self.losses = torch.full((buckets, history), float("nan"))

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        drawn = self._by_importance(count, generator)
        if not self.high_noise_share:
            return drawn
        high = torch.rand(count, generator=generator) < self.high_noise_share
        start = self.num_timesteps - self.num_timesteps // 10
        return torch.where(high, torch.randint(start, self.num_timesteps, (count,), generator=generator), drawn)

    def _by_importance(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        if torch.isnan(self.losses).any():
            return torch.randint(0, self.num_timesteps, (count,), generator=generator)
        weights = self.losses.pow(2).mean(1).sqrt()
        weights = (1 - self.uniform) * weights / weights.sum() + self.uniform / len(weights)
        buckets = torch.multinomial(weights, count, replacement=True, generator=generator)
        low, high = self.edges[buckets], self.edges[buckets + 1]
        return low + (torch.rand(count, generator=generator) * (high - low)).long()

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        buckets = torch.bucketize(timesteps.cpu(), self.edges[1:-1], right=True)
        for bucket, loss in zip(buckets.tolist(), losses.detach().cpu().tolist()):
            self.losses[bucket] = torch.cat([self.losses[bucket, 1:], torch.tensor([loss])])
