"""Which timesteps a diffusion model trains on: those whose loss is still high, more often."""

from __future__ import annotations

import torch


class ImportanceTimesteps:
    """Timesteps drawn in proportion to the loss they recently gave (papers/002, after Nichol & Dhariwal).

    The range is cut into buckets; each bucket keeps its last few losses, and a bucket is drawn with
    probability proportional to the root mean square of those, mixed with a little of the uniform
    distribution. Until every bucket has a history, timesteps are uniform. Without this, x0-prediction
    learns to copy the lightly noised mask and stays weak at the high timesteps sampling starts from.
    """

    def __init__(self, num_timesteps: int, buckets: int = 20, history: int = 10, uniform: float = 0.1):
        self.num_timesteps, self.uniform = num_timesteps, uniform
        self.edges = torch.linspace(0, num_timesteps, buckets + 1).long()
        self.losses = torch.full((buckets, history), float("nan"))

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
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
