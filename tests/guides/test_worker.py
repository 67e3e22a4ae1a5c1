"""Asynchronous guidance: the worker thread's batching and errors, and the loop writing late answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe
from covr_lightning.guides.base import Guide
from covr_lightning.guides.worker import GuideWorker, auto_min_batch
from tests.guides.test_guides import GUIDED


def obs_answer(obs: np.ndarray, action_dim: int = 1) -> np.ndarray:
    """A guide's answer that a test can recompute from the observation it was asked about."""
    flat = np.asarray(obs, np.float32).reshape(len(obs), -1)
    column = np.tanh(flat.mean(1) / 64 - 1) + 0.01 * np.tanh(flat.std(1) / 64 - 1)
    return np.repeat(column[:, None], action_dim, 1).astype(np.float32)


class ObsGuide(Guide):
    """Answers :func:`obs_answer` after ``delay`` seconds; records each call's batch size."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay, self.action_dim = delay, 1
        self.gate: threading.Event | None = None  # set by a test to hold the answers back
        self.entered = threading.Event()  # set when a call starts
        self.batch_sizes: list[int] = []
        self.threads: list[int] = []

    def _propose(self, frames, obs):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=10)
        time.sleep(self.delay)
        self.batch_sizes.append(len(frames))
        self.threads.append(torch.get_num_threads())
        return obs_answer(obs, self.action_dim), np.ones(len(frames), bool)

    @classmethod
    def build(cls, context, **init_args) -> ObsGuide:
        guide = cls(**init_args)
        guide.action_dim = len(context.action_low)
        return guide


class FailingGuide(Guide):
    def _propose(self, frames, obs):
        raise ValueError("the guide broke")


def _query(count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    obs = np.arange(start, start + count, dtype=np.float32)[:, None, None, None] * np.ones(
        (1, 3, 4, 4), np.float32
    )
    return np.zeros((count, 8, 8, 3), np.uint8), obs


def test_answers_match_the_guide_and_keep_their_tickets():
    worker = GuideWorker(ObsGuide(), max_batch=8)
    frames, obs = _query(5)
    worker.submit([10, 11, 12, 13, 14], frames, obs)
    answers = sorted(worker.drain(), key=lambda a: a.ticket)
    assert [a.ticket for a in answers] == [10, 11, 12, 13, 14] and worker.pending == 0
    np.testing.assert_array_equal(np.stack([a.action for a in answers]), obs_answer(obs))
    assert all(a.valid for a in answers)
    worker.close()


def test_queries_that_queue_while_the_guide_works_are_answered_as_one_batch():
    gate = threading.Event()
    guide = ObsGuide()
    guide.gate = gate
    worker = GuideWorker(guide, max_batch=3)
    worker.submit([0], *_query(1))
    assert guide.entered.wait(timeout=10)  # the worker holds the first query
    for i in range(1, 5):  # these four queue behind it
        worker.submit([i], *_query(1, start=i))
    time.sleep(0.1)
    assert worker.poll() == [] and worker.pending == 5  # nothing answered while the gate is shut
    gate.set()
    answers = worker.drain()
    assert sorted(a.ticket for a in answers) == [0, 1, 2, 3, 4]
    assert guide.batch_sizes == [1, 3, 1]  # merged up to max_batch frames
    worker.close()


def test_the_worker_waits_for_min_batch_frames_unless_drained():
    guide = ObsGuide()
    worker = GuideWorker(guide, min_batch=4, max_batch=8)
    for i in range(3):
        worker.submit([i], *_query(1, start=i))
    time.sleep(0.2)
    assert worker.poll() == [] and guide.batch_sizes == []  # three frames: still collecting
    worker.submit([3, 4], *_query(2, start=3))  # five now: one call answers all
    answers = []
    for _ in range(100):
        answers += worker.poll()
        if len(answers) == 5:
            break
        time.sleep(0.05)
    assert sorted(a.ticket for a in answers) == [0, 1, 2, 3, 4] and guide.batch_sizes == [5]
    worker.submit([5], *_query(1, start=5))
    assert [a.ticket for a in worker.drain()] == [5]  # drain answers fewer than min_batch
    assert guide.batch_sizes == [5, 1]
    worker.close()


def test_the_worker_runs_on_its_own_thread_count():
    guide = ObsGuide()
    before = torch.get_num_threads()
    worker = GuideWorker(guide, threads=1)
    worker.submit([0], *_query(1))
    worker.drain()
    worker.close()
    assert guide.threads == [1] and torch.get_num_threads() == before


def test_a_guide_error_reaches_the_agent_thread():
    worker = GuideWorker(FailingGuide())
    worker.submit([0], *_query(1))
    with pytest.raises(ValueError, match="the guide broke"):
        worker.drain()
    assert worker.pending == 0 and worker.poll() == []  # raised once, nothing left waiting
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit([1], *_query(1))


def test_tickets_frames_and_observations_must_pair_up():
    worker = GuideWorker(ObsGuide())
    with pytest.raises(ValueError, match="2 tickets, 1 frames"):
        worker.submit([0, 1], *_query(1))
    worker.close()


def _rows(loop) -> dict[str, np.ndarray]:
    """Every stored transition in order (ids skip the first frame of each episode)."""
    batch, present = loop.replay.transitions_at(np.arange(loop.replay.last_transition_id + 1))
    assert present.sum() == 50  # two 25-step episodes
    return {key: value.numpy()[present] for key, value in batch.items()}


@pytest.mark.parametrize("scope", ["query", "held"])
def test_late_answers_land_on_the_transitions_they_belong_to(workdir, scope):
    """A guide slower than the agent: rows are stored pending and get their answer later."""
    cfg = load_recipe(
        "quickstart",
        [
            *GUIDED,
            "guide.class_path=tests.guides.test_worker.ObsGuide",
            "guide.init_args.delay=0.05",
            f"covr.prior_scope={scope}",
            f"run.name=late-{scope}",
        ],
    )
    loop = build_loop(cfg)
    assert loop.queries.worker is not None  # asynchronous is the default
    backfilled = []
    update_extra = loop.replay.update_extra

    def spy(name, ids, value):
        backfilled.append((name, len(ids)))
        return update_extra(name, ids, value)

    loop.replay.update_extra = spy
    loop.fit()
    rows = _rows(loop)
    assert any(name == "prior" and count for name, count in backfilled)  # answers came late
    assert rows["prior_pending"].sum() == 0  # every answer landed by the end of the round
    obs, prior, mask = rows["obs"], rows["prior"], rows["prior_mask"] > 0
    # Query steps are 0, 10, 20 of each 25-step episode (two episodes of 400 env steps).
    queries = [0, 10, 20, 25, 35, 45]
    if scope == "query":
        assert np.flatnonzero(mask).tolist() == queries
        np.testing.assert_allclose(prior[mask], obs_answer(obs[mask]), atol=1e-6)
    else:
        assert mask.all()
        for start, end in zip(queries, [*queries[1:], 50], strict=True):
            expected = obs_answer(obs[start : start + 1])
            np.testing.assert_allclose(prior[start:end], np.repeat(expected, end - start, 0))


def test_the_synchronous_path_stays_available(workdir):
    cfg = load_recipe(
        "quickstart",
        [
            *GUIDED,
            "guide.class_path=tests.guides.test_worker.ObsGuide",
            "covr.guide_async=false",
            "run.name=sync",
        ],
    )
    loop = build_loop(cfg)
    assert loop.queries.worker is None
    loop.fit()
    rows = _rows(loop)
    mask = rows["prior_mask"] > 0
    assert np.flatnonzero(mask).tolist() == [0, 10, 20, 25, 35, 45]
    np.testing.assert_allclose(rows["prior"][mask], obs_answer(rows["obs"][mask]), atol=1e-6)


def test_the_automatic_min_batch_fills_in_about_the_same_agent_steps_at_every_cadence():
    assert auto_min_batch(guide_every=1, num_envs=1, max_batch=32) == 32
    assert auto_min_batch(guide_every=10, num_envs=1, max_batch=32) == 4  # ceil(32 / 10)
    assert auto_min_batch(guide_every=10, num_envs=4, max_batch=32) == 13  # 4 frames a query
    assert auto_min_batch(guide_every=1, num_envs=8, max_batch=32) == 32  # capped
    assert auto_min_batch(guide_every=100, num_envs=1, max_batch=32) == 1  # never below one
    assert auto_min_batch(guide_every=1, num_envs=1, max_batch=8) == 8
