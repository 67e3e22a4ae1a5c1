"""Shared test data: recipe overrides that shrink runs to seconds, synthetic frames and batches."""

import numpy as np
import torch

TINY = [
    "env.image_size=32",
    "env.max_episode_env_steps=200",
    "policy.hidden_dim=32",
    "policy.num_filters=8",
    "replay.batch_size=8",
    "replay.capacity=2000",
    "run.seed_env_steps=80",
    "run.eval_episodes=1",
    "run.eval_every_env_steps=400",
    "run.checkpoint_every_env_steps=200",
    "run.log_every_env_steps=80",
]
"""Cartpole at 32x32 with 25-agent-step episodes, a tiny network and batch: about a second per 100 env steps."""


def distinct_frames(count: int, size: int = 84) -> np.ndarray:
    """Frames a frozen random vision tower can tell apart: a colour and a band per frame."""
    frames = np.zeros((count, size, size, 3), np.uint8)
    for i in range(count):
        frames[i, :, :, i % 3] = 255
        frames[i, : (i + 1) * size // (count + 1)] = 30 * i
    return frames


def pixel_batch(size: int = 32, batch: int = 16, action_dim: int = 2) -> dict[str, torch.Tensor]:
    """A replay batch of random uint8 stacked frames ``(batch, 9, size, size)`` (seeded)."""
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    return {
        "obs": torch.from_numpy(rng.integers(0, 256, (batch, 9, size, size), dtype=np.uint8)),
        "next_obs": torch.from_numpy(rng.integers(0, 256, (batch, 9, size, size), dtype=np.uint8)),
        "action": torch.rand(batch, action_dim, generator=generator) * 2 - 1,
        "reward": torch.rand(batch, generator=generator),
        "terminated": torch.zeros(batch),
    }
