"""The loops with several envs (run.num_envs): env steps add up over envs, each env has its own
replay stream and D_f segment, the guide sees the envs' frames as one batch, resume checks N."""

from __future__ import annotations

import numpy as np
import pytest
from tests.loop.test_covr_loop import COVR_TINY, _loop

from covr_lightning.errors import ConfigError


def test_covr_with_two_envs_uses_both_and_batches_the_guide(workdir):
    loop = _loop([*COVR_TINY, "run.num_envs=2", "tracking.enabled=false"], "two-envs")
    batches: list[int] = []
    propose = loop.guide.propose

    def spy(frames, obs):
        assert len(obs) == len(frames)  # each query frame comes with its env's observation
        batches.append(len(frames))
        return propose(frames, obs)

    loop.guide.propose = spy
    loop.fit()
    # 2 envs x 8 env steps per iteration: the budget is met within one iteration of 1200.
    assert 1200 <= loop.env_steps < 1200 + 16
    assert loop.agent_steps == loop.env_steps // 8 and loop.updates > 0
    assert loop.replay.num_streams == 2
    written = loop.replay.frames_written
    assert written.min() > 0 and abs(int(written[0]) - int(written[1])) <= 2
    # 75 agent steps per env: three whole 25-step episodes each, all counted; none left open.
    assert loop.episodes == loop.episodes_started == 6
    # Guided rounds queried both envs at once (their episodes stay in step): a query holds one
    # frame per env, and the guide worker batches whole queries, so every batch is a multiple of 2.
    assert batches and all(size % 2 == 0 for size in batches)
    assert loop.queries.valid.shape == (2,) and loop.queries.action.shape == (2, 1)


def test_resume_with_another_num_envs_is_refused(workdir):
    from tests.helpers import TINY

    overrides = [*TINY, "run.total_env_steps=160", "covr.enabled=false", "run.num_envs=2"]
    first = _loop([*overrides, "tracking.enabled=false"], "n2")
    first.fit()
    with pytest.raises(ConfigError, match="run.num_envs=2"):
        _loop(
            [*overrides[:-1], "run.num_envs=1", "tracking.enabled=false"],
            "n2",
            resume="last",
        )
    again = _loop(
        [*overrides[:-1], "run.num_envs=2", "run.total_env_steps=320", "tracking.enabled=false"],
        "n2",
        resume="last",
    )
    again.fit()
    assert 320 <= again.env_steps < 320 + 16
    assert np.all(again.replay.frames_written > first.replay.frames_written)
