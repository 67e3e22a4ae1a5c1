"""The return signal: a discounted mean reward to go, not a measure of the position in the episode."""

from __future__ import annotations

import numpy as np
import pytest

from covr_lightning.data.returns import discounted_mean_reward_to_go, discounted_return_to_go
from covr_lightning.data.sft import SFTDataModule


def test_steady_reward_gives_the_same_signal_at_every_position_of_a_cut_episode():
    rewards = np.full(100, 0.7)
    g = discounted_mean_reward_to_go(rewards, 0.99, terminated=False)
    np.testing.assert_allclose(g, 0.7)
    plain = discounted_return_to_go(rewards, 0.99)  # the old signal falls towards the end
    assert plain[0] > 4 * plain[-5]


def test_better_rewards_ahead_rank_higher_wherever_the_step_is():
    rewards = np.r_[np.zeros(50), np.ones(50)]
    g = discounted_mean_reward_to_go(rewards, 0.9, terminated=False)
    assert np.all(g[50:] == pytest.approx(1.0)) and np.all(g[:50] < 1.0)
    assert np.all(np.diff(g[:50]) > 0)  # closer to the good part, better


def test_hand_values_cut_and_terminated():
    r = np.array([1.0, 0.0, 2.0])
    gamma = 0.5
    # cut: G / sum_{k<L} gamma^k; G = [1 + 0 + 0.5, 0 + 1, 2], mass = [1.75, 1.5, 1]
    np.testing.assert_allclose(
        discounted_mean_reward_to_go(r, gamma, terminated=False), [1.5 / 1.75, 1 / 1.5, 2.0]
    )
    # terminated: the zero tail counts, g = (1 - gamma) G
    np.testing.assert_allclose(
        discounted_mean_reward_to_go(r, gamma, terminated=True), [0.75, 0.5, 1.0]
    )
    np.testing.assert_allclose(discounted_mean_reward_to_go(r, 1.0, terminated=True), [1, 1, 2])


def test_terminating_early_ranks_below_a_cut_segment_of_the_same_rewards():
    r = np.ones(10)
    ended = discounted_mean_reward_to_go(r, 0.9, terminated=True)
    cut = discounted_mean_reward_to_go(r, 0.9, terminated=False)
    assert np.all(ended < cut)


def test_sft_rows_get_the_signal_and_the_old_one_stays_available():
    def rows(signal: str) -> np.ndarray:
        sft = SFTDataModule(return_signal=signal, gamma=0.9)
        for _ in range(20):
            sft.record_step(1.0, frame=np.zeros((4, 4, 3), np.uint8), action=np.zeros(1))
        sft.end_segment(bootstrap=0.0, truncated=True)
        return np.asarray(sft.returns)

    np.testing.assert_allclose(rows("return_to_go"), 1.0)
    bootstrapped = rows("bootstrapped_return_to_go")
    np.testing.assert_allclose(bootstrapped, discounted_return_to_go(np.ones(20), 0.9))
