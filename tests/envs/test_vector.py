"""Envs stepped together in worker processes must give what the same envs give one by one."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from covr_lightning.envs.dmc import DMCEnv
from covr_lightning.envs.vector import EnvPool, env_factories
from covr_lightning.errors import ConfigError

ARGS = {"domain": "cartpole", "task": "swingup", "image_size": 32, "max_episode_env_steps": 48}


@pytest.fixture(scope="module")
def pool():
    envs = EnvPool(env_factories(DMCEnv, ARGS, [1, 2]))
    yield envs
    envs.close()


def test_workers_step_like_sequential_envs(pool):
    sequential = [DMCEnv(**ARGS, seed=1), DMCEnv(**ARGS, seed=2)]
    rng = np.random.default_rng(0)
    for episode in range(2):  # the second episode checks per-env resets mid-run
        for i, env in enumerate(sequential):
            seed = 100 * episode + i
            np.testing.assert_array_equal(pool.reset(i, seed), env.reset(seed=seed)[0])
        done = False
        while not done:
            actions = rng.uniform(-1, 1, (2, 1)).astype(np.float32)
            obs, rewards, terminated, truncated, infos = pool.step(actions)
            for i, env in enumerate(sequential):
                o, r, te, tr, info = env.step(actions[i])
                np.testing.assert_array_equal(obs[i], o)
                assert (rewards[i], terminated[i], truncated[i]) == (r, te, tr)
                assert infos[i]["env_steps"] == info["env_steps"] == 8
            done = bool(truncated.all())
        assert done and not terminated.any()  # 48 env steps = 6 agent steps, then the cap
    views = pool.render(40, 40)
    assert views.shape == (2, 40, 40, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[0], sequential[0].render(40, 40))
    assert pool.get_attr("action_repeat") == (8, 8)


def test_one_env_runs_in_process():
    one = EnvPool(env_factories(DMCEnv, ARGS, [3]))
    assert type(one._vec).__name__ == "SyncVectorEnv"
    assert one.reset(0, 5).shape == (9, 32, 32)
    one.close()


def test_empty_pool_is_a_config_error():
    with pytest.raises(ConfigError, match="num_envs"):
        EnvPool([])


def _threads_after_build(factory) -> str | None:
    """In a spawned process: build the env, report the OpenMP thread setting it ran under."""
    factory().close()
    return os.environ.get("OMP_NUM_THREADS")


def test_workers_get_one_omp_thread_and_the_main_process_keeps_its_setting(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (factory,) = env_factories(DMCEnv, {**ARGS, "obs": "state"}, [0])
    with multiprocessing.get_context("spawn").Pool(1) as workers:
        assert workers.apply(_threads_after_build, (factory,)) == "1"
    factory().close()  # in the main process: nothing leaks into later subprocesses
    assert "OMP_NUM_THREADS" not in os.environ
