"""EDDF against hand computations, and its properties.

Worked example used below, g = [1, 2, 3, 4, 5]: mean 3, population std sqrt(2), so
g_z = [-sqrt2, -sqrt2/2, 0, sqrt2/2, sqrt2] = [-1.41421, -0.70711, 0, 0.70711, 1.41421];
median(g_z) = 0; 25th / 75th percentiles (linear) = -0.70711 / 0.70711, IQR = 1.41421.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from covr_lightning.data.eddf import eddf_mask, entropy_scale, zscore

G = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
SQRT2 = math.sqrt(2.0)


def test_zscore_uses_population_std():
    np.testing.assert_allclose(zscore(G), [-SQRT2, -SQRT2 / 2, 0, SQRT2 / 2, SQRT2], atol=1e-7)


def test_entropy_scale_by_hand():
    assert entropy_scale(0.0) == 0.5
    assert entropy_scale(2.0) == pytest.approx(1 / (1 + math.exp(2.0)))  # sigmoid(-2) = 0.1192
    assert entropy_scale(2.0, sign="literal") == pytest.approx(1 / (1 + math.exp(-2.0)))  # 0.8808
    assert entropy_scale(2.0, temperature=2.0) == pytest.approx(1 / (1 + math.e))  # sigmoid(-1)
    assert entropy_scale(float("nan")) == 0.5
    assert entropy_scale(-1e6) == 1.0 and entropy_scale(1e6) == 0.0  # no overflow


def test_dynamic_zero_entropy_by_hand():
    # s(0) = 0.5, tau = 0 + 0.5 * 1.41421 = 0.70711: keep g_z >= 0.70711, i.e. returns 4 and 5
    keep, stats = eddf_mask(G, entropy=0.0)
    assert keep.tolist() == [False, False, False, True, True]
    assert stats.threshold == pytest.approx(SQRT2 / 2, abs=1e-7)
    assert stats.median == pytest.approx(0.0, abs=1e-12)
    assert stats.iqr == pytest.approx(SQRT2, abs=1e-7)
    assert (stats.rows_in, stats.rows_kept, stats.kept_fraction) == (5, 2, 0.4)


def test_entropy_moves_the_threshold_by_hand():
    # low entropy H = -10 (late training): s = sigmoid(10) = 0.99995, tau = 1.41415 -> only 5
    keep, stats = eddf_mask(G, entropy=-10.0)
    assert keep.tolist() == [False, False, False, False, True]
    assert stats.threshold == pytest.approx(SQRT2 / (1 + math.exp(-10)), abs=1e-7)
    # high entropy H = +10 (early): s = 4.54e-5, tau = 6.4e-5 -> 4 and 5 (g_z of 3 is 0 < tau)
    keep, _ = eddf_mask(G, entropy=10.0)
    assert keep.tolist() == [False, False, False, True, True]
    # the paper's printed sign does the opposite
    assert eddf_mask(G, entropy=10.0, sign="literal")[0].tolist() == [0, 0, 0, 0, 1]
    assert eddf_mask(G, entropy=-10.0, sign="literal")[0].tolist() == [0, 0, 0, 1, 1]


def test_threshold_falls_as_entropy_rises_and_literal_sign_reverses_it():
    g = np.random.default_rng(0).normal(size=200)
    entropies = np.linspace(-5, 5, 11)
    intent = [eddf_mask(g, h)[1].threshold for h in entropies]
    literal = [eddf_mask(g, h, sign="literal")[1].threshold for h in entropies]
    assert all(a > b for a, b in zip(intent, intent[1:], strict=False))
    assert all(a < b for a, b in zip(literal, literal[1:], strict=False))


def test_no_zscore_by_hand_and_a_real_ablation():
    # raw: median 3, IQR 2, tau = median + s(H) = 3 + 0.5 (not scaled by the IQR) -> 4 and 5
    keep, stats = eddf_mask(G, entropy=0.0, mode="no_zscore")
    assert keep.tolist() == [False, False, False, True, True]
    assert (stats.threshold, stats.median, stats.iqr) == (3.5, 3.0, 2.0)
    # The rule "dynamic on raw returns" would keep exactly dynamic's rows (median and IQR are
    # affine-equivariant); no_zscore must differ on returns of a realistic scale.
    g = np.random.default_rng(1).gamma(2.0, 30.0, size=500)
    for h in (-3.0, 0.0, 3.0):
        raw_rule = g >= np.median(g) + eddf_mask(g, h)[1].entropy_scale * (
            np.percentile(g, 75) - np.percentile(g, 25)
        )
        assert np.array_equal(eddf_mask(g, h)[0], raw_rule)
        assert not np.array_equal(eddf_mask(g, h)[0], eddf_mask(g, h, mode="no_zscore")[0])
    # Without the spread, the entropy term barely moves the threshold at this scale.
    kept = [eddf_mask(g, h, mode="no_zscore")[1].rows_kept for h in (-3.0, 3.0)]
    assert abs(kept[0] - kept[1]) <= 15 and abs(kept[0] - 250) <= 15  # ~ the median, whatever H


def test_top_k_by_hand():
    g = np.arange(1.0, 11.0)  # 1..10; quantile q (linear) = 1 + 9q
    keep, stats = eddf_mask(g, entropy=0.0, mode="top_k", quantile=0.8)  # 8.2 -> 9, 10
    assert np.flatnonzero(keep).tolist() == [8, 9] and stats.threshold == pytest.approx(8.2)
    assert np.flatnonzero(eddf_mask(g, 0.0, "top_k", quantile=0.9)[0]).tolist() == [9]  # 9.1
    assert math.isnan(stats.entropy_scale)  # top_k ignores entropy


@pytest.mark.parametrize("q", [0.8, 0.9, 0.95])
def test_top_k_keeps_about_the_best_share(q):
    g = np.random.default_rng(2).normal(size=2000)
    keep, stats = eddf_mask(g, entropy=0.0, mode="top_k", quantile=q)
    assert stats.kept_fraction == pytest.approx(1 - q, abs=0.002)
    assert g[keep].min() >= g[~keep].max()  # the kept rows are the best ones


def test_random_keeps_as_many_rows_as_dynamic():
    g = np.random.default_rng(3).normal(size=300)
    g[[5, 17]] = np.nan
    dynamic, _ = eddf_mask(g, 0.5)
    chosen, stats = eddf_mask(g, 0.5, mode="random", generator=np.random.default_rng(4))
    assert chosen.sum() == dynamic.sum() == stats.rows_kept
    assert not chosen[[5, 17]].any()
    assert not np.array_equal(chosen, dynamic)
    again, _ = eddf_mask(g, 0.5, mode="random", generator=np.random.default_rng(4))
    assert np.array_equal(chosen, again)


@pytest.mark.parametrize("mode", ["dynamic", "random", "top_k", "no_zscore"])
def test_degenerate_inputs_are_defined(mode):
    keep, stats = eddf_mask(np.array([]), 0.0, mode=mode)
    assert keep.shape == (0,) and stats.kept_fraction == 0.0 and math.isnan(stats.threshold)
    assert eddf_mask(np.array([7.0]), 0.0, mode=mode)[0].tolist() == [True]
    assert eddf_mask(np.full(4, 2.5), 0.0, mode=mode)[0].all()  # nothing to prefer: keep all
    keep, stats = eddf_mask(np.array([1.0, np.nan, 5.0, np.inf]), 0.0, mode=mode)
    assert not keep[1] and not keep[3] and stats.rows_in == 4
    assert not eddf_mask(np.array([np.nan, np.nan]), 0.0, mode=mode)[0].any()
    assert eddf_mask(G, float("nan"), mode=mode)[0].any()


def test_bad_arguments_raise():
    for kwargs in ({"mode": "best"}, {"sign": "up"}, {"temperature": 0.0}, {"quantile": 1.5}):
        with pytest.raises(ValueError):
            eddf_mask(G, 0.0, **kwargs)
