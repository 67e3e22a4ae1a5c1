"""EDDF, the exploration-driven dynamic filter of COVR, and the filters of its ablations.

Given the return signals g of the rows of D_f and the current policy entropy H_t, EDDF keeps

    g_z = (g - mean(g)) / (std(g) + eps)                       z-score, population std (ddof 0)
    tau = median(g_z) + s(H_t) * IQR(g_z)                      IQR = 75th - 25th percentile
    keep = g_z >= tau

Decision (docs/method.md): the paper prints s(H) = sigmoid(H), which *raises* the threshold when
entropy is high, against its stated intent (high entropy early -> relaxed threshold -> keep more).
The default implements the intent, s(H) = sigmoid(-H / temperature); ``sign="literal"`` gives the
printed sigmoid(+H / temperature). Percentiles and medians use numpy's default linear interpolation.

Ablation ``no_zscore``: since median and IQR are affine-equivariant, applying the same rule to raw
returns would keep exactly the same rows, so that reading would be no ablation at all. What the
z-score buys is that the entropy offset s(H_t) is measured in units of the returns' spread; without
it, ``tau = median(g) + s(H_t)`` in raw return units, so the entropy term matters only where
returns vary by about one unit (docs/method.md).

Degenerate inputs are defined, never errors:

- empty input: nothing kept, ``tau``/``median``/``iqr`` NaN, ``kept_fraction`` 0;
- rows whose return is NaN or infinite are never kept and do not enter mean, std, median or IQR;
- all finite returns equal (including a single row): g_z is all 0, tau is 0, every finite row is
  kept (there is nothing to prefer);
- NaN entropy (no actor update yet): s(H) = 0.5, the midpoint of both sign conventions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

EDDFMode = Literal["dynamic", "random", "top_k", "no_zscore"]
EntropySign = Literal["intent", "literal"]
ZSCORE_EPS = 1e-8


@dataclass(frozen=True)
class EDDFStats:
    """What one filtering pass did (logged as ``eddf/<field>``).

    Attributes:
        mode: The filter mode.
        threshold: tau, in z units (``dynamic``, ``random``), raw-return units (``no_zscore``,
            ``top_k``: the q-th quantile).
        median: Median of the values the threshold is built on (z-scores or raw returns).
        iqr: Their interquartile range (75th minus 25th percentile).
        entropy_scale: s(H_t) (NaN for ``top_k``, which ignores entropy).
        rows_in: Rows offered.
        rows_kept: Rows kept.
        kept_fraction: rows_kept / rows_in (0 for no rows).
    """

    mode: str
    threshold: float
    median: float
    iqr: float
    entropy_scale: float
    rows_in: int
    rows_kept: int
    kept_fraction: float

    def as_metrics(self, prefix: str = "eddf/") -> dict[str, float]:
        """Numeric fields as a flat metrics dict."""
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if k != "mode"}


def zscore(returns: np.ndarray) -> np.ndarray:
    """g_z = (g - mean) / (std + eps) over the finite rows, population std; NaN elsewhere."""
    g = np.asarray(returns, dtype=np.float64)
    out = np.full(g.shape, np.nan)
    finite = np.isfinite(g)
    if finite.any():
        values = g[finite]
        out[finite] = (values - values.mean()) / (values.std(ddof=0) + ZSCORE_EPS)
    return out


def entropy_scale(entropy: float, temperature: float = 1.0, sign: EntropySign = "intent") -> float:
    """s(H): sigmoid(-H / T) (``intent``, default) or the paper's printed sigmoid(+H / T) (``literal``)."""
    if not math.isfinite(entropy):
        return 0.5
    x = entropy / temperature
    x = -x if sign == "intent" else x
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _median_iqr(values: np.ndarray) -> tuple[float, float]:
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q50), float(q75 - q25)


def _dynamic(
    values: np.ndarray, finite: np.ndarray, scale: float
) -> tuple[np.ndarray, float, float, float]:
    """keep = v >= median(v) + scale * IQR(v) over finite rows."""
    median, iqr = _median_iqr(values[finite])
    tau = median + scale * iqr
    keep = np.zeros(values.shape, dtype=bool)
    keep[finite] = values[finite] >= tau
    return keep, tau, median, iqr


def eddf_mask(
    returns: np.ndarray,
    entropy: float,
    mode: EDDFMode = "dynamic",
    *,
    sign: EntropySign = "intent",
    temperature: float = 1.0,
    quantile: float = 0.9,
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, EDDFStats]:
    """Choose the rows of D_f to fine-tune the VLM on.

    Args:
        returns: ``(N,)`` return signal g of each row.
        entropy: Policy entropy H_t (SAC: mean of -log pi over a recent batch).
        mode: ``dynamic`` (EDDF); ``random`` (as many rows as ``dynamic`` keeps, drawn uniformly
            from the finite rows: the "w/o EDDF" ablation); ``top_k`` (rows with g at or above
            the ``quantile``-th quantile: the paper's "top-80/90/95 %" are q = 0.80/0.90/0.95,
            i.e. the best 20/10/5 % of rows); ``no_zscore`` (tau = median(g) + s(H) on raw returns:
            the entropy offset no longer scales with the returns' spread).
        sign: Entropy convention of s(H) (see the module docstring).
        temperature: T in s(H) = sigmoid(-+H / T).
        quantile: q for ``top_k``.
        generator: RNG for ``random`` (default: a fresh unseeded one).

    Returns:
        ``(keep, stats)``: boolean mask ``(N,)`` and an :class:`EDDFStats`.

    Raises:
        ValueError: Unknown mode or sign, temperature <= 0, quantile outside [0, 1].
    """
    if mode not in ("dynamic", "random", "top_k", "no_zscore"):
        raise ValueError(f"unknown EDDF mode {mode!r}")
    if sign not in ("intent", "literal"):
        raise ValueError(f"unknown entropy sign {sign!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")

    g = np.asarray(returns, dtype=np.float64).reshape(-1)
    finite = np.isfinite(g)
    scale = math.nan if mode == "top_k" else entropy_scale(entropy, temperature, sign)
    if not finite.any():
        keep = np.zeros(g.shape, dtype=bool)
        return keep, EDDFStats(mode, math.nan, math.nan, math.nan, scale, g.size, 0, 0.0)

    if mode == "top_k":
        tau = float(np.quantile(g[finite], quantile))
        median, iqr = _median_iqr(g[finite])
        keep = finite & (g >= tau)
    elif mode == "no_zscore":
        # Without the z-score the entropy term is not scaled by the spread of the returns:
        # tau = median(g) + s(H) in raw return units (docs/method.md, "w/o z-score").
        median, iqr = _median_iqr(g[finite])
        tau = median + scale if np.ptp(g[finite]) > 0 else median  # all equal: keep every row
        keep = finite & (g >= tau)
    else:
        keep, tau, median, iqr = _dynamic(zscore(g), finite, scale)
        if mode == "random":
            rng = generator if generator is not None else np.random.default_rng()
            chosen = rng.choice(np.flatnonzero(finite), size=int(keep.sum()), replace=False)
            keep = np.zeros(g.shape, dtype=bool)
            keep[chosen] = True

    kept = int(keep.sum())
    stats = EDDFStats(mode, tau, median, iqr, scale, g.size, kept, kept / g.size)
    return keep, stats
