"""Shared test data: recipe overrides that shrink runs to seconds, and synthetic frames."""

import numpy as np

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
