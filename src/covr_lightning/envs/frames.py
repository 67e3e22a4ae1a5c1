"""Frame stacking shared by the pixel envs: the last k frames, stacked on the channel axis."""

from __future__ import annotations

from collections import deque

import numpy as np


class FrameStack:
    """The last ``size`` frames of an episode, as DrQ / RAD-style envs return them.

    After :meth:`reset` the stack holds ``size`` copies of the first frame, which is what the replay
    buffer assumes when it rebuilds stacks by index (``data/replay.py``).

    Args:
        size: Frames per observation (1: the newest frame alone).
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._frames: deque[np.ndarray] = deque(maxlen=self.size)

    def reset(self, frame: np.ndarray) -> None:
        """Start an episode: fill the stack with ``frame``."""
        self._frames.clear()
        self._frames.extend([frame] * self.size)

    def push(self, frame: np.ndarray) -> None:
        """Add the newest frame (the oldest drops out)."""
        self._frames.append(frame)

    @property
    def newest(self) -> np.ndarray | None:
        """The newest frame, or ``None`` before the first one."""
        return self._frames[-1] if self._frames else None

    def observation(self) -> np.ndarray:
        """A fresh array: ``(size * C, ...)`` (the newest frame alone when ``size`` is 1)."""
        if self.size == 1:
            return self._frames[-1].copy()
        return np.concatenate(self._frames, axis=0)
