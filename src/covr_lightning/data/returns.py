"""Return signals g for EDDF and RALW.

``return_to_go`` (default): the discounted return-to-go of the episode segment from each step,
divided by the discount mass of the steps it covers (docs/method.md, "Return signal"):

    g_t = sum_{k<L} gamma^k r_{t+k} / sum_{k<L} gamma^k        L = steps left in the segment

for a segment cut by a time limit or by the end of a round (nothing is known past the cut), and
``(1 - gamma) G_t`` for an episode that *terminated* (the zero rewards after the end count:
ending early is bad). It is a discounted *mean* reward to go, in reward units: on a task with a
steady reward it does not depend on where in the episode the step was, which the plain
return-to-go of a time-limited episode, ``r (1 - gamma^L) / (1 - gamma)``, mostly measures.

``bootstrapped_return_to_go``: the plain G_t = r_t + gamma G_{t+1}, G_T = the critic's value of
the last observation at a cut (0 before the first update) or 0 at termination.
``immediate_reward`` is r_t itself and ``q_value`` the critic's Q(s_t, a_t) at filter time (the
COVR loop asks the critic and passes the values to ``SFTDataModule.build``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ReturnSignal = Literal["return_to_go", "bootstrapped_return_to_go", "immediate_reward", "q_value"]


def discounted_return_to_go(
    rewards: np.ndarray, gamma: float, bootstrap: float = 0.0
) -> np.ndarray:
    """G_t = sum_{k >= t} gamma^(k - t) r_k + gamma^(T - t) * bootstrap, for every t of a segment.

    Args:
        rewards: ``(T,)`` rewards of one episode segment, in order.
        gamma: Discount in [0, 1].
        bootstrap: Value of the state after the last step (0 if the episode terminated).

    Returns:
        ``(T,)`` float64 returns-to-go.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    out = np.empty_like(r)
    running = float(bootstrap)
    for t in range(r.size - 1, -1, -1):  # one backward pass: O(T)
        running = r[t] + gamma * running
        out[t] = running
    return out


def discounted_mean_reward_to_go(rewards: np.ndarray, gamma: float, terminated: bool) -> np.ndarray:
    """g_t = sum_{k<L} gamma^k r_{t+k} / M_t: the discounted mean reward of the rest of a segment.

    M_t = sum_{k<L} gamma^k over the L = T - t steps left when the segment was *cut* (time limit,
    end of a round); when it *terminated*, the zero rewards after the end count too, so
    M_t = 1 / (1 - gamma) and g_t = (1 - gamma) G_t (for gamma = 1, where that tail has no
    finite weight, g_t is the plain mean of the rewards left).

    Args:
        rewards: ``(T,)`` rewards of one episode segment, in order.
        gamma: Discount in [0, 1].
        terminated: Whether the segment ended in a terminal state.

    Returns:
        ``(T,)`` float64 g.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    returns = discounted_return_to_go(r, gamma, 0.0)
    left = np.arange(r.size, 0, -1, dtype=np.float64)  # L = T - t
    if gamma == 1.0:
        return returns / left
    if terminated:
        return (1.0 - gamma) * returns
    mass = (1.0 - gamma**left) / (1.0 - gamma)  # sum_{k<L} gamma^k
    return returns / mass
