"""Timesteps drawn for training where the loss is still high."""

from __future__ import annotations

import pytest
import torch

from TextDiffSegLib.timesteps import ImportanceTimesteps


def test_timesteps_are_uniform_until_every_bucket_has_a_history_then_follow_the_loss():
    timesteps = ImportanceTimesteps(1000, buckets=4, history=2, uniform=0.1)
    generator = torch.Generator().manual_seed(0)
    first = timesteps.sample(4000, generator)
    assert first.min() >= 0 and first.max() < 1000
    assert all(700 < int(((first >= low) & (first < low + 250)).sum()) < 1300 for low in (0, 250, 500, 750))
    # the last quarter of the schedule gives nine times the loss of each other quarter
    for _ in range(2):
        timesteps.update(torch.tensor([100, 300, 600, 900]), torch.tensor([1.0, 1.0, 1.0, 9.0]))
    drawn = timesteps.sample(4000, generator)
    share_last = float((drawn >= 750).float().mean())
    assert abs(share_last - (0.9 * 9 / 12 + 0.1 / 4)) < 0.03  # 0.7: as the losses weigh it, with a tenth uniform
    assert (drawn < 750).any()


def test_a_high_noise_share_of_the_draws_comes_from_the_last_tenth_of_the_schedule():
    generator = torch.Generator().manual_seed(0)
    timesteps = ImportanceTimesteps(1000, buckets=4, history=2, uniform=0.0, high_noise_share=0.5)
    assert 0.5 + 0.5 * 0.1 - 0.03 < float((timesteps.sample(4000, generator) >= 900).float().mean()) < 0.55 + 0.03
    # the losses put every importance draw in the first quarter: the last tenth has the high-noise share alone
    for _ in range(2):
        timesteps.update(torch.tensor([100, 300, 600, 900]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    drawn = timesteps.sample(4000, generator)
    high = drawn >= 900
    assert abs(float(high.float().mean()) - 0.5) < 0.03
    assert (drawn[~high] < 250).all() and drawn.max() < 1000
    with pytest.raises(ValueError, match="between 0 and 1"):
        ImportanceTimesteps(1000, high_noise_share=1.5)
