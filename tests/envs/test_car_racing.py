"""CarRacingEnv: pixels, frame stacking, action repeat against plain CarRacing-v3, seeding,
rendering, the action mapping and its codec, errors, and a short COVR run on CPU."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys

import gymnasium
import numpy as np
import pytest

from covr_lightning.config import load_recipe
from covr_lightning.envs.car_racing import CarRacingEnv, to_car_racing_action
from covr_lightning.errors import ConfigError
from covr_lightning.vlm.codecs import CAR_RACING_BRAKE, CAR_RACING_GAS, STEERING, make_codec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("Box2D") is None,
    reason='CarRacing needs pip install "covr-lightning[box2d]"',
)


@pytest.fixture
def make_env():
    envs: list[CarRacingEnv] = []

    def make(**kwargs) -> CarRacingEnv:
        env = CarRacingEnv(**kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def _plain(seed: int, max_episode_steps: int = 1000):
    """Untouched CarRacing-v3, reset with ``seed``: the reference for frames and rewards."""
    env = gymnasium.make("CarRacing-v3", continuous=True, max_episode_steps=max_episode_steps)
    first, _ = env.reset(seed=seed)
    return env, first


def _drive(rng: np.random.Generator) -> np.ndarray:
    """A random action that keeps the car moving: gas above half, brake released."""
    return np.array([rng.uniform(-1, 1), rng.uniform(0, 1), -1.0], dtype=np.float32)


def test_defaults_and_class_attributes():
    assert CarRacingEnv.resolved_action_repeat({}) == 4
    assert CarRacingEnv.resolved_action_repeat({"action_repeat": None, "crop_hud": True}) == 4
    assert CarRacingEnv.resolved_action_repeat({"action_repeat": 2}) == 2
    assert CarRacingEnv.max_num_envs is None and CarRacingEnv.episode_metrics == ()
    assert CarRacingEnv.codec_kind == "car_racing"


@pytest.mark.parametrize(
    ("agent", "car_racing"),
    [
        ([-1, -1, -1], [-1, 0, 0]),
        ([1, 1, 1], [1, 1, 1]),
        ([0, 0, 0], [0, 0.5, 0.5]),
        ([-0.4, 0.6, -0.4], [-0.4, 0.8, 0.3]),
        ([5, -5, 2], [1, 0, 1]),  # clipped to [-1, 1] first
    ],
)
def test_action_maps_onto_steer_gas_brake(agent, car_racing):
    np.testing.assert_allclose(to_car_racing_action(np.array(agent)), car_racing)


def test_pixel_spaces_and_stack_at_reset(make_env):
    env = make_env(seed=0)
    assert env.observation_space.shape == (9, 84, 84)
    assert env.observation_space.dtype == np.uint8
    assert env.action_space.shape == (3,) and env.action_space.dtype == np.float32
    assert (env.action_space.low == -1).all() and (env.action_space.high == 1).all()
    assert env.frame_shape == (3, 84, 84) and env.frame_stack == 3 and env.action_repeat == 4
    assert "road" in env.task_description

    obs, _ = env.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs[0:3], obs[3:6])  # stack = copies of the first frame
    np.testing.assert_array_equal(obs[3:6], obs[6:9])
    assert obs.std() > 5  # a real picture, not a blank buffer

    next_obs, reward, terminated, truncated, info = env.step(np.array([0, 1, -1], np.float32))
    np.testing.assert_array_equal(next_obs[0:6], obs[3:9])  # the stack shifts by one frame
    assert not np.array_equal(next_obs[6:9], obs[6:9])  # the newest frame moved (zooming in)
    np.testing.assert_array_equal(next_obs[6:9], env.render().transpose(2, 0, 1))
    assert info["env_steps"] == 4 and info["episode_return"] == pytest.approx(reward)
    assert not terminated and not truncated


def test_frames_rewards_and_env_steps_match_plain_car_racing(make_env):
    """The repeat (and its skipped drawing) changes nothing but the number of calls."""
    env = make_env(image_size=96, action_repeat=3, seed=5)
    plain, first = _plain(seed=5)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs[-3:], first.transpose(2, 0, 1))  # 96 px: no resize

    rng = np.random.default_rng(0)
    for _ in range(8):
        action = _drive(rng)
        obs, reward, _, _, info = env.step(action)
        expected = 0.0
        for _ in range(3):
            native, r, *_ = plain.step(to_car_racing_action(action))
            expected += r
        assert info["env_steps"] == 3
        assert reward == pytest.approx(expected)
        np.testing.assert_array_equal(obs[-3:], native.transpose(2, 0, 1))
    assert env.env_steps == 24
    plain.close()


def test_episode_cut_mid_repeat_counts_only_the_steps_taken(make_env):
    # 10 = 4 + 4 + 2: the last call ends on a step whose drawing was to be skipped.
    env = make_env(image_size=96, action_repeat=4, max_episode_env_steps=10, seed=2)
    plain, _ = _plain(seed=2, max_episode_steps=10)
    env.reset()
    action = np.array([0.3, 0.5, -1.0], np.float32)
    results = [env.step(action) for _ in range(3)]
    for _ in range(10):
        native, _, _, plain_truncated, _ = plain.step(to_car_racing_action(action))
    assert plain_truncated
    assert [info["env_steps"] for *_, info in results] == [4, 4, 2]
    assert [(term, trunc) for _, _, term, trunc, _ in results] == [
        (False, False),
        (False, False),
        (False, True),
    ]
    np.testing.assert_array_equal(results[-1][0][-3:], native.transpose(2, 0, 1))
    assert env.env_steps == 10
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action)
    plain.close()


def test_same_seed_same_episode_and_reset_reseeds(make_env):
    a, b = make_env(seed=3), make_env(seed=3)
    obs_a, _ = a.reset()
    obs_b, _ = b.reset()
    np.testing.assert_array_equal(obs_a, obs_b)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(3):
        step_a, step_b = a.step(_drive(rng_a)), b.step(_drive(rng_b))
        np.testing.assert_array_equal(step_a[0], step_b[0])
        assert step_a[1] == step_b[1]

    other, _ = b.reset(seed=4)  # another track
    assert not np.array_equal(other, obs_a)
    again, _ = b.reset(seed=3)
    np.testing.assert_array_equal(again, obs_a)


@pytest.mark.parametrize("crop_hud", [False, True])
def test_render_at_any_size_shows_the_policy_frame(make_env, crop_hud):
    env = make_env(crop_hud=crop_hud, seed=1)
    env.reset()
    for _ in range(15):  # past the zoom-in, on the road
        obs, *_ = env.step(np.array([0, 0.2, -1], np.float32))
    wide = env.render(120, 160)
    assert wide.shape == (120, 160, 3) and wide.dtype == np.uint8
    large = env.render(168, 168).astype(np.float32)
    assert large.std() > 5
    # Halved by 2x2 means, the sharper render is the policy's newest frame, give or take filtering.
    halved = large.reshape(84, 2, 84, 2, 3).mean(axis=(1, 3))
    newest = obs[-3:].transpose(1, 2, 0).astype(np.float32)
    assert np.abs(halved - newest).mean() < 6


def test_crop_hud_cuts_the_dashboard(make_env):
    env = make_env(crop_hud=True, image_size=84, seed=7)
    plain, first = _plain(seed=7)
    obs, _ = env.reset()
    # The 84x84 top-centre of CarRacing's 96x96 frame, taken as is (no resampling at 84).
    np.testing.assert_array_equal(obs[-3:], first[:84, 6:90].transpose(2, 0, 1))
    assert (first[-10:] < 30).mean() > 0.5  # the black dashboard strip is in the plain frame
    plain.close()


def test_missing_box2d_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "Box2D", None)  # makes "import Box2D" fail
    with pytest.raises(ConfigError, match="Box2D") as error:
        CarRacingEnv()
    assert 'pip install "covr-lightning[box2d]"' in error.value.line()


@pytest.mark.parametrize(
    "override",
    [
        "env.image_size=0",
        "env.frame_stack=0",
        "env.action_repeat=0",
        "env.max_episode_env_steps=0",
        "env.lap_complete_percent=0.0",
        "env.lap_complete_percent=1.5",
    ],
)
def test_bad_values_are_refused_when_the_recipe_is_parsed(override):
    with pytest.raises(ConfigError) as error:
        load_recipe("car_racing", [override])
    assert "\n" not in error.value.line()


def test_a_share_of_one_completes_the_lap_on_every_tile():
    cfg = load_recipe("car_racing", ["env.lap_complete_percent=1.0"])
    assert cfg.env.init_args.lap_complete_percent == 1.0


def test_codec_round_trips_every_phrase_on_the_env_action_space(make_env):
    env = make_env()
    codec = make_codec(env.codec_kind, env.action_space.low, env.action_space.high)
    for steer, gas, brake in itertools.product(STEERING, CAR_RACING_GAS, CAR_RACING_BRAKE):
        text = f"{steer.phrase}, {gas.phrase}, {brake.phrase}"
        action, valid = codec.decode(text)
        assert valid and env.action_space.contains(action), text
        assert codec.encode(action) == text
    # The phrases mean what they say once mapped onto CarRacing's controls.
    action, _ = codec.decode("steer sharply left, full gas, no brake")
    np.testing.assert_allclose(to_car_racing_action(action), [-0.8, 1.0, 0.0], atol=1e-6)
    action, _ = codec.decode("go straight, half gas, hard brake")
    np.testing.assert_allclose(to_car_racing_action(action), [0.0, 0.5, 0.8], atol=1e-6)


@pytest.mark.parametrize(
    ("phrase", "sign"), [("steer sharply left", 1), ("steer sharply right", -1)]
)
def test_steering_phrases_turn_the_car_that_way(make_env, phrase, sign):
    env = make_env(seed=0)
    codec = make_codec(env.codec_kind, env.action_space.low, env.action_space.high)
    env.reset()
    for _ in range(10):  # get rolling
        env.step(codec.decode("go straight, half gas, no brake")[0])
    before = env._car_racing.car.hull.angle
    turn, _ = codec.decode(f"{phrase}, light gas, no brake")
    for _ in range(8):
        env.step(turn)
    # Box2D angles grow counter-clockwise: a left turn seen from above.
    assert sign * (env._car_racing.car.hull.angle - before) > 0.2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the dummy driver is for Linux")
def test_headless_import_picks_the_dummy_video_driver():
    code = (
        "import os\n"
        "from covr_lightning.envs.car_racing import CarRacingEnv\n"
        "env = CarRacingEnv(seed=0)\n"
        "env.reset()\n"
        "assert env.render(64, 64).std() > 5\n"
        "print(os.environ['SDL_VIDEODRIVER'])\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SDL_VIDEODRIVER")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dummy"


def test_recipe_trains_with_phrase_guidance_on_cpu(workdir):
    """COVR on CarRacing: a fine-tune on phrase targets, then guided updates (tiny VLM)."""
    from covr_lightning.build import build_loop

    cfg = load_recipe(
        "car_racing",
        [
            "run.seed_env_steps=16",
            "run.total_env_steps=64",  # rounds end at 32 and 64: one fine-tune, then guidance
            "run.eval_episodes=1",
            "env.max_episode_env_steps=40",
            "env.image_size=40",  # small networks keep this a few seconds on 2 CPU cores
            "policy.crop_size=32",
            "policy.num_filters=8",
            "policy.hidden_dim=32",
            "replay.batch_size=4",
            "tracking.enabled=false",
            "covr.psi_0=32",
            "covr.cold_start_rounds=1",
            "covr.sft_every=1",
            "covr.guide_every=4",
            "covr.vlm_image_size=56",
            "vlm.backbone=tiny-qwen2.5-vl",
            "vlm.lora_rank=4",
            "vlm.lora_alpha=8",
            "sft.eddf_mode=top_k",
            "sft.eddf_quantile=0.5",
        ],
    )
    loop = build_loop(cfg)
    loop.fit()
    assert loop.env_steps == 64
    assert loop.updates >= 8 and loop.module.update_step == loop.updates
    assert loop.codec.dimensions == (STEERING, CAR_RACING_GAS, CAR_RACING_BRAKE)
    assert (loop.run_dir / "adapters" / "round_0").is_dir()
