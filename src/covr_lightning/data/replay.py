"""Replay buffer for pixel (or state) SAC: every frame stored once, frame stacks rebuilt by index.

:class:`ReplayDataModule` is what the loop talks to: it checks the loop's calls and delegates to
the pieces of the buffer, one module each:

* :mod:`~covr_lightning.data.replay_layout`: the ring of slots per stream (one per env) and the
  slot arithmetic of stacks and successors;
* :mod:`~covr_lightning.data.replay_ring`: the arrays, the write pointers and which slots are
  sampleable;
* :mod:`~covr_lightning.data.replay_sampling`: uniform sampling and frame-stack gathering;
* :mod:`~covr_lightning.data.replay_checkpoint`: the checkpoint format (a directory of ``.npy``
  files plus ``meta.json`` holding :meth:`ReplayDataModule.state_dict`).

Memory is one frame per step (DrQ-v2 stores each frame ``stack`` times).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type
from torch.utils.data import DataLoader

from covr_lightning.data.array_dir import RESUME_FIX, load_array_dir, read_meta, save_array_dir
from covr_lightning.data.replay_checkpoint import (
    FORMAT_VERSION,
    ReplayState,
    check_compatible,
    expected_files,
    parse_state,
)
from covr_lightning.data.replay_device import DeviceFrames
from covr_lightning.data.replay_layout import ExtraField, RingLayout
from covr_lightning.data.replay_ring import ReplayRing
from covr_lightning.data.replay_sampling import EndlessSamples, draw_slots, gather_batch
from covr_lightning.errors import ConfigError

__all__ = ["ExtraField", "ReplayCapacity", "ReplayDataModule"]

# A ring needs room for a stack and its successor: at least 2 slots (more is checked at allocate).
ReplayCapacity = restricted_number_type("ReplayCapacity", int, (">=", 2))


class ReplayDataModule(lightning.LightningDataModule):
    """Circular replay of transitions with frames stored once and stacks rebuilt by index.

    Usage: ``allocate`` (or ``load``) once, then per episode ``start_episode(obs)`` after
    ``env.reset`` and ``add(action, reward, next_obs, terminated)`` after every ``env.step``.
    With several envs, ``allocate(..., num_streams=N)`` and pass ``stream=i`` to both.

    The argument types are checked when a recipe is parsed; built directly in Python, the values
    are taken as given.

    Args:
        capacity: Number of slots, i.e. frames (= transitions) kept before the oldest are
            overwritten; at least 2.
        batch_size: Default batch size of :meth:`sample`.
        seed: Seed of the sampler's ``np.random.Generator`` (its state is part of ``state_dict``).
        frames_on_device: Keep a copy of the stored frames on the training device (the
            ``device`` given to :meth:`allocate`) and gather batches there, so an update on a GPU
            copies no frames from the host (:mod:`~covr_lightning.data.replay_device`). Costs the
            frames' memory a second time; on a CPU run it gains nothing.
    """

    def __init__(
        self,
        capacity: ReplayCapacity = 100_000,
        batch_size: PositiveInt = 128,
        seed: NonNegativeInt = 0,
        frames_on_device: bool = False,
    ) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.frames_on_device = bool(frames_on_device)
        self._device: torch.device | None = None  # from allocate: where a frame copy would live
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._extra_specs: dict[str, ExtraField] = {}
        self.layout = RingLayout(self.capacity)  # the allocated layout once allocate has run
        self._ring: ReplayRing | None = None  # the storage, from allocate on
        self.last_transition_id = -1  # id of the newest transition (see transitions_at)

    # ------------------------------------------------------------------ allocation
    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One stored frame (``()`` before ``allocate``)."""
        return self.layout.frame_shape

    @property
    def frame_dtype(self) -> np.dtype:
        """Dtype of the stored frames."""
        return self.layout.frame_dtype

    @property
    def frame_stack(self) -> int:
        """Frames per observation."""
        return self.layout.frame_stack

    @property
    def action_shape(self) -> tuple[int, ...]:
        """Shape of one action."""
        return self.layout.action_shape

    @property
    def num_streams(self) -> int:
        """Envs writing at once, one ring each."""
        return self.layout.num_streams

    @property
    def extras(self) -> dict[str, ExtraField]:
        """The declared extra fields by name."""
        return dict(self._extra_specs)

    def declare_extra(
        self,
        name: str,
        shape: tuple[int, ...] | int = (),
        dtype: np.dtype | str = "float32",
        fill: float | bool = 0,
    ) -> None:
        """Declare a per-transition field; allocates it now if the buffer is already allocated.

        Declaring the same field twice with the same spec is a no-op (resume after ``load``).

        Args:
            name: Batch key of the field (letters, digits, underscores).
            shape: Shape of one transition's value.
            dtype: Storage dtype.
            fill: Value stored for transitions added without this field (and for existing ones).

        Raises:
            ValueError: If the name is invalid, clashes with a core key, or was declared
                differently.
        """
        spec = ExtraField.declared(name, shape, dtype, fill)
        old = self._extra_specs.get(name)
        if old is not None:
            if old.to_json() != spec.to_json():
                raise ValueError(
                    f"replay extra {name!r} already declared as {old.to_json()}, now "
                    f"{spec.to_json()}"
                )
            return
        self._extra_specs[name] = spec
        if self._ring is not None:
            self._ring.add_extra(name, spec)

    def allocate(
        self,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype | str | type,
        frame_stack: int,
        action_shape: tuple[int, ...],
        num_streams: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate the ring. Memory is ``capacity`` frames plus small per-transition arrays.

        Allocating again with the same layout is a no-op.

        Args:
            frame_shape: One frame, ``(C, H, W)`` for pixels or ``(D,)`` for state vectors.
            frame_dtype: Frame dtype (uint8 for pixels, float32 for state).
            frame_stack: Frames per observation; observations are ``(stack*C, H, W)`` /
                ``(stack*D,)``.
            action_shape: Shape of one action, e.g. ``(A,)``.
            num_streams: Envs writing at once (one open episode each); each gets
                ``capacity // num_streams`` slots.
            device: The training device; with ``frames_on_device`` the frames are mirrored
                there and :meth:`sample` returns ``obs``/``next_obs`` on it.

        Raises:
            ConfigError: If a stream's share of the capacity is below frame_stack + 1 (the
                recipe's ``replay.capacity`` is too small for the env and ``run.num_envs``).
            RuntimeError: If already allocated with another layout.
            ValueError: If ``num_streams`` or ``frame_stack`` is below 1 or ``frame_shape`` is
                empty.
            ConfigError: With ``frames_on_device``, if the frames do not fit on the device.
        """
        if device is not None:
            self._device = torch.device(device)
        layout = RingLayout(
            capacity=self.capacity,
            frame_shape=tuple(int(s) for s in frame_shape),
            frame_dtype=np.dtype(frame_dtype),
            frame_stack=int(frame_stack),
            action_shape=tuple(int(s) for s in action_shape),
            num_streams=int(num_streams),
        )
        if self._ring is not None:
            if layout != self.layout:
                raise RuntimeError(
                    f"replay already allocated for {self.layout.describe()}; asked for "
                    f"{layout.describe()}"
                )
            return
        if layout.num_streams < 1:
            raise ValueError(f"replay num_streams must be >= 1, got {layout.num_streams}")
        if layout.frame_stack < 1 or not layout.frame_shape:
            raise ValueError(f"bad replay frame spec {layout.frame_shape} x{layout.frame_stack}")
        # A transition needs its stack (stack slots) plus the successor frame: stack + 1 live slots.
        if layout.stream_capacity < layout.frame_stack + 1:
            raise ConfigError(
                f"replay capacity {self.capacity} split over {layout.num_streams} stream(s) "
                f"cannot hold a stack of {layout.frame_stack} plus its successor",
                f"set replay.capacity >= {(layout.frame_stack + 1) * layout.num_streams}",
            )
        ring = ReplayRing(layout, self._extra_specs)
        if self.frames_on_device and self._device is not None:
            ring.mirror = DeviceFrames(ring.frames, self._device)
        self.layout = layout
        self._ring = ring
        self.last_transition_id = -1

    def _require_allocated(self, what: str) -> ReplayRing:
        if self._ring is None:
            raise RuntimeError(
                f"replay buffer used ({what}) before allocation: call allocate(frame_shape, "
                "frame_dtype, frame_stack, action_shape) or load() first"
            )
        return self._ring

    # ------------------------------------------------------------------ writing
    def _check_stream(self, stream: int) -> int:
        stream = int(stream)
        if not 0 <= stream < self.num_streams:
            raise IndexError(
                f"replay stream {stream} does not exist (allocated with {self.num_streams}; "
                "pass one stream per env, 0..num_streams-1)"
            )
        return stream

    def start_episode(self, obs: np.ndarray, stream: int = 0) -> None:
        """Store the first observation of an episode (only its newest frame is kept).

        An episode still open in the stream is abandoned: its stored transitions stay sampleable.

        Args:
            obs: Stacked observation returned by ``env.reset``: ``(stack*C, H, W)`` or ``(D,)``.
            stream: Which env's stream (0 with one env).

        Raises:
            RuntimeError: If the buffer is not allocated.
            ValueError: If ``obs`` has the wrong shape or dtype.
            IndexError: If the stream does not exist.
        """
        ring = self._require_allocated("start_episode")
        stream = self._check_stream(stream)
        ring.start(self.layout.newest_frame(obs, "start_episode obs"), stream)

    def add(
        self,
        action: Any,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        stream: int = 0,
        **extras: Any,
    ) -> None:
        """Record the transition from the last stored observation and store ``next_obs``'s newest frame.

        Args:
            action: Action taken, shape ``action_shape``.
            reward: Reward of the step (summed over the action repeat).
            next_obs: Stacked observation returned by ``env.step``.
            terminated: True only for a true termination (cuts the bootstrap); not for time limits.
            stream: Which env's stream (0 with one env).
            **extras: Values of declared extra fields; missing ones get their ``fill``.

        Raises:
            RuntimeError: If the buffer is not allocated or no episode is open in the stream
                (call ``start_episode`` after every ``env.reset``, including after a termination).
            ValueError: If an extra is undeclared or a shape or dtype is wrong.
            IndexError: If the stream does not exist.
        """
        ring = self._require_allocated("add")
        stream = self._check_stream(stream)
        if ring.cur[stream] < 0:
            raise RuntimeError(
                "replay.add called with no open episode: call start_episode(obs) after every "
                "env.reset, including after a termination"
            )
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.action_shape:
            raise ValueError(
                f"action has shape {action.shape}, replay expects {self.action_shape} "
                "(one unbatched action per add)"
            )
        for name, value in extras.items():
            spec = self._extra_specs.get(name)
            if spec is None:
                raise ValueError(
                    f"replay extra {name!r} was not declared: call declare_extra({name!r}, ...)"
                )
            if np.shape(value) != spec.shape:
                raise ValueError(
                    f"replay extra {name!r} has shape {np.shape(value)}, declared {spec.shape} "
                    "(one unbatched value per add)"
                )
        frame = self.layout.newest_frame(next_obs, "add next_obs")
        self.last_transition_id = ring.append(frame, action, reward, terminated, extras, stream)

    def update_extra(self, name: str, transition_ids: np.ndarray, value: Any) -> int:
        """Overwrite an extra of stored transitions (a prior that arrived after its transition).

        Args:
            name: A declared extra.
            transition_ids: ``(N,)`` ids (:attr:`last_transition_id` after each ``add``).
            value: One value of the extra's shape, written to every listed transition.

        Returns:
            How many of the transitions were still stored (the others are skipped).
        """
        ring = self._require_allocated("update_extra")
        slots, present = ring.find(np.asarray(transition_ids, dtype=np.int64).reshape(-1))
        ring.extras[name][slots[present]] = value
        return int(present.sum())

    # ------------------------------------------------------------------ reading
    def transitions_at(
        self, transition_ids: np.ndarray
    ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Transitions by id (:attr:`last_transition_id` after each ``add``), and which still exist.

        An id is ``w * num_streams + stream`` with ``w`` the stream's frame write counter, so
        slot = id % (stream capacity x num_streams); a transition is gone once its slot (or a frame
        of its stack) has been overwritten. Gone rows come back with whatever the slot holds now
        and ``False`` in the mask.

        Args:
            transition_ids: ``(N,)`` ids.

        Returns:
            ``(batch, present)``: a batch as from :meth:`sample` and a bool mask ``(N,)``.

        Raises:
            RuntimeError: If the buffer is not allocated.
        """
        ring = self._require_allocated("transitions_at")
        slots, present = ring.find(np.asarray(transition_ids, dtype=np.int64).reshape(-1))
        return self._batch_at(slots), present

    def __len__(self) -> int:
        """Number of sampleable transitions."""
        return 0 if self._ring is None else int(np.count_nonzero(self._ring.valid))

    @property
    def num_frames_stored(self) -> int:
        """Number of filled slots (frames kept), at most ``capacity``."""
        return 0 if self._ring is None else self._ring.size

    @property
    def frames_written(self) -> np.ndarray:
        """``(num_streams,)`` frames written per stream since allocation (a copy; zeros before it)."""
        return np.zeros(1, np.int64) if self._ring is None else self._ring.num_written.copy()

    @property
    def nbytes(self) -> int:
        """Total bytes of all allocated arrays (0 before ``allocate``)."""
        return 0 if self._ring is None else sum(a.nbytes for a in self._ring.arrays().values())

    def sample(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Sample transitions uniformly (with replacement) from the sampleable set.

        Args:
            batch_size: Rows to draw; defaults to ``self.batch_size``.

        Returns:
            CPU tensors (``obs`` and ``next_obs`` on the training device with
            ``frames_on_device``): ``obs`` and ``next_obs`` ``(B, stack*C, H, W)`` in the frame
            dtype (uint8 pixels; ``(B, D)`` for state), ``action`` ``(B, A)`` float32, ``reward`` ``(B,)``
            float32, ``terminated`` ``(B,)`` float32 0/1, and each declared extra ``(B, *shape)``.

        Raises:
            RuntimeError: If nothing is sampleable yet (or the buffer is not allocated).
        """
        b = self.batch_size if batch_size is None else int(batch_size)
        ring = self._require_allocated("sample")
        return self._batch_at(draw_slots(ring.valid, self._rng, b))

    def _batch_at(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of transitions stored at slots ``idx`` (no validity check)."""
        ring = self._require_allocated("read")
        return gather_batch(self.layout, ring.arrays(), ring.extras, idx, ring.mirror)

    def train_dataloader(self) -> DataLoader:
        """An endless loader of ``sample()`` batches (in-process: workers would copy the buffer)."""
        return DataLoader(EndlessSamples(self.sample), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ state & checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Small metadata only: shapes, pointers, declared extras and the sampler RNG state.

        The stored arrays are not included; :meth:`save` / :meth:`load` move those.

        Returns:
            A JSON-serialisable dict.
        """
        ring = self._ring or ReplayRing.unallocated()
        return {
            "version": FORMAT_VERSION,
            "capacity": self.capacity,
            "allocated": self._ring is not None,
            "frame_shape": list(self.frame_shape),
            "frame_dtype": self.frame_dtype.name,
            "frame_stack": self.frame_stack,
            "action_shape": list(self.action_shape),
            "num_streams": self.num_streams,
            "extras": {name: spec.to_json() for name, spec in self._extra_specs.items()},
            "size": ring.size,
            "extent": ring.extent,
            **{name: p.tolist() for name, p in ring.pointers().items()},
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore metadata (allocating from the recorded shapes if needed) and the sampler RNG.

        Only pointers and RNG are restored: on a fresh buffer the arrays stay empty (nothing is
        sampleable) until :meth:`load` fills them.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ConfigError: If the state is malformed or its shapes or capacity differ from this buffer.
        """
        self._apply_state(self._parse_compatible(state))

    def _parse_compatible(self, state: Any) -> ReplayState:
        """Parse a state and check it against this buffer without changing anything."""
        parsed = parse_state(state)
        layout = None if self._ring is None else self.layout
        check_compatible(parsed, self.capacity, layout, self._extra_specs)
        return parsed

    def _apply_state(self, parsed: ReplayState) -> None:
        """Apply a state returned by :meth:`_parse_compatible`."""
        for name, spec in parsed.extras.items():
            self.declare_extra(name, spec.shape, spec.dtype, spec.fill)
        self._rng = np.random.Generator(parsed.rng)
        if not parsed.allocated:
            return
        layout = parsed.layout
        self.allocate(
            layout.frame_shape,
            layout.frame_dtype,
            layout.frame_stack,
            layout.action_shape,
            layout.num_streams,
        )
        self._require_allocated("load").set_pointers(*parsed.pointers)

    def save(self, directory: str | Path) -> None:
        """Write each array's filled part to ``<directory>/<name>.npy`` and the metadata to meta.json.

        Arrays are streamed by ``np.save`` from views (no in-memory copy); ``meta.json`` is written
        last (atomically), so an interrupted save leaves a directory that :meth:`load` rejects.

        Args:
            directory: Target directory (created if missing; existing files are replaced).

        Raises:
            RuntimeError: If the buffer was never allocated.
        """
        ring = self._require_allocated("save")
        # Every filled slot lies below the extent (with one stream: exactly the first size slots).
        save_array_dir(directory, ring.arrays(), ring.extent, self.state_dict())

    def load(self, directory: str | Path) -> None:
        """Inverse of :meth:`save`; allocates from meta.json if ``allocate`` was not called.

        Every file is opened and checked (shape and dtype against meta.json) before the buffer is
        changed, so a bad checkpoint leaves the buffer as it was. Content is not checksummed: a
        bit flip inside a well-formed file goes unnoticed.

        Args:
            directory: A directory written by :meth:`save`.

        Raises:
            ConfigError: If a file is missing, truncated or corrupt, or shapes or capacity differ
                from this buffer's allocation.
        """
        parsed = self._parse_compatible(read_meta(directory, "replay"))
        if not parsed.allocated:
            raise ConfigError(f"replay checkpoint {directory} holds no buffer", RESUME_FIX)
        stored = load_array_dir(directory, expected_files(parsed), "replay", mmap=True)
        self._apply_state(parsed)
        ring = self._require_allocated("load")
        size = parsed.extent
        for name, arr in ring.arrays().items():
            arr[:size] = stored.pop(name)  # streams from the page cache into the ring
            arr[size:] = self._extra_specs[name[6:]].fill if name.startswith("extra_") else 0
        if ring.mirror is not None:
            ring.mirror.refresh(ring.frames)
