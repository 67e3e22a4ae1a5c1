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

from covr_lightning.data.replay_device import DeviceFrames
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
    mirror: DeviceFrames | None = None,
) -> dict[str, torch.Tensor]:
    """The transitions stored at slots ``idx`` (no validity check).

    Args:
        layout: The ring's layout.
        arrays: The core arrays by name (``frames``, ``step_in_episode``, ``action``, ``reward``,
            ``terminated``).
        extras: The declared extra fields' arrays by name.
        idx: ``(B,)`` slots.
        mirror: The frames on the training device; when given, ``obs`` and ``next_obs`` are
            gathered there and returned on that device.

    Returns:
        CPU tensors (``obs`` and ``next_obs`` on the mirror's device if there is one): ``obs``
        and ``next_obs`` ``(B, stack*C, ...)`` in the frame dtype,
        ``action`` ``(B, A)`` float32, ``reward`` ``(B,)`` float32, ``terminated`` ``(B,)``
        float32 0/1, and each extra ``(B, *shape)``.
    """
    b = len(idx)
    both_idx = np.concatenate([idx, layout.successors(idx)])
    if mirror is not None:
        slots = layout.stack_slots(both_idx, arrays["step_in_episode"])
        both = mirror.gather(slots).reshape(2 * b, *layout.obs_shape)
        return _with_small_fields(both[:b], both[b:], arrays, extras, idx)
    # One gather for obs and next_obs: a single output allocation is reused by malloc across
    # calls, while two live ones each got fresh pages (measured 1 ms vs 5-8 ms at B=128, 84px).
    # The halves are disjoint contiguous blocks, so obs and next_obs never alias.
    both = gather_obs(layout, arrays["frames"], arrays["step_in_episode"], both_idx)
    return _with_small_fields(
        torch.from_numpy(both[:b]), torch.from_numpy(both[b:]), arrays, extras, idx
    )


def _with_small_fields(
    obs: torch.Tensor,
    next_obs: torch.Tensor,
    arrays: dict[str, np.ndarray],
    extras: dict[str, np.ndarray],
    idx: np.ndarray,
) -> dict[str, torch.Tensor]:
    """The batch dict: the observations as given, the per-transition fields from the host."""
    batch = {
        "obs": obs,
        "action": torch.from_numpy(arrays["action"][idx]),
        "reward": torch.from_numpy(arrays["reward"][idx]),
        "next_obs": next_obs,
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
