"""GuideQueries: which stored transitions carry which answer, synchronously and asynchronously.

Two envs step a real replay buffer side by side; the guide's answer is a function of the
observation it was asked about (``obs_answer``), so each stored prior can be traced to its query.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from tests.guides.test_worker import ObsGuide, obs_answer

from covr_lightning.data.replay import ReplayDataModule
from covr_lightning.guides.worker import GuideWorker
from covr_lightning.loop.guide_queries import GuideQueries

SHAPE = (3, 4, 4)  # one 3-channel frame, no stack


def _replay() -> ReplayDataModule:
    replay = ReplayDataModule(capacity=64, batch_size=4)
    replay.allocate(SHAPE, np.uint8, 1, (1,), num_streams=2)
    replay.declare_extra("prior", (1,), np.float32, 0.0)
    replay.declare_extra("prior_mask", (), np.float32, 0.0)
    replay.declare_extra("prior_pending", (), np.float32, 0.0)
    for lane in range(2):
        replay.start_episode(np.zeros(SHAPE, np.uint8), stream=lane)
    return replay


def _obs(step: int) -> np.ndarray:
    """Both envs' observations at ``step``: different per env and per step."""
    return np.stack([np.full(SHAPE, 10 * step + 5 * lane, np.uint8) for lane in range(2)])


def _play(queries: GuideQueries, replay, steps: int, every: int) -> dict[int, list[int]]:
    """Step both envs ``steps`` times, asking every ``every`` steps; stored rows by step."""
    rows: dict[int, list[int]] = {}
    for step in range(steps):
        queries.collect(replay, env_step=step)
        obs = _obs(step)
        queries.ask(np.full(2, step % every == 0), np.zeros((2, 8, 8, 3), np.uint8), obs, step)
        queries.took(np.zeros((2, 1), np.float32))
        rows[step] = []
        for lane in range(2):
            replay.add([0.0], 0.0, obs[lane], False, stream=lane, **queries.extras(lane, True))
            queries.stored(lane, int(replay.last_transition_id))
            rows[step].append(int(replay.last_transition_id))
    return rows


def _stored(replay, ids: list[int]) -> dict[str, np.ndarray]:
    batch, present = replay.transitions_at(np.asarray(ids))
    assert present.all()
    return {key: value.numpy() for key, value in batch.items()}


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("scope", ["query", "held"])
def test_each_row_carries_the_answer_to_its_query(scope, asynchronous):
    guide = ObsGuide()
    worker = GuideWorker(guide, min_batch=1, max_batch=8) if asynchronous else None
    queries = GuideQueries(guide, num_envs=2, action_dim=1, scope=scope, worker=worker)
    replay = _replay()
    try:
        rows = _play(queries, replay, steps=6, every=3)
        queries.collect(replay, env_step=6, wait=True)
    finally:
        queries.close()
    for step, ids in rows.items():
        query_step = step - step % 3
        got = _stored(replay, ids)
        assert not got["prior_pending"].any()
        expected = obs_answer(_obs(query_step))
        if scope == "query" and step != query_step:
            assert not got["prior_mask"].any()  # only the frame the guide saw is regularised
        else:
            assert got["prior_mask"].all()
            np.testing.assert_allclose(got["prior"], expected, atol=1e-6)


def test_rows_wait_masked_until_their_answer_arrives():
    guide = ObsGuide()
    guide.gate = threading.Event()  # hold the answers back
    worker = GuideWorker(guide, min_batch=1, max_batch=8)
    queries = GuideQueries(guide, num_envs=2, action_dim=1, scope="held", worker=worker)
    replay = _replay()
    try:
        rows = _play(queries, replay, steps=3, every=3)
        waiting = _stored(replay, [i for ids in rows.values() for i in ids])
        assert waiting["prior_pending"].all() and not waiting["prior_mask"].any()
        guide.gate.set()
        queries.collect(replay, env_step=3, wait=True)
        done = _stored(replay, [i for ids in rows.values() for i in ids])
        assert not done["prior_pending"].any() and done["prior_mask"].all()
        metrics = queries.pop_metrics(agent_steps=3)
        assert metrics["guide/lag_env_steps"] == 3  # asked at step 0, collected at step 3
        assert {"guide/query_ms", "guide/stall_ms", "guide/prior_distance"} <= set(metrics)
    finally:
        queries.close()


def test_the_last_answers_round_trip_through_the_checkpoint_state():
    guide = ObsGuide()
    queries = GuideQueries(guide, num_envs=2, action_dim=1, scope="query")
    queries.ask(np.ones(2, bool), np.zeros((2, 8, 8, 3), np.uint8), _obs(4), env_step=0)
    restored = GuideQueries(guide, num_envs=2, action_dim=1, scope="query")
    restored.load_state_dict(queries.state_dict())
    np.testing.assert_array_equal(restored.action, obs_answer(_obs(4)))
    assert restored.valid.all()
