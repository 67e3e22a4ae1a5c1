"""Statistics across seeds: IQM and stratified bootstrap CIs (rliable), and a row's summary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BOOTSTRAP_REPS = 2000  # table CIs; the curves use fewer (one bootstrap per grid step)
CURVE_BOOTSTRAP_REPS = 500


def iqm(values: np.ndarray) -> float:
    """Interquartile mean (25 % trimmed mean) via :func:`rliable.metrics.aggregate_iqm`."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(values, dtype=float).reshape(-1, 1)))


def bootstrap_ci(
    values: np.ndarray, statistic: str = "iqm", reps: int = BOOTSTRAP_REPS, seed: int = 0
) -> tuple[float, float, float]:
    """Point estimate and stratified bootstrap 95 % CI across runs (``rly.get_interval_estimates``).

    Args:
        values: One score per run (seed).
        statistic: ``"iqm"`` or ``"mean"``.
        reps: Bootstrap replications.
        seed: Seed of the bootstrap's random state (the same inputs give the same CI).

    Returns:
        ``(point, low, high)``; with a single run the interval collapses to the point.
    """
    from rliable import library as rly
    from rliable import metrics

    scores = np.asarray(values, dtype=float).reshape(-1, 1)  # runs x tasks (one task)
    aggregate = metrics.aggregate_iqm if statistic == "iqm" else metrics.aggregate_mean
    # rliable 1.2's StratifiedBootstrap draws its indices from numpy's global RNG and ignores
    # `random_state` (which arch 7 also deprecates): seed the global RNG and restore it after.
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        point, interval = rly.get_interval_estimates(
            {"g": scores}, lambda x: np.array([aggregate(x)]), reps=reps
        )
    finally:
        np.random.set_state(saved)
    return float(point["g"][0]), float(interval["g"][0, 0]), float(interval["g"][1, 0])


def summarize(values: list[float], ci: bool = True) -> dict[str, Any]:
    """n, mean, std (ddof=1), median, IQM and its bootstrap 95 % CI; blanks when n == 0.

    Args:
        values: One score per run (seed).
        ci: Compute the IQM's bootstrap CI (about half a second); without it the IQM is
            :func:`iqm` and the CI keys are left out.
    """
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "median": math.nan,
                "iqm": math.nan, "iqm_ci_low": math.nan, "iqm_ci_high": math.nan}  # fmt: skip
    array = np.asarray(values, dtype=float)
    summary = {
        "n": n,
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if n > 1 else 0.0,
        "median": float(np.median(array)),
    }
    if not ci:
        return {**summary, "iqm": iqm(array)}
    point, low, high = bootstrap_ci(array, "iqm")
    return {**summary, "iqm": point, "iqm_ci_low": low, "iqm_ci_high": high}
