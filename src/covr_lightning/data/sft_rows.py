"""D_f's storage: growable row arrays of frames, actions and the per-row fields.

A row is one agent step the VLM could learn from: the VLM-sized RGB frame (uint8 ``(H, W, 3)``),
the policy's action a_r (float32 ``(A,)``) and the fields of
:data:`~covr_lightning.data.sft_checkpoint.ROW_FIELDS`. The first row of a round fixes the frame
and action shapes; arrays double as rows arrive, up to ``max_rows``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from covr_lightning.data.sft_checkpoint import ROW_FIELDS

_FIRST_CAPACITY = 64  # rows allocated at first; doubled as D_f grows, up to max_rows


def _resized(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    out = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    out[:used] = array[:used]
    return out


def read_only(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that cannot be written through."""
    view = array.view()
    view.flags.writeable = False
    return view


class RowStore:
    """The rows of D_f (no segment bookkeeping: :class:`SFTDataModule` does that).

    Args:
        max_rows: Most rows held; the caller stops appending there.
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.clear()

    def clear(self) -> None:
        """Drop every row (arrays are released, not kept)."""
        self.size = 0
        self.frames = np.zeros((0, 0, 0, 3), dtype=np.uint8)
        self.actions = np.zeros((0, 0), dtype=np.float32)
        self.fields = {name: np.zeros(0, dtype=dtype) for name, dtype in ROW_FIELDS.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every stored array by file name (rows past :attr:`size` are unused)."""
        return {"frames": self.frames, "actions": self.actions, **self.fields}

    def view(self, name: str) -> np.ndarray:
        """A read-only view of the stored rows of one array (``frames``, ``actions`` or a field)."""
        return read_only(self.arrays()[name][: self.size])

    def replace(self, stored: dict[str, np.ndarray], rows: int) -> None:
        """Take over arrays read from a checkpoint (one per :meth:`arrays` name)."""
        self.frames = stored.pop("frames")
        self.actions = stored.pop("actions")
        self.fields = stored
        self.size = rows

    def check_row(self, frame: Any, action: Any) -> tuple[np.ndarray, np.ndarray]:
        """A row's frame and action as arrays, checked against the rows already stored.

        Args:
            frame: uint8 ``(H, W, 3)``.
            action: ``(A,)``, stored as float32.

        Returns:
            ``(frame, action)`` ready for :meth:`append`.

        Raises:
            ValueError: If the frame or action has the wrong shape or dtype, or differs in shape
                from the rows already stored.
        """
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        action = np.asarray(action, dtype=np.float32)
        if action.ndim != 1:
            raise ValueError(f"action must be one unbatched vector (A,), got shape {action.shape}")
        if self.size > 0 and (
            frame.shape != self.frames.shape[1:] or action.shape[0] != self.actions.shape[1]
        ):
            raise ValueError(
                f"row has frame {frame.shape} and action {action.shape}; D_f holds frames "
                f"{self.frames.shape[1:]} and actions ({self.actions.shape[1]},)"
            )
        return frame, action

    def append(
        self,
        frame: np.ndarray,
        action: np.ndarray,
        *,
        reward: float,
        replay_index: int,
        entropy: float,
        segment_step: int,
    ) -> int:
        """Store one row (checked by :meth:`check_row`); its return-to-go is NaN until its segment ends.

        Args:
            frame: uint8 ``(H, W, 3)``.
            action: float32 ``(A,)``.
            reward: Immediate reward of the step.
            replay_index: The step's transition in the replay buffer (-1 if unknown).
            entropy: Policy entropy when the step was taken.
            segment_step: Position of the step inside its episode segment.

        Returns:
            The row's index.
        """
        self._grow(frame.shape, action.shape[0])
        i = self.size
        self.frames[i] = frame
        self.actions[i] = action
        self.fields["rewards"][i] = reward
        self.fields["returns"][i] = math.nan  # known when the segment ends
        self.fields["truncated"][i] = False
        self.fields["replay_indices"][i] = replay_index
        self.fields["entropies"][i] = entropy
        self.fields["segment_steps"][i] = segment_step
        self.size += 1
        return i

    def _grow(self, frame_shape: tuple[int, ...], action_dim: int) -> None:
        """Make room for one more row; the first row of a round fixes the frame and action shapes."""
        if self.size == 0 and (
            self.frames.shape[1:] != frame_shape or self.actions.shape[1] != action_dim
        ):
            self.frames = np.zeros((0, *frame_shape), dtype=np.uint8)
            self.actions = np.zeros((0, action_dim), dtype=np.float32)
        capacity = len(self.frames)
        if self.size < capacity:
            return
        # Doubling keeps appends amortised O(1) without reserving max_rows frames up front.
        new_capacity = min(max(2 * capacity, _FIRST_CAPACITY), self.max_rows)
        self.frames = _resized(self.frames, new_capacity, self.size)
        self.actions = _resized(self.actions, new_capacity, self.size)
        self.fields = {k: _resized(v, new_capacity, self.size) for k, v in self.fields.items()}
