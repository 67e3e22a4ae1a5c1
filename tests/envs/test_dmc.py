"""DMCEnv: spaces, frame stacking, action repeat and env-step counting, seeding, rendering, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import covr_lightning
from covr_lightning.config import load_recipe
from covr_lightning.envs import DMCEnv
from covr_lightning.envs.dmc import (
    PAPER_ACTION_REPEAT,
    _LargeFrameRenderer,
    _rescale_action,
    default_action_repeat,
)
from covr_lightning.errors import ConfigError

from dm_control import suite  # isort: skip  (after envs.dmc, which picks MuJoCo's GL backend)

SIZE = 64  # small frames keep the file fast on 2 CPU cores
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the EGL default applies to headless Linux"
)


@pytest.fixture
def make_env():
    envs: list[DMCEnv] = []

    def make(**kwargs) -> DMCEnv:
        kwargs.setdefault("image_size", SIZE)
        env = DMCEnv(**kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def test_default_action_repeat_follows_paper_table():
    assert PAPER_ACTION_REPEAT == {
        "cartpole": 8,
        "finger": 2,
        "walker": 2,
        "cheetah": 4,
        "reacher": 4,
        "ball_in_cup": 4,
    }
    assert default_action_repeat("cartpole") == 8
    assert default_action_repeat("humanoid") == 2  # hard-task convention


def test_pixel_spaces_and_stack_at_reset(make_env):
    env = make_env(domain="cheetah", task="run", frame_stack=3)
    assert env.observation_space.shape == (9, SIZE, SIZE)
    assert env.observation_space.dtype == np.uint8
    assert env.action_space.shape == (6,)
    assert env.action_space.dtype == np.float32
    assert (env.action_space.low == -1).all() and (env.action_space.high == 1).all()
    assert env.frame_shape == (3, SIZE, SIZE) and env.frame_stack == 3
    assert env.action_repeat == 4  # cheetah default

    obs, _ = env.reset()
    assert obs.shape == (9, SIZE, SIZE) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs[0:3], obs[3:6])  # stack = copies of the first frame
    np.testing.assert_array_equal(obs[3:6], obs[6:9])
    assert obs.std() > 5  # a real picture, not a blank buffer

    next_obs, *_ = env.step(np.ones(6, dtype=np.float32))
    np.testing.assert_array_equal(next_obs[0:6], obs[3:9])  # the stack shifts by one frame
    assert not np.array_equal(next_obs[6:9], obs[6:9])  # the newest frame moved
    # The newest frame of an observation is what render() shows now.
    np.testing.assert_array_equal(next_obs[6:9], env.render().transpose(2, 0, 1))


def test_action_repeat_env_steps_and_summed_reward_match_raw_dm_control(make_env):
    env = make_env(domain="cartpole", task="swingup", action_repeat=3, seed=7, obs="state")
    raw = suite.load("cartpole", "swingup", task_kwargs={"random": 7})
    env.reset()
    raw.reset()
    actions = np.random.default_rng(0).uniform(-1, 1, size=(4, 1)).astype(np.float32)
    for k, action in enumerate(actions, start=1):
        _, reward, terminated, truncated, info = env.step(action)
        expected = sum(raw.step(action.astype(np.float64)).reward for _ in range(3))
        assert reward == pytest.approx(expected)
        assert info["env_steps"] == 3 and env.env_steps == 3 * k
        assert info["discount"] == 1.0
        assert not terminated and not truncated
    np.testing.assert_allclose(
        env._frames.newest,
        np.concatenate([v.ravel() for v in raw._task.get_observation(raw.physics).values()]),
        rtol=1e-6,
    )


def test_max_episode_env_steps_truncates_mid_repeat(make_env):
    env = make_env(domain="cheetah", task="run", action_repeat=4, max_episode_env_steps=10)
    env.reset()
    results = [env.step(np.zeros(6)) for _ in range(3)]
    assert [r[4]["env_steps"] for r in results] == [4, 4, 2]  # the last repeat is cut short
    assert [r[3] for r in results] == [False, False, True]
    assert not any(r[2] for r in results)
    assert results[-1][4]["episode_return"] == pytest.approx(sum(r[1] for r in results))
    assert env.env_steps == 10
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(6))
    env.reset()
    _, first_reward, _, _, info = env.step(np.zeros(6))
    assert env.env_steps == 14  # counted since construction, across episodes
    assert info["episode_return"] == pytest.approx(first_reward)  # the return restarts at reset


def test_time_limit_truncates_and_zero_discount_terminates(make_env):
    env = make_env(domain="cartpole", task="balance", obs="state", action_repeat=4)
    env.reset()
    env._env._step_limit = 6  # dm_control's own time limit, shortened: ends with discount 1
    env.step(np.zeros(1))
    _, _, terminated, truncated, info = env.step(np.zeros(1))
    assert (terminated, truncated, info["env_steps"], info["discount"]) == (False, True, 2, 1.0)

    env._env._step_limit = float("inf")
    env._env.task.get_termination = lambda physics: 0.0  # a failure state: discount 0
    env.reset()
    _, _, terminated, truncated, info = env.step(np.zeros(1))
    assert (terminated, truncated, info["env_steps"], info["discount"]) == (True, False, 1, 0.0)


def test_same_seed_same_frames_and_reset_seed_reseeds(make_env):
    a = make_env(domain="cheetah", task="run", seed=3, frame_stack=1)
    b = make_env(domain="cheetah", task="run", seed=3, frame_stack=1)
    c = make_env(domain="cheetah", task="run", seed=0, frame_stack=1)
    obs_a, _ = a.reset()
    obs_b, _ = b.reset()
    obs_c, _ = c.reset(seed=3)  # reseeding == constructing with that seed
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(obs_a, obs_c)
    action = np.linspace(-1, 1, 6, dtype=np.float32)
    step_a, step_b = a.step(action), b.step(action)
    np.testing.assert_array_equal(step_a[0], step_b[0])
    assert step_a[1] == step_b[1]
    other, _ = make_env(domain="cheetah", task="run", seed=4, frame_stack=1).reset()
    assert not np.array_equal(obs_a, other)


def test_state_mode_is_a_flat_unstacked_vector(make_env):
    env = make_env(domain="cheetah", task="run", obs="state", frame_stack=3)
    assert env.frame_stack == 1
    assert env.frame_shape == (17,)  # cheetah: 8 positions + 9 velocities
    assert env.observation_space.shape == (17,) and env.observation_space.dtype == np.float32
    obs, _ = env.reset()
    assert obs.shape == (17,) and obs.dtype == np.float32
    obs, *_ = env.step(np.zeros(6))
    assert obs.shape == (17,) and obs.dtype == np.float32
    assert env.render().shape == (SIZE, SIZE, 3)  # state mode can still render


def test_rescale_action_maps_unit_box_onto_spec_bounds():
    low, high = np.array([0.0, -2.0, 10.0]), np.array([1.0, 2.0, 20.0])
    np.testing.assert_allclose(_rescale_action(np.array([-1, -1, -1]), low, high), low)
    np.testing.assert_allclose(_rescale_action(np.array([1, 1, 1]), low, high), high)
    np.testing.assert_allclose(
        _rescale_action(np.array([0, 0.5, -0.5]), low, high), [0.5, 1.0, 12.5]
    )
    np.testing.assert_allclose(_rescale_action(np.array([3, -3, 0]), low, high), [1.0, -2.0, 15.0])


def test_step_passes_rescaled_action_to_dm_control(make_env):
    env = make_env(domain="cartpole", task="balance", obs="state", action_repeat=2)
    env._action_low, env._action_high = np.array([0.0]), np.array([4.0])
    seen: list[np.ndarray] = []
    inner_step = env._env.step

    def spy(action):
        seen.append(np.array(action))
        return inner_step(action)

    env._env.step = spy
    env.reset()
    env.step(np.array([0.5], dtype=np.float32))
    assert len(seen) == 2  # action repeat
    np.testing.assert_allclose(seen, [[3.0], [3.0]])


def test_render_any_size(make_env):
    env = make_env(domain="walker", task="walk", frame_stack=1)
    env.reset()
    small = env.render()
    assert small.shape == (SIZE, SIZE, 3) and small.dtype == np.uint8
    big = env.render(224, 224)
    assert big.shape == (224, 224, 3) and big.dtype == np.uint8 and big.std() > 5
    assert env.render(100, 150).shape == (100, 150, 3)  # a second large size rebuilds its buffer
    assert env.render(32, 48).shape == (32, 48, 3)  # smaller than the policy buffer
    # The large-frame context draws exactly what the policy camera draws.
    large = _LargeFrameRenderer(env._env.physics, SIZE, SIZE, env.camera_id)
    try:
        np.testing.assert_array_equal(large.render(env._env.physics), small)
    finally:
        large.close()
    # The large-frame context leaves the policy buffer small (and the frames fast).
    vis = env._env.physics.model.vis
    assert (vis.global_.offwidth, vis.global_.offheight, vis.quality.offsamples) == (SIZE, SIZE, 0)


def test_quadruped_uses_camera_2(make_env):
    assert make_env(domain="quadruped", task="walk", obs="state").camera_id == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": "cheetah", "task": "walk"}, "cheetah/walk.*run"),
        ({"domain": "chetah", "task": "run"}, "chetah.*cheetah"),
        ({"camera_id": 9}, "camera_id"),
    ],
)
def test_bad_config_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as excinfo:
        DMCEnv(**kwargs)
    assert "Fix:" in str(excinfo.value)


@pytest.mark.parametrize(
    "override",
    [
        "env.obs=rgb",
        "env.image_size=0",
        "env.frame_stack=0",
        "env.action_repeat=0",
        "env.max_episode_env_steps=0",
        "env.camera_id=-1",
    ],
)
def test_typed_options_are_checked_when_the_recipe_is_parsed(override):
    """Sizes, repeats, caps and the obs mode are typed in the signature; the parser refuses."""
    with pytest.raises(ConfigError) as excinfo:
        load_recipe("quickstart", [override])
    assert "\n" not in excinfo.value.line()


def test_resolved_action_repeat_needs_no_env():
    assert DMCEnv.resolved_action_repeat({}) == 4  # the default domain, cheetah
    assert DMCEnv.resolved_action_repeat({"domain": "cartpole"}) == 8
    assert DMCEnv.resolved_action_repeat({"domain": "cartpole", "action_repeat": 3}) == 3
    assert DMCEnv.resolved_action_repeat({"domain": "humanoid", "action_repeat": None}) == 2


@linux_only
def test_module_selects_egl_when_headless():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MUJOCO_GL", "DISPLAY", "PYOPENGL_PLATFORM")
    }
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(covr_lightning.__file__))
    code = "import os, covr_lightning.envs.dmc; print(os.environ['MUJOCO_GL'], os.environ['PYOPENGL_PLATFORM'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["egl", "egl"]


@linux_only
def test_dm_control_imported_first_on_headless_machine_gives_config_error():
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(covr_lightning.__file__))
    code = (
        "import dm_control.suite\n"
        "from covr_lightning.envs import DMCEnv\n"
        "from covr_lightning.errors import ConfigError\n"
        "try:\n"
        "    DMCEnv(image_size=32)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "MUJOCO_GL=egl" in out.stdout, out.stderr[-2000:]
