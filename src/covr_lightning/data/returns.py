"""Return signals g for EDDF and RALW.

``return_to_go`` (default): the discounted return of the episode segment from each step,

    G_t = r_t + gamma * G_{t+1},    G_T = bootstrap

computed when a segment ends. For an episode that *terminated*, bootstrap is 0; for a segment cut
by a time limit or by the end of a collection round, the caller passes the critic's value of the
last observation (or 0 and marks the rows as truncated). ``immediate_reward`` is r_t itself and
``q_value`` the critic's Q(s_t, a_t) at filter time (the COVR loop asks the critic and passes the
values to ``SFTDataModule.build``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ReturnSignal = Literal["return_to_go", "immediate_reward", "q_value"]


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
