"""Each env's guide queries, their answers, and the stored transitions that carry them.

:class:`~covr_lightning.loop.covr_loop.COVRLoop` asks the guide every ``guide_every`` frames in a
guided round; this module is the bookkeeping between a question and the replay rows its answer
a_v belongs to:

- **Synchronous** (``covr.guide_async: false``): the guide answers before the agent acts, and
  the answer is stored with the transition(s) as they are written.
- **Asynchronous** (the default): the frames go to a :class:`~covr_lightning.guides.worker.
  GuideWorker` thread and the agent keeps stepping. A transition whose answer is still on the way
  is stored masked and *pending*; when the answer arrives, :meth:`GuideQueries.collect` writes it
  into every row that was stored for that query (``replay.update_extra``).

Which rows carry an answer is ``covr.prior_scope``: ``query``, only the transition of the frame
the guide saw; ``held``, that one and every later one of the env until its next query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from covr_lightning.guides.base import Guide
from covr_lightning.guides.worker import GuideWorker

if TYPE_CHECKING:
    from covr_lightning.data.replay import ReplayDataModule


@dataclass
class _Query:
    """One env's guide query while its answer is on the way (asynchronous guidance).

    Attributes:
        lane: The env that asked.
        env_step: The loop's env step when it asked (the answer's lag is counted from here).
        rows: Replay ids of the transitions stored since that carry this query's answer.
        taken: The action the policy took at the query step (for ``guide/prior_distance``).
    """

    lane: int
    env_step: int
    rows: list[int] = field(default_factory=list)
    taken: np.ndarray | None = None


class GuideQueries:
    """The priors of ``num_envs`` envs: asked, answered, and written to their transitions.

    Args:
        guide: The prior source.
        num_envs: Envs stepping side by side (one lane each).
        action_dim: Size of an action (and of a_v).
        scope: ``covr.prior_scope``: ``query`` or ``held``.
        worker: The guide's worker thread (asynchronous guidance), or ``None`` (synchronous).

    Attributes:
        action: ``(num_envs, action_dim)`` a_v of each env's last answered query.
        valid: ``(num_envs,)`` whether that answer could be read.
    """

    def __init__(
        self,
        guide: Guide,
        num_envs: int,
        action_dim: int,
        scope: Literal["query", "held"],
        worker: GuideWorker | None = None,
    ) -> None:
        self.guide, self.worker, self.scope = guide, worker, scope
        self.action_dim = action_dim
        self.action = np.zeros((num_envs, action_dim), np.float32)
        self.valid = np.zeros(num_envs, dtype=bool)
        self._asked = np.zeros(num_envs, dtype=bool)  # which envs asked at this step
        # Asynchronous only: queries in flight by ticket; each env's newest such query; the
        # query the row being stored now belongs to.
        self._in_flight: dict[int, _Query] = {}
        self._lane_query: list[_Query | None] = [None] * num_envs
        self._row_query: list[_Query | None] = [None] * num_envs
        self._next_ticket = 0
        self._lags: list[int] = []
        self._distances: list[float] = []
        self._seconds = 0.0  # the agent's time spent asking (a stall when synchronous)

    # ------------------------------------------------------------------ asking

    def ask(
        self, asked: np.ndarray, frames: np.ndarray | None, obs: np.ndarray, env_step: int
    ) -> None:
        """The envs flagged in ``asked`` query the guide with their frames, as one batch.

        Args:
            asked: ``(num_envs,)`` bool: the envs that ask at this step.
            frames: ``(num_envs, H, W, 3)`` VLM-sized renders (rows of envs that do not ask are
                ignored); ``None`` when no env asks.
            obs: ``(num_envs, *obs_shape)`` the agent's observations of the same step.
            env_step: The loop's env step now.
        """
        self._asked = np.asarray(asked, dtype=bool).copy()
        lanes = np.flatnonzero(self._asked)
        if not len(lanes):
            return
        start = time.perf_counter()
        if self.worker is None:
            self.action[lanes], self.valid[lanes] = self.guide.propose(frames[lanes], obs[lanes])
        else:
            tickets = [self._open(int(lane), env_step) for lane in lanes]
            self.worker.submit(tickets, frames[lanes], obs[lanes])
        self._seconds += time.perf_counter() - start

    def _open(self, lane: int, env_step: int) -> int:
        """Register env ``lane``'s new query; its ticket."""
        ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
        query = _Query(lane=lane, env_step=env_step)
        self._in_flight[ticket] = query
        self._lane_query[lane] = query
        return ticket

    def took(self, actions: np.ndarray) -> None:
        """The actions the policy took at the step that asked (for ``guide/prior_distance``)."""
        for lane in np.flatnonzero(self._asked):
            if self.worker is not None:
                self._lane_query[lane].taken = actions[lane].copy()
            elif self.valid[lane]:
                self._distances.append(float(np.linalg.norm(self.action[lane] - actions[lane])))

    # ------------------------------------------------------------------ answers -> rows

    def extras(self, lane: int, guided: bool) -> dict[str, Any]:
        """The replay extras of env ``lane``'s transition being stored now.

        Mask 0 when unguided, invalid, or (``query`` scope) on every transition but the one whose
        frame the guide saw. A transition whose answer has not arrived is stored masked and
        pending; :meth:`collect` fills it in.

        Args:
            lane: The env.
            guided: Whether the round is guided (lambda > 0).
        """
        covered = self.scope == "held" or bool(self._asked[lane])
        waiting = self._lane_query[lane] if covered else None
        self._row_query[lane] = waiting
        if waiting is not None:
            return {
                "prior": np.zeros(self.action_dim, np.float32),
                "prior_mask": np.float32(0.0),
                "prior_pending": np.float32(1.0),
            }
        return {
            "prior": self.action[lane],
            "prior_mask": np.float32(guided and bool(self.valid[lane]) and covered),
            "prior_pending": np.float32(0.0),
        }

    def stored(self, lane: int, row: int) -> None:
        """Env ``lane``'s transition went to replay row ``row`` (it waits for its answer, if so)."""
        if (query := self._row_query[lane]) is not None:
            query.rows.append(row)

    def collect(self, replay: ReplayDataModule, env_step: int, wait: bool = False) -> None:
        """Write the worker's arrived answers into the transitions stored while they were away.

        Args:
            replay: Where the rows are.
            env_step: The loop's env step now (for the answers' lag).
            wait: Wait for every answer still on the way (at the end of an RL phase and before a
                checkpoint, so neither sees a prior in flight).
        """
        if self.worker is None:
            return
        for answer in self.worker.drain() if wait else self.worker.poll():
            query = self._in_flight.pop(answer.ticket)
            if query.rows:
                replay.update_extra("prior", query.rows, answer.action)
                replay.update_extra("prior_mask", query.rows, np.float32(answer.valid))
                replay.update_extra("prior_pending", query.rows, np.float32(0.0))
            if self._lane_query[query.lane] is query:  # still the env's newest query
                self.action[query.lane] = answer.action
                self.valid[query.lane] = answer.valid
                self._lane_query[query.lane] = None
            self._lags.append(env_step - query.env_step)
            if answer.valid and query.taken is not None:
                self._distances.append(float(np.linalg.norm(answer.action - query.taken)))

    # ------------------------------------------------------------------ metrics and state

    def pop_metrics(self, agent_steps: int) -> dict[str, float]:
        """``guide/*`` figures since the last call, then reset.

        Args:
            agent_steps: Agent steps taken since the last call (for ``guide/stall_ms``).
        """
        metrics: dict[str, float] = {}
        queries = self.guide.queries
        rate = self.guide.pop_invalid_rate()
        if self.worker is not None:
            stats = self.worker.pop_stats()
            if stats["frames"]:
                metrics["guide/query_ms"] = 1000 * stats["busy_seconds"] / stats["frames"]
                metrics["guide/batch_frames"] = stats["frames"] / stats["calls"]
            if self._lags:
                metrics["guide/lag_env_steps"] = float(np.mean(self._lags))
        elif queries:
            metrics["guide/query_ms"] = 1000 * self._seconds / queries
        if rate is not None:
            metrics["guide/invalid_rate"] = rate
        if agent_steps:
            # What guidance costs the agent: time it did not step, per agent step.
            metrics["guide/stall_ms"] = 1000 * self._seconds / agent_steps
        if self._distances:
            metrics["guide/prior_distance"] = float(np.mean(self._distances))
        self._seconds, self._distances, self._lags = 0.0, [], []
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Each env's last answer (a checkpoint is written with no query in flight)."""
        return {
            "prior_action": torch.from_numpy(self.action.copy()),
            "prior_valid": torch.from_numpy(self.valid.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore each env's last answer."""
        n = len(self.valid)
        self.action = state["prior_action"].numpy().astype(np.float32).reshape(n, -1)
        self.valid = np.asarray(state["prior_valid"], dtype=bool).reshape(n)

    def close(self) -> None:
        """Stop the worker thread, if any."""
        if self.worker is not None:
            self.worker.close()


__all__ = ["GuideQueries"]
