"""D_f, the RL agent's experience for fine-tuning the VLM, and its filtered, weighted SFT set.

A **row** of D_f is one agent step the VLM could learn from: the VLM-sized RGB frame the agent saw
(uint8 ``(H, W, 3)``), the action the policy took there (a_r, float32 ``(A,)``), the immediate
reward, the index of the transition in the replay buffer (so the loop can ask the critic for
Q(s, a) at filter time), the policy entropy when the step was taken, the step's position inside
its episode segment, and, once the segment has ended, its discounted return-to-go.

Rows are stored only on steps where the loop passes a frame: every ``covr.sft_every`` frames,
which by default equals ``covr.guide_every``, so the VLM-sized render made for a guidance query is
also the row's image and no step is rendered twice. Return-to-go still uses *every* step's reward:
:meth:`record_step` is called on every step, with or without a frame, so G_t of a stored row sums
the rewards of the steps in between as well.

Return signals g (``return_signal``, see ``docs/method.md``):

- ``return_to_go`` (default): the discounted mean reward to the end of the episode segment
  (:func:`~covr_lightning.data.returns.discounted_mean_reward_to_go`), computed by
  :meth:`SFTDataModule.end_segment`; a terminated segment counts its zero tail, a cut one (time
  limit, end of a round; its rows are marked ``truncated``) averages the rewards it saw.
- ``bootstrapped_return_to_go``: G_t = r_t + gamma G_{t+1}, bootstrapped with 0 at termination
  and with the critic value the loop passes in at a cut.

  Rows of a segment that has not ended have NaN return, which EDDF never keeps: **the loop must
  call** :meth:`end_segment` **for the open segment before** :meth:`build`.
- ``immediate_reward``: r_t.
- ``q_value``: the critic's Q(s_t, a_t) at filter time, passed to :meth:`build` (one per row,
  in row order; :attr:`replay_indices` says where each row's transition lives in the replay).

:meth:`SFTDataModule.build` turns D_f into SFT examples
(:mod:`~covr_lightning.data.sft_build`: EDDF -> RALW -> drop zero weights),
:meth:`SFTDataModule.train_dataloader` serves them (:mod:`~covr_lightning.data.sft_loader`), and
:meth:`SFTDataModule.save` / :meth:`SFTDataModule.load` move D_f to and from a checkpoint
(:mod:`~covr_lightning.data.sft_checkpoint`). The built SFT set is not saved: call
:meth:`SFTDataModule.build` again after :meth:`SFTDataModule.load`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import numpy as np
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeInt,
    PositiveInt,
    restricted_number_type,
)
from torch.utils.data import DataLoader

from covr_lightning.data.array_dir import load_array_dir, read_meta, save_array_dir
from covr_lightning.data.eddf import EDDFMode, EntropySign
from covr_lightning.data.ralw import RALWMode
from covr_lightning.data.returns import (
    ReturnSignal,
    discounted_mean_reward_to_go,
    discounted_return_to_go,
)
from covr_lightning.data.sft_build import BuiltSet, Collate, build_examples, signal_values
from covr_lightning.data.sft_checkpoint import (
    FORMAT_VERSION,
    SFTState,
    check_open_segments,
    expected_files,
    parse_state,
)
from covr_lightning.data.sft_loader import built_dataloader
from covr_lightning.data.sft_rows import RowStore, read_only
from covr_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# T of EDDF's s(H): a finite positive number.
Temperature = restricted_number_type("Temperature", float, [(">", 0.0), ("<", math.inf)])


class SFTDataModule(lightning.LightningDataModule):
    """D_f: rows collected during an RL round, filtered (EDDF) and weighted (RALW) into SFT batches.

    Usage per round: :meth:`record_step` on every agent step, :meth:`end_segment` at every episode
    end and once more at the end of the round, then :meth:`build`, :meth:`train_dataloader` (if
    :attr:`num_examples` > 0) for the VLM fine-tuning, and :meth:`clear`.

    Args:
        batch_size: Examples per SFT batch.
        gamma: Discount of the return-to-go, in [0, 1]; None (the recipe default) takes the
            policy's gamma when the builder (:mod:`covr_lightning.build`) makes this module, else
            0.99.
        return_signal: g used by EDDF and RALW: ``return_to_go`` (discounted mean reward to
            go), ``bootstrapped_return_to_go`` (the plain return-to-go), ``immediate_reward`` or
            ``q_value``.
        eddf_mode: ``dynamic`` (EDDF), or the ablations ``random``, ``top_k``, ``no_zscore``.
        eddf_sign: Entropy convention of s(H): ``intent`` (sigmoid(-H/T)) or ``literal``.
        eddf_temperature: T in s(H), > 0.
        eddf_quantile: q of ``top_k`` (keeps the best 1 - q of rows), in [0, 1].
        ralw_mode: ``return`` (RALW), or the ablations ``none`` (all weights 1) and ``random``.
        max_rows: Most rows D_f holds in a round; further rows are dropped (and counted).
        seed: Seed of the generator used by the random ablations and by batch shuffling.
        bucket_by_length: Batch examples of similar target length, so less of a batch is
            padding (:class:`~covr_lightning.data.sft_loader.LengthBuckets`).

    The argument types are checked when a recipe is parsed; built directly in Python, the values
    are taken as given.
    """

    def __init__(
        self,
        *,
        batch_size: PositiveInt = 8,
        gamma: ClosedUnitInterval | None = None,
        return_signal: ReturnSignal = "return_to_go",
        eddf_mode: EDDFMode = "dynamic",
        eddf_sign: EntropySign = "intent",
        eddf_temperature: Temperature = 1.0,
        eddf_quantile: ClosedUnitInterval = 0.9,
        ralw_mode: RALWMode = "return",
        max_rows: PositiveInt = 50_000,
        seed: NonNegativeInt = 0,
        bucket_by_length: bool = True,
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.bucket_by_length = bool(bucket_by_length)
        self.gamma = 0.99 if gamma is None else float(gamma)
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
        """Empty D_f, the open segments and the built set (arrays are released, not kept)."""
        self._rows = RowStore(self.max_rows)
        self._dropped = 0
        # Per stream (one per env of a vectorised loop): every step of its open segment, in
        # order, and the rows that segment stored so far.
        self._segment_rewards: dict[int, list[float]] = {}
        self._segment_rows: dict[int, list[int]] = {}
        self._clear_built()

    def _clear_built(self) -> None:
        self._built: BuiltSet | None = None  # None until build() runs

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
        frame, action = self._rows.check_row(frame, action)
        if self._rows.size >= self.max_rows:
            if self._dropped == 0:
                log.warning(
                    "SFT buffer is full (sft.max_rows=%d): further rows of this round are dropped "
                    "(their rewards still count); raise sft.max_rows to keep them",
                    self.max_rows,
                )
            self._dropped += 1
            return
        i = self._rows.append(
            frame,
            action,
            reward=reward,
            replay_index=replay_index,
            entropy=entropy,
            segment_step=step,
        )
        self._segment_rows.setdefault(int(stream), []).append(i)

    def end_segment(self, bootstrap: float = 0.0, truncated: bool = False, stream: int = 0) -> None:
        """Close a stream's open episode segment and give each of its rows its return-to-go.

        Args:
            bootstrap: Value of the state after the last step (``bootstrapped_return_to_go``
                only): 0 for a terminated episode, the critic's value (or 0) for a segment cut
                by a time limit or the end of the round.
            truncated: True when the segment was cut rather than terminated; its rows are marked.
            stream: Which env's segment (0 with one env).

        A call with no open steps does nothing.
        """
        rewards = self._segment_rewards.pop(int(stream), [])
        rows = np.asarray(self._segment_rows.pop(int(stream), []), dtype=np.int64)
        if not rewards:
            return
        if self.return_signal == "return_to_go":
            returns = discounted_mean_reward_to_go(np.asarray(rewards), self.gamma, not truncated)
        else:
            returns = discounted_return_to_go(np.asarray(rewards), self.gamma, float(bootstrap))
        fields = self._rows.fields
        fields["returns"][rows] = returns[fields["segment_steps"][rows]]
        fields["truncated"][rows] = bool(truncated)

    def clear(self) -> None:
        """Empty D_f, the built SFT set and the open segment (after each fine-tuning round).

        The generator is not reset: later rounds draw fresh random numbers.
        """
        self._reset_rows()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        """Number of rows stored in D_f."""
        return self._rows.size

    @property
    def rng(self) -> np.random.Generator:
        """The seeded generator of the random ablations and of batch shuffling."""
        return self._rng

    @property
    def frames(self) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 frames of the stored rows (read-only view)."""
        return self._rows.view("frames")

    @property
    def actions(self) -> np.ndarray:
        """``(N, A)`` float32 actions a_r of the stored rows (read-only view)."""
        return self._rows.view("actions")

    @property
    def rewards(self) -> np.ndarray:
        """``(N,)`` immediate rewards of the stored rows."""
        return self._rows.view("rewards")

    @property
    def returns(self) -> np.ndarray:
        """``(N,)`` discounted returns-to-go; NaN for rows of the open segment."""
        return self._rows.view("returns")

    @property
    def truncated(self) -> np.ndarray:
        """``(N,)`` True for rows of segments cut by a time limit or a round boundary."""
        return self._rows.view("truncated")

    @property
    def replay_indices(self) -> np.ndarray:
        """``(N,)`` replay-buffer index of each row's transition (for Q(s, a) at filter time)."""
        return self._rows.view("replay_indices")

    @property
    def entropies(self) -> np.ndarray:
        """``(N,)`` policy entropy when each row was recorded."""
        return self._rows.view("entropies")

    @property
    def segment_steps(self) -> np.ndarray:
        """``(N,)`` position of each row's step inside its episode segment (0-based)."""
        return self._rows.view("segment_steps")

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
        return 0 if self._built is None else len(self._built.indices)

    @property
    def built_indices(self) -> np.ndarray:
        """Row indices of the built examples, ascending (empty before :meth:`build`)."""
        return read_only(np.zeros(0, np.int64) if self._built is None else self._built.indices)

    @property
    def built_targets(self) -> list[str]:
        """Target texts of the built examples, in :attr:`built_indices` order."""
        return [] if self._built is None else list(self._built.targets)

    @property
    def built_weights(self) -> np.ndarray:
        """RALW weights (all > 0) of the built examples, in :attr:`built_indices` order."""
        return read_only(np.zeros(0) if self._built is None else self._built.weights)

    # ------------------------------------------------------------------ building
    def build(
        self,
        *,
        entropy: float,
        encode_target: Callable[[np.ndarray], str],
        collate: Collate,
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
        n = self._rows.size
        open_rows = sum(len(rows) for rows in self._segment_rows.values())
        g = signal_values(
            self.return_signal,
            self._rows.fields["rewards"][:n],
            self._rows.fields["returns"][:n],
            q_values,
            open_rows,
        )
        self._built, metrics = build_examples(
            g,
            self._rows.actions[:n],
            entropy,
            encode_target=encode_target,
            collate=collate,
            eddf_mode=self.eddf_mode,
            eddf_sign=self.eddf_sign,
            eddf_temperature=self.eddf_temperature,
            eddf_quantile=self.eddf_quantile,
            ralw_mode=self.ralw_mode,
            generator=self._rng,
            dropped_rows=self._dropped,
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
        if self._built is None:
            raise RuntimeError("SFT set not built: call build() before train_dataloader()")
        if len(self._built.indices) == 0:
            raise RuntimeError(
                "SFT set is empty (build() kept no row): check num_examples before fine-tuning"
            )
        return built_dataloader(
            self._rows.frames,
            self._built,
            self.batch_size,
            lambda: self._rng,
            bucket_by_length=self.bucket_by_length,
        )

    def kept_examples(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The built set as ``(frames (M, H, W, 3), targets, weights)``, for a fine-tune in other
        processes (``covr.sft_strategy``); the frames are a copy of the kept rows only.

        Raises:
            RuntimeError: If :meth:`build` has not run.
        """
        if self._built is None:
            raise RuntimeError("SFT set not built: call build() before kept_examples()")
        built = self._built
        return self._rows.frames[built.indices], list(built.targets), built.weights.copy()

    # ------------------------------------------------------------------ state & checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Small metadata: row count, shapes, open segment, dropped count and the RNG state.

        The stored arrays are not included; :meth:`save` / :meth:`load` move those.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "version": FORMAT_VERSION,
            "rows": self._rows.size,
            "frame_shape": list(self._rows.frames.shape[1:]),
            "action_dim": int(self._rows.actions.shape[1]),
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
        parsed = parse_state(state)
        if parsed.rows != self._rows.size:
            raise ValueError(
                f"SFT state describes {parsed.rows} rows, this module holds {self._rows.size}: "
                "restore D_f with SFTDataModule.load(directory), which also restores the state"
            )
        check_open_segments(parsed, self._rows.view("segment_steps"))
        self._apply_state(parsed)

    def _apply_state(self, parsed: SFTState) -> None:
        self._rng = np.random.Generator(parsed.rng)
        self._dropped = parsed.dropped_rows
        self._segment_rewards = {k: list(r) for k, (r, _) in parsed.open_segments.items()}
        self._segment_rows = {k: list(rows) for k, (_, rows) in parsed.open_segments.items()}
        self._clear_built()

    def save(self, directory: str | Path) -> None:
        """Write each stored array to ``<directory>/<name>.npy`` and the metadata to meta.json.

        ``meta.json`` is removed first and written last (atomically), so an interrupted save
        leaves a directory that :meth:`load` rejects.

        Args:
            directory: Target directory (created if missing; existing files are replaced).
        """
        save_array_dir(directory, self._rows.arrays(), self._rows.size, self.state_dict())

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
        parsed = parse_state(read_meta(directory, "SFT"))
        rows = parsed.rows
        if rows > self.max_rows:
            raise ConfigError(
                f"SFT checkpoint {directory} holds {rows} rows, sft.max_rows is {self.max_rows}",
                f"set sft.max_rows to at least {rows} to resume it",
            )
        stored = load_array_dir(directory, expected_files(parsed), "SFT")
        check_open_segments(parsed, stored["segment_steps"])
        self._rows.replace(stored, rows)
        self._apply_state(parsed)
