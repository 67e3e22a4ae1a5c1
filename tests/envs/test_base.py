"""PixelEnv's agent-step skeleton, on a counter "simulator" whose every number is known by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from covr_lightning.envs.base import EpisodeLost, PixelEnv


class CounterEnv(PixelEnv):
    """Env step k of an episode (from 1) gives reward k; its frame is filled with k.

    ``end_at``: the simulator terminates (or, with ``truncate``, truncates) at that env step;
    ``lose_at``: the step hook raises :class:`EpisodeLost` at that env step.
    """

    task_description = "count"
    control_timestep = 0.5

    def __init__(self, action_repeat=3, frame_stack=2, cap=None, end_at=None, truncate=False):
        self.end_at, self.truncate, self.lose_at = end_at, truncate, None
        self.lasts: list[bool] = []  # the `last` flag of every env step
        self.commands: list[Any] = []
        self._set_up(
            frame_shape=(1, 2, 2),
            frame_stack=frame_stack,
            action_repeat=action_repeat,
            action_dim=2,
            max_episode_env_steps=cap,
        )

    def _reset_simulation(self, seed, options):
        self.count = 0

    def _begin_step(self, action):
        return action * 10

    def _step_simulation(self, command, last):
        if self.count + 1 == self.lose_at:
            raise EpisodeLost({"end_reason": "lost"})
        self.count += 1
        self.lasts.append(last)
        self.commands.append(command)
        ended = self.count == self.end_at
        return float(self.count), ended and not self.truncate, ended and self.truncate, {"k": 1}

    def _frame(self):
        return np.full((1, 2, 2), self.count, dtype=np.uint8)

    def render(self, height=None, width=None):
        return np.zeros((height or 2, width or 2, 3), dtype=np.uint8)


def test_spaces_and_first_observation():
    env = CounterEnv()
    assert env.observation_space.shape == (2, 2, 2) and env.observation_space.dtype == np.uint8
    assert env.action_space.shape == (2,) and env.action_space.dtype == np.float32
    obs, info = env.reset(seed=0)
    assert info == {} and obs.shape == (2, 2, 2) and (obs == 0).all()


def test_repeat_sums_rewards_counts_env_steps_and_stacks_the_last_frame():
    env = CounterEnv(action_repeat=3)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.array([0.5, -1.0]))
    assert reward == 1 + 2 + 3 and not terminated and not truncated
    assert info == {"k": 1, "env_steps": 3, "episode_return": 6.0}
    assert (obs[0] == 0).all() and (obs[1] == 3).all()  # oldest frame first
    assert env.lasts == [False, False, True]
    np.testing.assert_array_equal(env.commands[0], [5.0, -10.0])  # _begin_step, once per step
    _, reward, _, _, info = env.step(np.zeros(2))
    assert reward == 4 + 5 + 6 and info["episode_return"] == 21.0 and env.env_steps == 6


def test_the_cap_truncates_mid_repeat_and_tells_the_hook_its_last_step():
    env = CounterEnv(action_repeat=4, cap=6)
    env.reset()
    env.step(np.zeros(2))
    _, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert (terminated, truncated, info["env_steps"], reward) == (False, True, 2, 5.0 + 6.0)
    assert env.lasts == [False, False, False, True, False, True]
    with pytest.raises(RuntimeError, match="CounterEnv.step called before reset"):
        env.step(np.zeros(2))
    env.reset()
    _, _, _, _, info = env.step(np.zeros(2))
    assert info["episode_return"] == 1 + 2 + 3 + 4  # restarted at reset
    assert env.env_steps == 10  # counted since construction


@pytest.mark.parametrize(("truncate", "expected"), [(False, (True, False)), (True, (False, True))])
def test_the_simulator_ends_the_episode_inside_a_repeat(truncate, expected):
    env = CounterEnv(action_repeat=3, end_at=2, truncate=truncate)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert (terminated, truncated) == expected and info["env_steps"] == 2 and reward == 3.0
    assert (obs[1] == 2).all()  # the frame of the step the episode ended on


def test_termination_at_the_cap_is_not_also_a_truncation():
    env = CounterEnv(action_repeat=3, cap=3, end_at=3)
    env.reset()
    _, _, terminated, truncated, _ = env.step(np.zeros(2))
    assert terminated and not truncated


def test_a_lost_episode_truncates_and_keeps_the_observation():
    env = CounterEnv(action_repeat=3)
    first, _ = env.reset()
    env.lose_at = 3
    obs, reward, terminated, truncated, info = env.step(np.zeros(2))
    assert (terminated, truncated) == (False, True)
    assert info == {"end_reason": "lost", "env_steps": 2, "episode_return": 3.0}
    assert reward == 3.0 and env.env_steps == 2
    np.testing.assert_array_equal(obs, first)  # no new frame: the stack is unchanged
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2))


def test_wrong_action_shape_is_a_value_error():
    env = CounterEnv()
    env.reset()
    with pytest.raises(ValueError, match="action shape"):
        env.step(np.zeros(3))


def test_protocol_defaults_and_resolved_action_repeat():
    assert PixelEnv.max_num_envs is None and PixelEnv.episode_metrics == ()
    assert PixelEnv.codec_kind == "numeric"
    assert CounterEnv.resolved_action_repeat({}) == 1
    assert CounterEnv.resolved_action_repeat({"action_repeat": None}) == 1
    assert CounterEnv.resolved_action_repeat({"action_repeat": 5}) == 5


def test_hooks_are_required():
    class Incomplete(PixelEnv):
        def render(self, height=None, width=None):
            return np.zeros((1, 1, 3), np.uint8)

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
