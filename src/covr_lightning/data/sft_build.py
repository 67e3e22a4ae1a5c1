"""The build step of D_f: return signal g -> EDDF -> RALW -> drop zero weights -> SFT examples.

EDDF (:func:`~covr_lightning.data.eddf.eddf_mask`) filters on g of all rows, RALW
(:func:`~covr_lightning.data.ralw.ralw_weights`) weights the rows EDDF kept, and rows whose weight
is 0 are dropped. Each remaining row becomes one example (frame, ``encode_target(action)``,
weight). The loss normaliser N_v (rows with w > 0 in a batch) is applied by
:func:`~covr_lightning.data.ralw.ralw_loss`; since zero-weight rows are dropped here, N_v equals
the batch size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from covr_lightning.data.eddf import EDDFMode, EntropySign, eddf_mask
from covr_lightning.data.ralw import RALWMode, ralw_weights
from covr_lightning.data.returns import ReturnSignal

log = logging.getLogger(__name__)

Collate = Callable[[list[np.ndarray], list[str], np.ndarray], dict]


@dataclass(frozen=True)
class BuiltSet:
    """The SFT examples of one round.

    Attributes:
        indices: ``(M,)`` rows of D_f, ascending.
        targets: Target text of each example.
        weights: ``(M,)`` RALW weights, all > 0.
        collate: ``(frames, targets, weights) -> batch`` for the dataloader.
    """

    indices: np.ndarray
    targets: list[str]
    weights: np.ndarray
    collate: Collate


def signal_values(
    return_signal: ReturnSignal,
    rewards: np.ndarray,
    returns: np.ndarray,
    q_values: np.ndarray | None,
    open_rows: int,
) -> np.ndarray:
    """g of every row of D_f under the chosen return signal (a fresh float64 array).

    Args:
        return_signal: ``return_to_go``, ``bootstrapped_return_to_go``, ``immediate_reward`` or
            ``q_value``.
        rewards: ``(N,)`` immediate rewards.
        returns: ``(N,)`` returns-to-go (NaN for rows of open segments).
        q_values: ``(N,)`` critic Q(s, a) per row; needed only for ``q_value``.
        open_rows: Rows in segments that have not ended (their return-to-go is unknown).

    Returns:
        ``(N,)`` float64 g.

    Raises:
        ValueError: If ``q_value`` is the signal and ``q_values`` is missing or not ``(N,)``.
    """
    n = len(rewards)
    if return_signal == "q_value":
        if q_values is None:
            raise ValueError("return_signal 'q_value' needs q_values, one per row of D_f")
        g = np.array(q_values, dtype=np.float64)
        if g.shape != (n,):
            raise ValueError(f"q_values has shape {g.shape}, D_f has ({n},) rows")
        return g
    if return_signal == "immediate_reward":
        return np.array(rewards, dtype=np.float64)
    if open_rows > 0:
        log.warning(
            "SFT build with %d rows in an open episode segment: their return-to-go is "
            "unknown and EDDF drops them; call end_segment() before build()",
            open_rows,
        )
    return np.array(returns, dtype=np.float64)


def build_examples(
    g: np.ndarray,
    actions: np.ndarray,
    entropy: float,
    *,
    encode_target: Callable[[np.ndarray], str],
    collate: Collate,
    eddf_mode: EDDFMode,
    eddf_sign: EntropySign,
    eddf_temperature: float,
    eddf_quantile: float,
    ralw_mode: RALWMode,
    generator: np.random.Generator,
    dropped_rows: int,
) -> tuple[BuiltSet, dict[str, float]]:
    """Filter (EDDF), weight (RALW) and drop zero weights: the SFT examples of D_f.

    Args:
        g: ``(N,)`` return signal of every row.
        actions: ``(N, A)`` actions a_r of the rows.
        entropy: Current policy entropy H_t (drives the EDDF threshold).
        encode_target: Action a_r ``(A,)`` to target text (the codec's ``encode``).
        collate: Kept in the built set for the dataloader.
        eddf_mode: EDDF or one of its ablations.
        eddf_sign: Entropy convention of s(H).
        eddf_temperature: T in s(H).
        eddf_quantile: q of ``top_k``.
        ralw_mode: RALW or one of its ablations.
        generator: Draws of the random ablations.
        dropped_rows: Rows dropped this round over ``max_rows`` (reported only).

    Returns:
        The built set and the metrics ``eddf/*``, ``ralw/mean_weight`` (over the rows EDDF kept,
        zeros included), ``sft/rows_in``, ``sft/rows_kept`` (after EDDF), ``sft/rows_out``
        (after dropping zero weights), ``sft/rows_zero_weight`` (kept by EDDF, weight 0 under
        RALW), ``sft/rows_dropped`` and ``sft/entropy``.
    """
    keep, stats = eddf_mask(
        g,
        entropy,
        mode=eddf_mode,
        sign=eddf_sign,
        temperature=eddf_temperature,
        quantile=eddf_quantile,
        generator=generator,
    )
    kept_rows = np.flatnonzero(keep)
    weights = ralw_weights(g[kept_rows], mode=ralw_mode, generator=generator)
    positive = weights > 0
    indices = kept_rows[positive]
    built = BuiltSet(
        indices=indices,
        targets=[str(encode_target(actions[i].copy())) for i in indices],
        weights=weights[positive],
        collate=collate,
    )
    metrics = stats.as_metrics()
    metrics.update(
        {
            "ralw/mean_weight": float(weights.mean()) if weights.size else math.nan,
            "sft/rows_in": float(len(g)),
            "sft/rows_kept": float(kept_rows.size),
            "sft/rows_out": float(indices.size),
            "sft/rows_zero_weight": float(kept_rows.size - indices.size),
            "sft/rows_dropped": float(dropped_rows),
            "sft/entropy": float(entropy),
        }
    )
    return built, metrics
