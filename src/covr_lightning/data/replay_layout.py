"""Where the replay buffer keeps things: the ring of slots per stream and the declared fields.

One ring of ``capacity`` slots holds one frame per slot. With several envs (``num_streams`` > 1,
one stream per env of a vectorised loop) each stream is its own ring of
``capacity // num_streams`` slots, interleaved so that stream ``s``'s position ``p`` is slot
``p * num_streams + s``. Since the streams fill at about the same pace, the filled slots stay close
to a prefix of the arrays, which is what a checkpoint writes. With one stream the layout is the
plain ring.

The stack of slot ``i`` is ``frames[i - k]`` for ``k = stack-1 .. 0`` with ``k`` clamped to the
episode's first frame, which is exactly what a frame-stacking env returns after ``reset`` (its
stack starts as copies of the first frame). The successor ``o_{t+1}`` of slot ``i`` is the next
position of the same stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# Keys of a sampled batch plus the names of the internal arrays; extras may not reuse them.
CORE_KEYS = frozenset(
    {"obs", "next_obs", "action", "reward", "terminated", "frames", "step_in_episode", "valid"}
)


@dataclass(frozen=True)
class ExtraField:
    """A per-transition field declared by name (COVR adds ``prior`` (A,) float32, ``prior_mask`` () bool).

    Attributes:
        shape: Shape of one transition's value, e.g. ``(A,)`` or ``()``.
        dtype: Numpy dtype (or its name) the field is stored and sampled as.
        fill: Value stored when ``add`` is called without this field.
    """

    shape: tuple[int, ...]
    dtype: np.dtype | str
    fill: float | bool = 0

    @classmethod
    def declared(
        cls, name: str, shape: tuple[int, ...] | int, dtype: np.dtype | str, fill: float | bool
    ) -> ExtraField:
        """The spec of a field declared as ``name``, with a JSON-ready shape, dtype and fill.

        Raises:
            ValueError: If the name is not an identifier or clashes with a core key.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"replay extra name {name!r} is not an identifier ([A-Za-z0-9_])")
        if name in CORE_KEYS:
            raise ValueError(
                f"replay extra {name!r} clashes with a core key; pick a name not in "
                f"{sorted(CORE_KEYS)}"
            )
        shape = (
            (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
        )
        kind = np.dtype(dtype).kind
        # Plain Python fill so that the spec is JSON-ready (state_dict, meta.json).
        fill = bool(fill) if kind == "b" else int(fill) if kind in "iu" else float(fill)
        return cls(shape=shape, dtype=np.dtype(dtype).name, fill=fill)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (shape as a list, dtype by name)."""
        return {"shape": list(self.shape), "dtype": np.dtype(self.dtype).name, "fill": self.fill}


@dataclass(frozen=True)
class RingLayout:
    """What an allocation fixes, and the slot arithmetic that follows from it.

    Attributes:
        capacity: Slots over all streams.
        frame_shape: One frame, ``(C, H, W)`` for pixels or ``(D,)`` for state vectors.
        frame_dtype: Frame dtype (uint8 for pixels, float32 for state).
        frame_stack: Frames per observation.
        action_shape: Shape of one action, e.g. ``(A,)``.
        num_streams: Envs writing at once, one ring each.
    """

    capacity: int
    frame_shape: tuple[int, ...] = ()
    frame_dtype: np.dtype = np.dtype("uint8")
    frame_stack: int = 1
    action_shape: tuple[int, ...] = ()
    num_streams: int = 1

    @property
    def stream_capacity(self) -> int:
        """Slots of one stream's ring."""
        return self.capacity // self.num_streams

    @property
    def obs_shape(self) -> tuple[int, ...]:
        """A stacked observation: ``(stack*C, H, W)`` or ``(stack*D,)``."""
        return (self.frame_stack * self.frame_shape[0], *self.frame_shape[1:])

    def describe(self) -> str:
        """The layout in words, for error messages."""
        return (
            f"frames {self.frame_shape} {self.frame_dtype} x{self.frame_stack}, actions "
            f"{self.action_shape}, {self.num_streams} stream(s)"
        )

    def newest_frame(self, obs: np.ndarray, what: str) -> np.ndarray:
        """The newest frame of a stacked observation (its last ``C`` channels / ``D`` entries).

        Raises:
            ValueError: If ``obs`` is not one stacked observation of this layout, or is a float
                copy of integer frames.
        """
        obs = np.asarray(obs)
        if obs.shape != self.obs_shape:
            raise ValueError(
                f"{what} has shape {obs.shape}, replay expects {self.obs_shape} "
                "(the env's stacked observation, unchanged)"
            )
        if self.frame_dtype.kind in "ui" and obs.dtype.kind not in "ui":
            raise ValueError(
                f"{what} has dtype {obs.dtype}, replay stores {self.frame_dtype} frames "
                "(pass the env's uint8 observation, not a normalised float copy)"
            )
        return obs[-self.frame_shape[0] :]

    def slot(self, position: np.ndarray | int, stream: np.ndarray | int) -> np.ndarray | int:
        """Slot of a stream's ring position (positions wrap within the stream)."""
        return (position % self.stream_capacity) * self.num_streams + stream

    def successors(self, idx: np.ndarray) -> np.ndarray:
        """``(B,)`` slots of the next position in each slot's stream (where ``o_{t+1}`` lives)."""
        n = self.num_streams
        return self.slot(idx // n + 1, idx % n)

    def stack_slots(self, idx: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Slots of each index's frame stack, oldest first, clamped at the episode's first frame.

        Args:
            idx: ``(B,)`` slots.
            step: ``(capacity,)`` position in its episode of every slot's frame.

        Returns:
            ``(B, stack)`` slots: ``idx - min(stack-1-k, step[idx])`` for ``k = 0..stack-1``.
        """
        back = np.arange(self.frame_stack - 1, -1, -1)  # (stack,) = stack-1 .. 0
        back = np.minimum(back[None, :], step[idx][:, None])
        n = self.num_streams
        return self.slot(idx[:, None] // n - back, idx[:, None] % n)
