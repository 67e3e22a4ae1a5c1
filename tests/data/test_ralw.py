"""RALW weights, the N_v-normalised loss and discounted return-to-go, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covr_lightning.data.ralw import normalise_returns, ralw_loss, ralw_weights
from covr_lightning.data.returns import discounted_return_to_go


def test_weights_by_hand():
    # [4, 5, 7]: min 4, max 7 -> g_bar = [-1, -1/3, 1] -> w = [0, 0, 1]
    np.testing.assert_allclose(normalise_returns([4, 5, 7]), [-1, -1 / 3, 1])
    np.testing.assert_allclose(ralw_weights([4, 5, 7]), [0, 0, 1])
    # [0..4]: g_bar = [-1, -0.5, 0, 0.5, 1] -> w = [0, 0, 0, 0.5, 1]
    np.testing.assert_allclose(ralw_weights([0, 1, 2, 3, 4]), [0, 0, 0, 0.5, 1])


def test_degenerate_weights():
    assert ralw_weights([]).shape == (0,)
    np.testing.assert_allclose(ralw_weights([2.0, 2.0]), [1, 1])  # nothing to prefer
    np.testing.assert_allclose(ralw_weights([3.0]), [1])
    np.testing.assert_allclose(ralw_weights([1.0, np.nan, 3.0]), [0, 0, 1])


def test_weights_in_unit_interval_and_zero_exactly_where_normalised_return_is_not_positive():
    g = np.random.default_rng(0).normal(size=1000)
    w, g_bar = ralw_weights(g), normalise_returns(g)
    assert w.min() >= 0 and w.max() == 1.0
    assert np.array_equal(w == 0, g_bar <= 0)
    np.testing.assert_allclose(w[g_bar > 0], g_bar[g_bar > 0])


def test_ablation_modes():
    np.testing.assert_array_equal(ralw_weights([1, 5, 9], mode="none"), [1, 1, 1])
    w = ralw_weights(np.zeros(500), mode="random", generator=np.random.default_rng(1))
    assert w.min() >= 0 and w.max() < 1 and 0.45 < w.mean() < 0.55
    again = ralw_weights(np.zeros(500), mode="random", generator=np.random.default_rng(1))
    np.testing.assert_array_equal(w, again)
    with pytest.raises(ValueError):
        ralw_weights([1.0], mode="rank")


def test_loss_by_hand():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    target = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])  # prompt tokens masked out
    # per-row target NLL = [2 + 3, 6] = [5, 6]
    # w = [0.5, 0]: N_v = 1 -> L = 0.5 * 5 / 1 = 2.5
    assert ralw_loss(nll, target, torch.tensor([0.5, 0.0])).item() == pytest.approx(2.5)
    # w = [0.5, 1]: N_v = 2 -> L = (2.5 + 6) / 2 = 4.25
    assert ralw_loss(nll, target, torch.tensor([0.5, 1.0])).item() == pytest.approx(4.25)
    # no valid row: 0, not a division by zero
    assert ralw_loss(nll, target, torch.zeros(2)).item() == 0.0


def test_return_to_go_by_hand_and_against_brute_force():
    # gamma 0.5, rewards [1, 1, 1]: G2 = 1, G1 = 1.5, G0 = 1.75
    np.testing.assert_allclose(discounted_return_to_go([1, 1, 1], 0.5), [1.75, 1.5, 1.0])
    # bootstrap 4 (truncated segment): G2 = 1 + 2 = 3, G1 = 2.5, G0 = 2.25
    np.testing.assert_allclose(discounted_return_to_go([1, 1, 1], 0.5, 4.0), [2.25, 2.5, 3.0])
    rng = np.random.default_rng(2)
    rewards, gamma, bootstrap = rng.normal(size=40), 0.97, 1.3
    brute = [
        sum(gamma ** (k - t) * rewards[k] for k in range(t, 40)) + gamma ** (40 - t) * bootstrap
        for t in range(40)
    ]
    np.testing.assert_allclose(discounted_return_to_go(rewards, gamma, bootstrap), brute)
