"""The replay buffer's checkpoint format: ``meta.json`` parsed and checked, and the files it implies.

A checkpoint is a directory of ``.npy`` files, one per array (the filled prefix of the ring), plus
``meta.json`` holding :meth:`ReplayDataModule.state_dict` (see
:mod:`covr_lightning.data.array_dir`). There is one format; any other is a foreign or corrupt
checkpoint that the user replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from covr_lightning.data.array_dir import RESUME_FIX
from covr_lightning.data.replay_layout import ExtraField, RingLayout
from covr_lightning.errors import ConfigError

FORMAT_VERSION = 2


@dataclass(frozen=True)
class ReplayState:
    """A parsed, range-checked ``meta.json`` (nothing compared with a buffer yet).

    Attributes:
        allocated: Whether the saved buffer was allocated.
        layout: Capacity, frame and action shapes, stack and streams it was allocated with.
        extras: Declared extra fields by name.
        size: Filled slots over all streams.
        extent: One past the highest filled slot (rows of every saved array).
        pointers: Per-stream ``(heads, num_written, cur, cur_step)``, each ``(num_streams,)``.
        rng: The sampler's bit generator, restored.
    """

    allocated: bool
    layout: RingLayout
    extras: dict[str, ExtraField]
    size: int
    extent: int
    pointers: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    rng: np.random.BitGenerator


def parse_state(state: Any) -> ReplayState:
    """Parse and range-check a :meth:`ReplayDataModule.state_dict` without changing anything.

    Args:
        state: The dict read from ``meta.json`` (or given to ``load_state_dict``).

    Returns:
        The parsed state.

    Raises:
        ConfigError: If the state is malformed, of another format, or its pointers are out of
            range (a corrupt or foreign checkpoint).
    """
    try:
        version = int(state["version"])
        layout = RingLayout(
            capacity=int(state["capacity"]),
            frame_shape=tuple(int(s) for s in state["frame_shape"]),
            frame_dtype=np.dtype(state["frame_dtype"]),
            frame_stack=int(state["frame_stack"]),
            action_shape=tuple(int(s) for s in state["action_shape"]),
            num_streams=int(state["num_streams"]),
        )
        extras = {
            str(name): ExtraField(
                tuple(int(s) for s in e["shape"]), np.dtype(e["dtype"]).name, e["fill"]
            )
            for name, e in state["extras"].items()
        }
        pointers = tuple(
            np.asarray(state[k], dtype=np.int64).reshape(-1)
            for k in ("heads", "num_written", "cur", "cur_step")
        )
        rng = np.random.PCG64()
        rng.state = state["rng"]
        parsed = ReplayState(
            allocated=bool(state["allocated"]),
            layout=layout,
            extras=extras,
            size=int(state["size"]),
            extent=int(state["extent"]),
            pointers=pointers,
            rng=rng,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"replay state is malformed ({err!r})", RESUME_FIX) from err
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"replay state has format version {version}, expected {FORMAT_VERSION} "
            "(a foreign or corrupt checkpoint)",
            RESUME_FIX,
        )
    cap, streams = layout.capacity, layout.num_streams
    heads, written, cur, cur_step = pointers
    if not (
        streams >= 1
        and all(len(p) == streams for p in pointers)
        and np.all((heads >= 0) & (heads < cap // streams))
        and np.all(written >= 0)
        and 0 <= parsed.size <= parsed.extent <= cap
        and np.all((cur >= -1) & (cur < cap))
        and np.all(cur_step >= 0)
    ):
        raise ConfigError(
            f"replay state has out-of-range pointers {[p.tolist() for p in pointers]}",
            RESUME_FIX,
        )
    return parsed


def expected_files(state: ReplayState) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{file name: (shape, dtype)}`` of every array a checkpoint with this state holds."""
    layout, rows = state.layout, state.extent
    expected = {
        "frames": ((rows, *layout.frame_shape), layout.frame_dtype),
        "step_in_episode": ((rows,), np.dtype(np.int64)),
        "valid": ((rows,), np.dtype(bool)),
        "action": ((rows, *layout.action_shape), np.dtype(np.float32)),
        "reward": ((rows,), np.dtype(np.float32)),
        "terminated": ((rows,), np.dtype(bool)),
    }
    for name, spec in state.extras.items():
        expected[f"extra_{name}"] = ((rows, *spec.shape), np.dtype(spec.dtype))
    return expected


def check_compatible(
    state: ReplayState,
    capacity: int,
    layout: RingLayout | None,
    extras: dict[str, ExtraField],
) -> None:
    """Check a parsed state against the buffer that is to resume it.

    Args:
        state: From :func:`parse_state`.
        capacity: The buffer's capacity.
        layout: The buffer's layout if it is allocated, else None.
        extras: The buffer's declared extra fields.

    Raises:
        ConfigError: If capacity, layout or a declared extra differ from the checkpoint's.
    """
    cap = state.layout.capacity
    if cap != capacity:
        raise ConfigError(
            f"replay checkpoint has capacity {cap}, this buffer {capacity}",
            f"construct ReplayDataModule(capacity={cap}) to resume it",
        )
    if layout is not None and state.allocated and state.layout != layout:
        raise ConfigError(
            f"replay checkpoint holds {state.layout.describe()}, this buffer was allocated "
            f"for {layout.describe()}",
            "resume with the environment and run.num_envs the checkpoint was recorded with, "
            "or start fresh",
        )
    for name, spec in state.extras.items():
        old = extras.get(name)
        if old is not None and old.to_json() != spec.to_json():
            raise ConfigError(
                f"replay checkpoint extra {name!r} is {spec.to_json()}, declared {old.to_json()}",
                RESUME_FIX,
            )
    missing = sorted(set(extras) - set(state.extras))
    if missing:
        raise ConfigError(f"replay checkpoint lacks declared extras {missing}", RESUME_FIX)
