"""RALW, COVR's return-aware loss weights, and the weighted NLL they scale.

Over the rows EDDF kept, returns are min-max normalised to [-1, 1] and clipped at 0:

    g_bar_b = 2 * (g_b - min(g)) / (max(g) - min(g)) - 1
    w_b     = max(g_bar_b, 0)

so rows in the lower half of the kept return range get weight 0 (dropped from the SFT set) and the
best row gets 1. The fine-tuning loss is

    L = (1 / N_v) * sum_b w_b * sum_t NLL(y_bt | x_b, y_b,<t)

over target-text tokens only. Decision (docs/method.md): the paper leaves N_v undefined; we use
the number of rows with w_b > 0 in the batch (at least 1), so the loss scale does not depend on how
many zero-weight rows a batch happens to hold, and a batch of one good row weighs like a row.

Degenerate inputs: no rows -> no weights; all kept returns equal (including one row) -> every
weight 1 (nothing to prefer, so nothing is dropped); NaN returns -> weight 0.
Ablations (``mode``): ``none`` (every w = 1, "w/o RALW") and ``random`` (w ~ U[0, 1)).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from torch import Tensor

RALWMode = Literal["return", "none", "random"]


def normalise_returns(returns: np.ndarray) -> np.ndarray:
    """g_bar = 2 (g - min) / (max - min) - 1 over finite rows; 1 where all are equal; NaN stays NaN."""
    g = np.asarray(returns, dtype=np.float64).reshape(-1)
    out = np.full(g.shape, np.nan)
    finite = np.isfinite(g)
    if not finite.any():
        return out
    low, high = g[finite].min(), g[finite].max()
    out[finite] = 1.0 if high == low else 2.0 * (g[finite] - low) / (high - low) - 1.0
    return out


def ralw_weights(
    returns: np.ndarray,
    mode: RALWMode = "return",
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """Per-row loss weights w in [0, 1].

    Args:
        returns: ``(N,)`` return signal of the rows EDDF kept.
        mode: ``return`` (RALW), ``none`` (all ones) or ``random`` (uniform in [0, 1)).
        generator: RNG for ``random`` (default: a fresh unseeded one).

    Returns:
        ``(N,)`` float64 weights.

    Raises:
        ValueError: Unknown mode.
    """
    g = np.asarray(returns, dtype=np.float64).reshape(-1)
    if mode == "return":
        return np.nan_to_num(np.maximum(normalise_returns(g), 0.0), nan=0.0)  # w = max(g_bar, 0)
    if mode == "none":
        return np.ones(g.shape)
    if mode == "random":
        rng = generator if generator is not None else np.random.default_rng()
        return rng.random(g.shape)
    raise ValueError(f"unknown RALW mode {mode!r}")


def ralw_loss(token_nll: Tensor, target_mask: Tensor, weights: Tensor) -> Tensor:
    """L = (1 / N_v) sum_b w_b sum_t NLL_bt, with N_v = #{b : w_b > 0} (at least 1).

    Args:
        token_nll: ``(B, T)`` per-token negative log-likelihood (label smoothing already applied).
        target_mask: ``(B, T)`` 1 on target-text tokens, 0 on prompt, image and padding tokens.
        weights: ``(B,)`` RALW weights.

    Returns:
        Scalar loss.
    """
    per_row = (token_nll * target_mask).sum(dim=1)  # sum_t NLL over target tokens only
    n_valid = (weights > 0).sum().clamp(min=1)  # N_v
    return (weights.to(per_row.dtype) * per_row).sum() / n_valid
