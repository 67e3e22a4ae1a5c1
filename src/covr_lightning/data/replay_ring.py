"""The replay buffer's storage: one ring of slots per stream, its arrays and write pointers.

A slot holds the newest frame of one observation ``o_t`` and its position in the episode; once the
transition from ``o_t`` is recorded, the same slot holds ``a_t, r_t, terminated_t`` and every
declared extra. ``o_{t+1}`` lives in the stream's next slot.

Validity bookkeeping: a boolean ``valid`` array, one entry per slot, says whether the slot's
transition may be sampled. ``valid[i]`` becomes True when the successor of ``i`` is written; it
becomes False when slot ``i`` itself is overwritten, or when a slot its stack or its successor's
stack needs (``i - min(step_i, stack-1) .. i + 1``) is overwritten. Because each stream's ring is
written in order, a write at position ``j`` can only break positions ``j + d`` with
``1 <= d <= stack-1`` and ``step >= d``, so each write costs O(stack).
"""

from __future__ import annotations

import numpy as np

from covr_lightning.data.replay_device import DeviceFrames
from covr_lightning.data.replay_layout import ExtraField, RingLayout


class ReplayRing:
    """The arrays and per-stream pointers of an allocated replay buffer (no input checks).

    Arrays come from ``np.zeros`` (lazily committed pages), so RAM grows as slots fill.

    Args:
        layout: Capacity, shapes, stack and streams.
        extras: The declared extra fields by name.
    """

    def __init__(self, layout: RingLayout, extras: dict[str, ExtraField]) -> None:
        cap = layout.capacity
        self.layout = layout
        self.frames = np.zeros((cap, *layout.frame_shape), dtype=layout.frame_dtype)
        self.step = np.zeros(cap, dtype=np.int64)  # step_in_episode of the slot's frame
        self.valid = np.zeros(cap, dtype=bool)
        self.action = np.zeros((cap, *layout.action_shape), dtype=np.float32)
        self.reward = np.zeros(cap, dtype=np.float32)
        self.terminated = np.zeros(cap, dtype=bool)
        self.specs: dict[str, ExtraField] = {}
        self.extras: dict[str, np.ndarray] = {}
        for name, spec in extras.items():
            self.add_extra(name, spec)
        n = layout.num_streams
        self.heads = np.zeros(n, np.int64)  # next position to write, per stream
        self.num_written = np.zeros(n, np.int64)  # frames written per stream (monotone)
        self.cur = np.full(n, -1, np.int64)  # slot of each stream's last o_t; -1: no episode open
        self.cur_step = np.zeros(n, np.int64)  # step_in_episode of that o_t
        self.mirror: DeviceFrames | None = None  # the frames on the training device, if kept

    @classmethod
    def unallocated(cls) -> ReplayRing:
        """An empty one-stream ring of no slots: the pointers of a buffer never allocated."""
        return cls(RingLayout(0, frame_shape=(1,)), {})

    def pointers(self) -> dict[str, np.ndarray]:
        """The per-stream write pointers by name (``(num_streams,)`` int64 each)."""
        return {
            "heads": self.heads,
            "num_written": self.num_written,
            "cur": self.cur,
            "cur_step": self.cur_step,
        }

    def set_pointers(
        self, heads: np.ndarray, num_written: np.ndarray, cur: np.ndarray, cur_step: np.ndarray
    ) -> None:
        """Restore the pointers saved by :meth:`pointers` (copied)."""
        self.heads, self.num_written = heads.copy(), num_written.copy()
        self.cur, self.cur_step = cur.copy(), cur_step.copy()

    def add_extra(self, name: str, spec: ExtraField) -> None:
        """Allocate an extra field's array, filled with its ``fill`` value."""
        self.specs[name] = spec
        self.extras[name] = np.full(
            (self.layout.capacity, *spec.shape), spec.fill, dtype=spec.dtype
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Every stored array by file name (extras prefixed with ``extra_``)."""
        arrays = {
            "frames": self.frames,
            "step_in_episode": self.step,
            "valid": self.valid,
            "action": self.action,
            "reward": self.reward,
            "terminated": self.terminated,
        }
        arrays.update({f"extra_{name}": arr for name, arr in self.extras.items()})
        return arrays

    @property
    def size(self) -> int:
        """Filled slots over all streams (<= capacity)."""
        return int(np.minimum(self.num_written, self.layout.stream_capacity).sum())

    @property
    def extent(self) -> int:
        """One past the highest filled slot: the prefix of the arrays a checkpoint writes."""
        filled = np.minimum(self.num_written, self.layout.stream_capacity)
        streams = np.flatnonzero(filled)
        if len(streams) == 0:
            return 0
        return int(((filled[streams] - 1) * self.layout.num_streams + streams).max() + 1)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of transitions by id, and whether each is still stored.

        An id is ``w * num_streams + stream`` with ``w`` the stream's frame write counter, so
        slot = id % capacity; a transition is gone once its slot (or a frame of its stack) has
        been overwritten.

        Args:
            ids: ``(N,)`` transition ids from :meth:`append`.

        Returns:
            ``(slots, present)``, both ``(N,)``.
        """
        n, per_stream = self.layout.num_streams, self.layout.stream_capacity
        slots = ids % (n * per_stream)
        written = self.num_written[ids % n]
        present = (ids >= 0) & (written <= ids // n + per_stream) & self.valid[slots]
        return slots, present

    def write_frame(self, frame: np.ndarray, step: int, stream: int) -> int:
        """Write one frame at a stream's head, invalidating transitions that needed the old frame.

        Returns:
            The slot written.
        """
        slot = self.layout.slot
        head = int(self.heads[stream])
        j = slot(head, stream)
        self.valid[j] = False
        # A position p+d (d >= 1) older than p needs positions down to (p+d) - min(step, stack-1);
        # the old frame at p is among them iff d <= min(step, stack-1). Further ones cannot reach p.
        for d in range(1, self.layout.frame_stack):
            k = slot(head + d, stream)
            if self.valid[k] and self.step[k] >= d:
                self.valid[k] = False
        self.frames[j] = frame
        if self.mirror is not None:
            self.mirror.write(j, frame)
        self.step[j] = step
        self.action[j] = 0
        self.reward[j] = 0
        self.terminated[j] = False
        for name, spec in self.specs.items():
            self.extras[name][j] = spec.fill
        self.heads[stream] = (head + 1) % self.layout.stream_capacity
        self.num_written[stream] += 1
        return j

    def start(self, frame: np.ndarray, stream: int) -> None:
        """Open an episode in a stream with its first frame."""
        self.cur[stream] = self.write_frame(frame, 0, stream)
        self.cur_step[stream] = 0

    def append(
        self,
        frame: np.ndarray,
        action: np.ndarray,
        reward: float,
        terminated: bool,
        extras: dict[str, object],
        stream: int,
    ) -> int:
        """Record the transition from a stream's open ``o_t`` and store ``o_{t+1}``'s frame.

        Returns:
            The transition's id: the stream's write counter of slot ``o_t``'s frame, interleaved
            like the slots, so ``id % capacity`` is its slot.
        """
        i = int(self.cur[stream])
        step = int(self.cur_step[stream])
        # The successor is written first: writing it resets slot i+1's fields, never slot i's.
        succ = self.write_frame(frame, step + 1, stream)
        self.action[i] = action
        self.reward[i] = reward
        self.terminated[i] = bool(terminated)
        for name, value in extras.items():
            self.extras[name][i] = value
        # capacity >= stack + 1, so slot i's stack and slot i+1's stack are all recent frames.
        self.valid[i] = True
        if terminated:
            self.cur[stream] = -1
        else:
            self.cur[stream], self.cur_step[stream] = succ, step + 1
        return int(self.num_written[stream] - 2) * self.layout.num_streams + stream
