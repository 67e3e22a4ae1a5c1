"""D_f, the RL agent's experience for fine-tuning the VLM, and its filtered, weighted SFT set.

A **row** of D_f is one agent step the VLM could learn from: the VLM-sized RGB frame the agent saw
(uint8 ``(H, W, 3)``), the action the policy took there (a_r, float32 ``(A,)``), the immediate
reward, the index of the transition in the replay buffer (so the loop can ask the critic for
Q(s, a) at filter time), the policy entropy when the step was taken, the step's position inside
its episode segment, and, once the segment has ended, its discounted return-to-go.

Rows are stored only on steps where the loop passes a frame. The loop already renders a VLM-sized
frame every ``guide_every`` agent steps to ask the VLM for guidance, and hands that same frame
over; rendering a second, VLM-sized frame on every step would cost a render per step and a large
frame per row of memory. Return-to-go still uses *every* step's reward: :meth:`record_step` is
called on every step, with or without a frame, so G_t of a stored row sums the rewards of the
steps in between as well.

Return signals g (``return_signal``, see ``docs/method.md``):

- ``return_to_go`` (default): G_t = r_t + gamma G_{t+1} over the episode segment, computed by
  :meth:`SFTDataModule.end_segment`. A terminated episode ends with bootstrap 0; a segment cut by
  a time limit or by the end of a collection round is bootstrapped with the critic value the loop
  passes in (or 0), and its rows are marked ``truncated``. Rows of a segment that has not ended
  have NaN return-to-go, which EDDF never keeps: **the loop must call** :meth:`end_segment`
  **for the open segment before** :meth:`build`.
- ``immediate_reward``: r_t.
- ``q_value``: the critic's Q(s_t, a_t) at filter time, passed to :meth:`build` (one per row,
  in row order; :attr:`replay_indices` says where each row's transition lives in the replay).

:meth:`SFTDataModule.build` applies, in this order: EDDF (:func:`~covr_lightning.data.eddf.eddf_mask`)
on g of all rows, RALW (:func:`~covr_lightning.data.ralw.ralw_weights`) on g of the rows EDDF
kept, then drops the rows whose weight is 0. Each remaining row becomes one example
(frame, ``encode_target(action)``, weight). The loss normaliser N_v (rows with w > 0 in a batch)
is applied by :func:`~covr_lightning.data.ralw.ralw_loss`; since zero-weight rows are dropped
here, N_v equals the batch size.

Checkpoints (:meth:`SFTDataModule.save`) are a directory of ``.npy`` files, one per stored array,
plus ``meta.json`` holding :meth:`SFTDataModule.state_dict`, written last so that a directory
without it is never taken for a good checkpoint. The built SFT set is not saved: call
:meth:`SFTDataModule.build` again after :meth:`SFTDataModule.load`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from covr_lightning.data.array_dir import RESUME_FIX as _RESUME_FIX
from covr_lightning.data.array_dir import load_array_dir, read_meta, save_array_dir
from covr_lightning.data.eddf import EDDFMode, EntropySign, eddf_mask
from covr_lightning.data.ralw import RALWMode, ralw_weights
from covr_lightning.data.returns import ReturnSignal, discounted_return_to_go
from covr_lightning.errors import ConfigError

log = logging.getLogger(__name__)

RETURN_SIGNALS = ("return_to_go", "immediate_reward", "q_value")
EDDF_MODES = ("dynamic", "random", "top_k", "no_zscore")
EDDF_SIGNS = ("intent", "literal")
RALW_MODES = ("return", "none", "random")

_FORMAT_VERSION = 2  # 2: one open segment per stream (version 1 still loads)
_FIRST_CAPACITY = 64  # rows allocated at first; doubled as D_f grows, up to max_rows
# Per-row arrays besides frames and actions, with their dtypes (also the .npy file names).
_ROW_FIELDS = {
    "rewards": np.dtype(np.float64),
    "returns": np.dtype(np.float64),
    "truncated": np.dtype(bool),
    "replay_indices": np.dtype(np.int64),
    "entropies": np.dtype(np.float64),
    "segment_steps": np.dtype(np.int64),
}


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class _BuiltRows(Dataset):
    """The built SFT set as (frame, target, weight) items."""

    def __init__(
        self, frames: np.ndarray, indices: np.ndarray, targets: list[str], weights: np.ndarray
    ) -> None:
        self.frames, self.indices, self.targets, self.weights = frames, indices, targets, weights

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[np.ndarray, str, float]:
        # A copy: D_f's storage may be reallocated or cleared while a batch is still in use.
        return self.frames[self.indices[k]].copy(), self.targets[k], float(self.weights[k])


class _SeededShuffle(Sampler[int]):
    """A fresh permutation per epoch, drawn from the data module's generator (part of its state)."""

    def __init__(self, owner: SFTDataModule, size: int) -> None:
        self.owner, self.size = owner, size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(self.owner.rng.permutation(self.size).tolist())


class SFTDataModule(lightning.LightningDataModule):
    """D_f: rows collected during an RL round, filtered (EDDF) and weighted (RALW) into SFT batches.

    Usage per round: :meth:`record_step` on every agent step, :meth:`end_segment` at every episode
    end and once more at the end of the round, then :meth:`build`, :meth:`train_dataloader` (if
    :attr:`num_examples` > 0) for the VLM fine-tuning, and :meth:`clear`.

    Args:
        batch_size: Examples per SFT batch.
        gamma: Discount of the return-to-go, in [0, 1]; None (the recipe default) takes the
            policy's gamma when the COVR loop builds this module, else 0.99.
        return_signal: g used by EDDF and RALW: ``return_to_go``, ``immediate_reward`` or
            ``q_value``.
        eddf_mode: ``dynamic`` (EDDF), or the ablations ``random``, ``top_k``, ``no_zscore``.
        eddf_sign: Entropy convention of s(H): ``intent`` (sigmoid(-H/T)) or ``literal``.
        eddf_temperature: T in s(H), > 0.
        eddf_quantile: q of ``top_k`` (keeps the best 1 - q of rows), in [0, 1].
        ralw_mode: ``return`` (RALW), or the ablations ``none`` (all weights 1) and ``random``.
        max_rows: Most rows D_f holds in a round; further rows are dropped (and counted).
        seed: Seed of the generator used by the random ablations and by batch shuffling.

    Raises:
        ConfigError: If a value is out of range or not one of the allowed choices.
    """

    def __init__(
        self,
        *,
        batch_size: int = 8,
        gamma: float | None = None,
        return_signal: ReturnSignal = "return_to_go",
        eddf_mode: EDDFMode = "dynamic",
        eddf_sign: EntropySign = "intent",
        eddf_temperature: float = 1.0,
        eddf_quantile: float = 0.9,
        ralw_mode: RALWMode = "return",
        max_rows: int = 50_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _require_int(batch_size, "batch_size", 1)
        _require_int(max_rows, "max_rows", 1)
        _require_int(seed, "seed", 0)
        gamma = 0.99 if gamma is None else gamma
        _require_in_unit_interval(gamma, "gamma")
        _require_in_unit_interval(eddf_quantile, "eddf_quantile")
        if not (_is_real(eddf_temperature) and 0 < eddf_temperature < math.inf):
            raise ConfigError(
                f"sft.eddf_temperature must be a finite number > 0, got {eddf_temperature!r}",
                "set sft.eddf_temperature to a positive value (1.0 is the default)",
            )
        _require_choice(return_signal, "return_signal", RETURN_SIGNALS)
        _require_choice(eddf_mode, "eddf_mode", EDDF_MODES)
        _require_choice(eddf_sign, "eddf_sign", EDDF_SIGNS)
        _require_choice(ralw_mode, "ralw_mode", RALW_MODES)
        self.batch_size = int(batch_size)
        self.gamma = float(gamma)
        self.return_signal = return_signal
        self.eddf_mode = eddf_mode
        self.eddf_sign = eddf_sign
        self.eddf_temperature = float(eddf_temperature)
        self.eddf_quantile = float(eddf_quantile)
        self.ralw_mode = ralw_mode
        self.max_rows = int(max_rows)
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.last_metrics: dict[str, float] = {}
        self._reset_rows()

    # ------------------------------------------------------------------ storage
    def _reset_rows(self) -> None:
        """Empty D_f, the open segment and the built set (arrays are released, not kept)."""
        self._size = 0
        self._frames = np.zeros((0, 0, 0, 3), dtype=np.uint8)
        self._actions = np.zeros((0, 0), dtype=np.float32)
        self._fields = {name: np.zeros(0, dtype=dtype) for name, dtype in _ROW_FIELDS.items()}
        self._dropped = 0
        # Per stream (one per env of a vectorised loop): every step of its open segment, in
        # order, and the rows that segment stored so far.
        self._segment_rewards: dict[int, list[float]] = {}
        self._segment_rows: dict[int, list[int]] = {}
        self._clear_built()

    def _clear_built(self) -> None:
        self._built_indices: np.ndarray | None = None
        self._built_targets: list[str] = []
        self._built_weights = np.zeros(0)
        self._collate: Callable[[list[np.ndarray], list[str], np.ndarray], dict] | None = None

    def _grow(self, frame_shape: tuple[int, ...], action_dim: int) -> None:
        """Make room for one more row; the first row of a round fixes the frame and action shapes."""
        if self._size == 0 and (
            self._frames.shape[1:] != frame_shape or self._actions.shape[1] != action_dim
        ):
            self._frames = np.zeros((0, *frame_shape), dtype=np.uint8)
            self._actions = np.zeros((0, action_dim), dtype=np.float32)
        capacity = len(self._frames)
        if self._size < capacity:
            return
        # Doubling keeps appends amortised O(1) without reserving max_rows frames up front.
        new_capacity = min(max(2 * capacity, _FIRST_CAPACITY), self.max_rows)
        self._frames = _resized(self._frames, new_capacity, self._size)
        self._actions = _resized(self._actions, new_capacity, self._size)
        self._fields = {k: _resized(v, new_capacity, self._size) for k, v in self._fields.items()}

    # ------------------------------------------------------------------ collection
    def record_step(
        self,
        reward: float,
        *,
        frame: np.ndarray | None = None,
        action: np.ndarray | None = None,
        replay_index: int = -1,
        entropy: float = math.nan,
        stream: int = 0,
    ) -> None:
        """Record one agent step of the open episode segment; store a row if a frame is given.

        Args:
            reward: Reward of the step (every step passes it: return-to-go needs all of them).
            frame: VLM-sized RGB render, uint8 ``(H, W, 3)``; a row is stored only with it.
            action: The policy's action a_r, ``(A,)``; required together with ``frame``.
            replay_index: Index of the step's transition in the replay buffer (-1 if unknown).
            entropy: Policy entropy when the step was taken (NaN before the first update).
            stream: Which env the step came from (0 with one env); each stream has its own
                open segment.

        Raises:
            ValueError: If only one of ``frame`` and ``action`` is given, or either has the wrong
                shape or dtype, or differs in shape from the rows already stored.
        """
        rewards = self._segment_rewards.setdefault(int(stream), [])
        step = len(rewards)
        rewards.append(float(reward))
        if frame is None and action is None:
            return
        if frame is None or action is None:
            raise ValueError("record_step needs both frame and action to store a row, or neither")
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        action = np.asarray(action, dtype=np.float32)
        if action.ndim != 1:
            raise ValueError(f"action must be one unbatched vector (A,), got shape {action.shape}")
        if self._size > 0 and (
            frame.shape != self._frames.shape[1:] or action.shape[0] != self._actions.shape[1]
        ):
            raise ValueError(
                f"row has frame {frame.shape} and action {action.shape}; D_f holds frames "
                f"{self._frames.shape[1:]} and actions ({self._actions.shape[1]},)"
            )
        if self._size >= self.max_rows:
            if self._dropped == 0:
                log.warning(
                    "SFT buffer is full (sft.max_rows=%d): further rows of this round are dropped "
                    "(their rewards still count); raise sft.max_rows to keep them",
                    self.max_rows,
                )
            self._dropped += 1
            return
        self._grow(frame.shape, action.shape[0])
        i = self._size
        self._frames[i] = frame
        self._actions[i] = action
        self._fields["rewards"][i] = reward
        self._fields["returns"][i] = math.nan  # known when the segment ends
        self._fields["truncated"][i] = False
        self._fields["replay_indices"][i] = replay_index
        self._fields["entropies"][i] = entropy
        self._fields["segment_steps"][i] = step
        self._segment_rows.setdefault(int(stream), []).append(i)
        self._size += 1

    def end_segment(self, bootstrap: float = 0.0, truncated: bool = False, stream: int = 0) -> None:
        """Close a stream's open episode segment and give each of its rows its return-to-go.

        Args:
            bootstrap: Value of the state after the last step: 0 for a terminated episode, the
                critic's value (or 0) for a segment cut by a time limit or the end of the round.
            truncated: True when the segment was cut rather than terminated; its rows are marked.
            stream: Which env's segment (0 with one env).

        A call with no open steps does nothing.
        """
        rewards = self._segment_rewards.pop(int(stream), [])
        rows = np.asarray(self._segment_rows.pop(int(stream), []), dtype=np.int64)
        if not rewards:
            return
        returns = discounted_return_to_go(np.asarray(rewards), self.gamma, float(bootstrap))
        self._fields["returns"][rows] = returns[self._fields["segment_steps"][rows]]
        self._fields["truncated"][rows] = bool(truncated)

    def clear(self) -> None:
        """Empty D_f, the built SFT set and the open segment (after each fine-tuning round).

        The generator is not reset: later rounds draw fresh random numbers.
        """
        self._reset_rows()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        """Number of rows stored in D_f."""
        return self._size

    @property
    def rng(self) -> np.random.Generator:
        """The seeded generator of the random ablations and of batch shuffling."""
        return self._rng

    @property
    def frames(self) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 frames of the stored rows (read-only view)."""
        return _read_only(self._frames[: self._size])

    @property
    def actions(self) -> np.ndarray:
        """``(N, A)`` float32 actions a_r of the stored rows (read-only view)."""
        return _read_only(self._actions[: self._size])

    @property
    def rewards(self) -> np.ndarray:
        """``(N,)`` immediate rewards of the stored rows."""
        return _read_only(self._fields["rewards"][: self._size])

    @property
    def returns(self) -> np.ndarray:
        """``(N,)`` discounted returns-to-go; NaN for rows of the open segment."""
        return _read_only(self._fields["returns"][: self._size])

    @property
    def truncated(self) -> np.ndarray:
        """``(N,)`` True for rows of segments cut by a time limit or a round boundary."""
        return _read_only(self._fields["truncated"][: self._size])

    @property
    def replay_indices(self) -> np.ndarray:
        """``(N,)`` replay-buffer index of each row's transition (for Q(s, a) at filter time)."""
        return _read_only(self._fields["replay_indices"][: self._size])

    @property
    def entropies(self) -> np.ndarray:
        """``(N,)`` policy entropy when each row was recorded."""
        return _read_only(self._fields["entropies"][: self._size])

    @property
    def segment_steps(self) -> np.ndarray:
        """``(N,)`` position of each row's step inside its episode segment (0-based)."""
        return _read_only(self._fields["segment_steps"][: self._size])

    @property
    def dropped_rows(self) -> int:
        """Rows dropped this round because D_f held ``max_rows`` already."""
        return self._dropped

    @property
    def open_segment_length(self) -> int:
        """Steps recorded since the last :meth:`end_segment`, summed over the streams."""
        return sum(len(rewards) for rewards in self._segment_rewards.values())

    @property
    def open_streams(self) -> list[int]:
        """Streams with an open segment (steps recorded since their last :meth:`end_segment`)."""
        return sorted(k for k, rewards in self._segment_rewards.items() if rewards)

    @property
    def num_examples(self) -> int:
        """Examples in the built SFT set (0 before :meth:`build`)."""
        return 0 if self._built_indices is None else len(self._built_indices)

    @property
    def built_indices(self) -> np.ndarray:
        """Row indices of the built examples, ascending (empty before :meth:`build`)."""
        empty = np.zeros(0, dtype=np.int64)
        return _read_only(empty if self._built_indices is None else self._built_indices)

    @property
    def built_targets(self) -> list[str]:
        """Target texts of the built examples, in :attr:`built_indices` order."""
        return list(self._built_targets)

    @property
    def built_weights(self) -> np.ndarray:
        """RALW weights (all > 0) of the built examples, in :attr:`built_indices` order."""
        return _read_only(self._built_weights)

    # ------------------------------------------------------------------ building
    def build(
        self,
        *,
        entropy: float,
        encode_target: Callable[[np.ndarray], str],
        collate: Callable[[list[np.ndarray], list[str], np.ndarray], dict],
        q_values: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Filter D_f (EDDF), weight it (RALW), drop zero weights and keep the result for serving.

        Args:
            entropy: Current policy entropy H_t (drives the EDDF threshold).
            encode_target: Action a_r ``(A,)`` to target text (the codec's ``encode``).
            collate: ``(frames, targets, weights) -> batch`` used by :meth:`train_dataloader`.
            q_values: ``(N,)`` critic Q(s, a) of every row, in row order; needed only for
                ``return_signal="q_value"``.

        Returns:
            Metrics ``eddf/*`` (:meth:`EDDFStats.as_metrics`), ``ralw/mean_weight`` (over the
            rows EDDF kept, zeros included), ``sft/rows_in``, ``sft/rows_kept`` (after EDDF),
            ``sft/rows_out`` (after dropping zero weights), ``sft/rows_dropped`` (over
            ``max_rows`` this round) and ``sft/entropy``; also stored as :attr:`last_metrics`.

        Raises:
            ValueError: If ``q_value`` is the signal and ``q_values`` is missing or not ``(N,)``.
        """
        n = self._size
        if self.return_signal == "q_value":
            if q_values is None:
                raise ValueError("return_signal 'q_value' needs q_values, one per row of D_f")
            g = np.asarray(q_values, dtype=np.float64)
            if g.shape != (n,):
                raise ValueError(f"q_values has shape {g.shape}, D_f has ({n},) rows")
        elif self.return_signal == "immediate_reward":
            g = self._fields["rewards"][:n].copy()
        else:
            g = self._fields["returns"][:n].copy()
            open_rows = sum(len(rows) for rows in self._segment_rows.values())
            if open_rows > 0:
                log.warning(
                    "SFT build with %d rows in an open episode segment: their return-to-go is "
                    "unknown and EDDF drops them; call end_segment() before build()",
                    open_rows,
                )
        keep, stats = eddf_mask(
            g,
            entropy,
            mode=self.eddf_mode,
            sign=self.eddf_sign,
            temperature=self.eddf_temperature,
            quantile=self.eddf_quantile,
            generator=self._rng,
        )
        kept_rows = np.flatnonzero(keep)
        weights = ralw_weights(g[kept_rows], mode=self.ralw_mode, generator=self._rng)
        positive = weights > 0
        self._built_indices = kept_rows[positive]
        self._built_weights = weights[positive]
        self._built_targets = [
            str(encode_target(self._actions[i].copy())) for i in self._built_indices
        ]
        self._collate = collate
        metrics = stats.as_metrics()
        metrics.update(
            {
                "ralw/mean_weight": float(weights.mean()) if weights.size else math.nan,
                "sft/rows_in": float(n),
                "sft/rows_kept": float(kept_rows.size),
                "sft/rows_out": float(self._built_indices.size),
                "sft/rows_dropped": float(self._dropped),
                "sft/entropy": float(entropy),
            }
        )
        self.last_metrics = metrics
        return dict(metrics)

    def train_dataloader(self) -> DataLoader:
        """Batches of the built set, reshuffled every epoch, as ``collate(frames, targets, weights)``.

        Returns:
            A single-process ``DataLoader`` (``drop_last=False``): each epoch serves every example
            once.

        Raises:
            RuntimeError: If :meth:`build` has not run or kept no example (check
                :attr:`num_examples` first).
        """
        if self._built_indices is None or self._collate is None:
            raise RuntimeError("SFT set not built: call build() before train_dataloader()")
        if len(self._built_indices) == 0:
            raise RuntimeError(
                "SFT set is empty (build() kept no row): check num_examples before fine-tuning"
            )
        collate = self._collate

        def collate_rows(items: list[tuple[np.ndarray, str, float]]) -> dict:
            frames, targets, weights = zip(*items, strict=True)
            return collate(list(frames), list(targets), np.asarray(weights, dtype=np.float64))

        rows = _BuiltRows(
            self._frames, self._built_indices, self._built_targets, self._built_weights
        )
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=_SeededShuffle(self, len(rows)),
            drop_last=False,
            num_workers=0,
            collate_fn=collate_rows,
        )

    # ------------------------------------------------------------------ state & checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Small metadata: row count, shapes, open segment, dropped count and the RNG state.

        The stored arrays are not included; :meth:`save` / :meth:`load` move those.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "version": _FORMAT_VERSION,
            "rows": self._size,
            "frame_shape": list(self._frames.shape[1:]),
            "action_dim": int(self._actions.shape[1]),
            "dropped_rows": self._dropped,
            "open_segments": {
                str(stream): {
                    "rewards": list(self._segment_rewards[stream]),
                    "rows": list(self._segment_rows.get(stream, [])),
                }
                for stream in self.open_streams
            },
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the metadata of a module holding the same rows (use :meth:`load` for rows).

        The built SFT set is discarded: call :meth:`build` again.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ConfigError: If the state is malformed or describes a different number of rows.
        """
        parsed = _parse_state(state)
        if parsed["rows"] != self._size:
            raise ConfigError(
                f"SFT state describes {parsed['rows']} rows, this module holds {self._size}",
                "restore D_f with SFTDataModule.load(directory), which also restores the state",
            )
        self._check_open_segment(parsed, self._fields["segment_steps"][: self._size])
        self._apply_state(parsed)

    def _check_open_segment(self, parsed: dict[str, Any], segment_steps: np.ndarray) -> None:
        for stream, (rewards, rows) in parsed["open_segments"].items():
            if rows and (
                min(rows) < 0
                or max(rows) >= parsed["rows"]
                or segment_steps[rows].max() >= len(rewards)
            ):
                raise ConfigError(
                    f"SFT state has an open segment of {len(rewards)} steps (stream {stream}) "
                    f"that does not fit its {parsed['rows']} rows",
                    _RESUME_FIX,
                )

    def _apply_state(self, parsed: dict[str, Any]) -> None:
        self._rng = np.random.Generator(parsed["rng"])
        self._dropped = parsed["dropped_rows"]
        self._segment_rewards = {k: list(r) for k, (r, _) in parsed["open_segments"].items()}
        self._segment_rows = {k: list(rows) for k, (_, rows) in parsed["open_segments"].items()}
        self._clear_built()

    def save(self, directory: str | Path) -> None:
        """Write each stored array to ``<directory>/<name>.npy`` and the metadata to meta.json.

        ``meta.json`` is removed first and written last (atomically), so an interrupted save
        leaves a directory that :meth:`load` rejects.

        Args:
            directory: Target directory (created if missing; existing files are replaced).
        """
        save_array_dir(directory, self._arrays(), self._size, self.state_dict())

    def load(self, directory: str | Path) -> None:
        """Inverse of :meth:`save`: replaces D_f, the open segment and the RNG state.

        Every file is read and checked against meta.json before anything changes, so a bad
        checkpoint leaves the module as it was. The built SFT set is discarded.

        Args:
            directory: A directory written by :meth:`save`.

        Raises:
            ConfigError: If a file is missing, truncated or corrupt, disagrees with meta.json, or
                holds more rows than ``max_rows``.
        """
        state = read_meta(directory, "SFT")
        parsed = _parse_state(state)
        rows = parsed["rows"]
        if rows > self.max_rows:
            raise ConfigError(
                f"SFT checkpoint {directory} holds {rows} rows, sft.max_rows is {self.max_rows}",
                f"set sft.max_rows to at least {rows} to resume it",
            )
        expected = {
            "frames": ((rows, *parsed["frame_shape"]), np.dtype(np.uint8)),
            "actions": ((rows, parsed["action_dim"]), np.dtype(np.float32)),
        }
        expected.update({name: ((rows,), dtype) for name, dtype in _ROW_FIELDS.items()})
        stored = load_array_dir(directory, expected, "SFT")
        self._check_open_segment(parsed, stored["segment_steps"])
        self._frames = stored.pop("frames")
        self._actions = stored.pop("actions")
        self._fields = stored
        self._size = rows
        self._apply_state(parsed)

    def _arrays(self) -> dict[str, np.ndarray]:
        """Every stored array by file name."""
        return {"frames": self._frames, "actions": self._actions, **self._fields}


# ---------------------------------------------------------------------- helpers
def _resized(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    out = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    out[:used] = array[:used]
    return out


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _require_int(value: Any, key: str, minimum: int) -> None:
    if not (isinstance(value, int | np.integer) and not isinstance(value, bool)) or value < minimum:
        raise ConfigError(
            f"sft.{key} must be an integer >= {minimum}, got {value!r}",
            f"set sft.{key} to an integer >= {minimum}",
        )


def _require_in_unit_interval(value: Any, key: str) -> None:
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ConfigError(
            f"sft.{key} must be in [0, 1], got {value!r}", f"set sft.{key} to a value in [0, 1]"
        )


def _require_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"sft.{key} must be one of {', '.join(choices)}, got {value!r}",
            f"set sft.{key} to one of {', '.join(choices)}",
        )


def _parse_state(state: Any) -> dict[str, Any]:
    """Validate a :meth:`SFTDataModule.state_dict` without changing anything."""
    try:
        parsed = {
            "version": int(state["version"]),
            "rows": int(state["rows"]),
            "frame_shape": tuple(int(s) for s in state["frame_shape"]),
            "action_dim": int(state["action_dim"]),
            "dropped_rows": int(state["dropped_rows"]),
            "rng": np.random.PCG64(),
        }
        if int(state["version"]) == 1:  # one stream: the open segment's rows are a suffix
            first, rows = int(state["segment_first_row"]), int(state["rows"])
            rewards = [float(r) for r in state["segment_rewards"]]
            parsed["open_segments"] = {0: (rewards, list(range(first, rows)))} if rewards else {}
            parsed["version"] = _FORMAT_VERSION
        else:
            parsed["open_segments"] = {
                int(k): ([float(r) for r in v["rewards"]], [int(i) for i in v["rows"]])
                for k, v in state["open_segments"].items()
            }
        parsed["rng"].state = state["rng"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"SFT state is malformed ({err!r})", _RESUME_FIX) from err
    if parsed["version"] != _FORMAT_VERSION:
        raise ConfigError(
            f"SFT state has format version {parsed['version']}, expected {_FORMAT_VERSION}",
            _RESUME_FIX,
        )
    if (
        parsed["rows"] < 0
        or parsed["dropped_rows"] < 0
        or parsed["action_dim"] < 0
        or len(parsed["frame_shape"]) != 3
        or parsed["frame_shape"][2] != 3
    ):
        raise ConfigError(
            f"SFT state has out-of-range counts or shapes (rows {parsed['rows']}, frames "
            f"{parsed['frame_shape']}, action_dim {parsed['action_dim']})",
            _RESUME_FIX,
        )
    return parsed
