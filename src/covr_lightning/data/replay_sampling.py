"""Reading the replay ring: uniform sampling and frame-stack gathering by index.

``sample`` draws uniformly over ``np.flatnonzero(valid)`` (O(capacity) bools, under 0.1 ms at
100k) and gathers the frames of obs and next_obs with one fancy index over ``(2B, stack)`` slots
(about 1.5 ms for B=128 of 9x84x84 on a busy 2-core CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from covr_lightning.data.replay_layout import RingLayout


def gather_obs(
    layout: RingLayout, frames: np.ndarray, step: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """Stacked observations of slots ``idx``: ``(B, stack*C, ...)``, one fancy index.

    Args:
        layout: The ring's layout.
        frames: ``(capacity, C, ...)`` stored frames.
        step: ``(capacity,)`` position in its episode of every slot's frame.
        idx: ``(B,)`` slots.

    Returns:
        ``(B, stack*C, ...)`` array in the frame dtype.
    """
    stacked = frames[layout.stack_slots(idx, step)]  # (B, stack, C, ...)
    return stacked.reshape(len(idx), *layout.obs_shape)


def gather_batch(
    layout: RingLayout,
    arrays: dict[str, np.ndarray],
    extras: dict[str, np.ndarray],
    idx: np.ndarray,
) -> dict[str, torch.Tensor]:
    """The transitions stored at slots ``idx`` (no validity check).

    Args:
        layout: The ring's layout.
        arrays: The core arrays by name (``frames``, ``step_in_episode``, ``action``, ``reward``,
            ``terminated``).
        extras: The declared extra fields' arrays by name.
        idx: ``(B,)`` slots.

    Returns:
        CPU tensors: ``obs`` and ``next_obs`` ``(B, stack*C, ...)`` in the frame dtype,
        ``action`` ``(B, A)`` float32, ``reward`` ``(B,)`` float32, ``terminated`` ``(B,)``
        float32 0/1, and each extra ``(B, *shape)``.
    """
    b = len(idx)
    # One gather for obs and next_obs: a single output allocation is reused by malloc across
    # calls, while two live ones each got fresh pages (measured 1 ms vs 5-8 ms at B=128, 84px).
    # The halves are disjoint contiguous blocks, so obs and next_obs never alias.
    both = gather_obs(
        layout,
        arrays["frames"],
        arrays["step_in_episode"],
        np.concatenate([idx, layout.successors(idx)]),
    )
    batch = {
        "obs": torch.from_numpy(both[:b]),
        "action": torch.from_numpy(arrays["action"][idx]),
        "reward": torch.from_numpy(arrays["reward"][idx]),
        "next_obs": torch.from_numpy(both[b:]),
        "terminated": torch.from_numpy(arrays["terminated"][idx].astype(np.float32)),
    }
    for name, arr in extras.items():
        batch[name] = torch.from_numpy(arr[idx])
    return batch


def draw_slots(valid: np.ndarray, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """``(B,)`` slots drawn uniformly, with replacement, among the valid ones.

    Raises:
        RuntimeError: If no slot is valid (the loop sampled before its seed steps).
    """
    candidates = np.flatnonzero(valid)
    if len(candidates) == 0:
        raise RuntimeError(
            "replay has no sampleable transition yet: add at least one complete transition "
            "(seed steps) before sampling"
        )
    return candidates[rng.integers(0, len(candidates), size=batch_size)]


class EndlessSamples(IterableDataset):
    """An endless stream of ``sample()`` batches (for Lightning ``Trainer`` users)."""

    def __init__(self, sample: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.sample = sample

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.sample()
