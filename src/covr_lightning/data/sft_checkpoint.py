"""D_f's checkpoint format: ``meta.json`` parsed and checked, and the row arrays it implies.

A checkpoint is a directory of ``.npy`` files, one per stored array, plus ``meta.json`` holding
:meth:`SFTDataModule.state_dict` (see :mod:`covr_lightning.data.array_dir`). The built SFT set is
not saved: it is rebuilt after loading. There is one format; any other is a foreign or corrupt
checkpoint that the user replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from covr_lightning.data.array_dir import RESUME_FIX
from covr_lightning.errors import ConfigError

FORMAT_VERSION = 2
# Per-row arrays besides frames and actions, with their dtypes (also the .npy file names).
ROW_FIELDS = {
    "rewards": np.dtype(np.float64),
    "returns": np.dtype(np.float64),
    "truncated": np.dtype(bool),
    "replay_indices": np.dtype(np.int64),
    "entropies": np.dtype(np.float64),
    "segment_steps": np.dtype(np.int64),
}


@dataclass(frozen=True)
class SFTState:
    """A parsed, range-checked ``meta.json``.

    Attributes:
        rows: Rows of D_f.
        frame_shape: ``(H, W, 3)`` of every frame.
        action_dim: A of every action.
        dropped_rows: Rows dropped this round over ``max_rows``.
        open_segments: Per stream, the rewards of every step of its open segment and the rows it
            stored so far.
        rng: The module's bit generator, restored.
    """

    rows: int
    frame_shape: tuple[int, ...]
    action_dim: int
    dropped_rows: int
    open_segments: dict[int, tuple[list[float], list[int]]]
    rng: np.random.BitGenerator


def parse_state(state: Any) -> SFTState:
    """Parse and range-check a :meth:`SFTDataModule.state_dict` without changing anything.

    Args:
        state: The dict read from ``meta.json`` (or given to ``load_state_dict``).

    Returns:
        The parsed state.

    Raises:
        ConfigError: If the state is malformed, of another format, or out of range (a corrupt or
            foreign checkpoint).
    """
    try:
        version = int(state["version"])
        rng = np.random.PCG64()
        rng.state = state["rng"]
        parsed = SFTState(
            rows=int(state["rows"]),
            frame_shape=tuple(int(s) for s in state["frame_shape"]),
            action_dim=int(state["action_dim"]),
            dropped_rows=int(state["dropped_rows"]),
            open_segments={
                int(k): ([float(r) for r in v["rewards"]], [int(i) for i in v["rows"]])
                for k, v in state["open_segments"].items()
            },
            rng=rng,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"SFT state is malformed ({err!r})", RESUME_FIX) from err
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"SFT state has format version {version}, expected {FORMAT_VERSION} "
            "(a foreign or corrupt checkpoint)",
            RESUME_FIX,
        )
    if (
        parsed.rows < 0
        or parsed.dropped_rows < 0
        or parsed.action_dim < 0
        or len(parsed.frame_shape) != 3
        or parsed.frame_shape[2] != 3
    ):
        raise ConfigError(
            f"SFT state has out-of-range counts or shapes (rows {parsed.rows}, frames "
            f"{parsed.frame_shape}, action_dim {parsed.action_dim})",
            RESUME_FIX,
        )
    return parsed


def check_open_segments(state: SFTState, segment_steps: np.ndarray) -> None:
    """Check that every open segment's rows exist and lie within its recorded steps.

    Args:
        state: From :func:`parse_state`.
        segment_steps: ``(rows,)`` position of each row inside its segment.

    Raises:
        ConfigError: If an open segment does not fit the rows (a corrupt checkpoint).
    """
    for stream, (rewards, rows) in state.open_segments.items():
        if rows and (
            min(rows) < 0 or max(rows) >= state.rows or segment_steps[rows].max() >= len(rewards)
        ):
            raise ConfigError(
                f"SFT state has an open segment of {len(rewards)} steps (stream {stream}) "
                f"that does not fit its {state.rows} rows",
                RESUME_FIX,
            )


def expected_files(state: SFTState) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{file name: (shape, dtype)}`` of every array a checkpoint with this state holds."""
    rows = state.rows
    expected = {
        "frames": ((rows, *state.frame_shape), np.dtype(np.uint8)),
        "actions": ((rows, state.action_dim), np.dtype(np.float32)),
    }
    expected.update({name: ((rows,), dtype) for name, dtype in ROW_FIELDS.items()})
    return expected
