"""CarlaEnv against the fake client (tests/envs/fake_carla.py): no test here touches a CARLA server.

Reward sign and magnitude (progress, collision impulse, steering), every episode end, driving
distance, cleanup of every spawned actor, sharing one world between two envs, lost connections,
the no-server and no-package errors, and a few COVR updates of both CARLA recipes. When the real
``carla`` package is installed, the fake's names and signatures are checked against it and the CLI
is run with it against a port where no server listens.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from tests.envs import fake_carla

from covr_lightning.cli import main
from covr_lightning.config import load_recipe
from covr_lightning.envs.carla import CarlaEnv, highway_reward, split_action
from covr_lightning.envs.carla import server as carla_server
from covr_lightning.errors import ConfigError

DT = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lock_file(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"covr-lightning-carla-localhost-{port}.lock"


@pytest.fixture
def fake(monkeypatch):
    """The fake client imported as ``carla``, one fake server on a free port, empty registries."""
    monkeypatch.setitem(sys.modules, "carla", fake_carla)
    monkeypatch.setattr(carla_server, "SERVERS", {})
    monkeypatch.setattr(fake_carla, "SERVERS", {})
    server = fake_carla.serve(_free_port())
    yield server
    _lock_file(server.port).unlink(missing_ok=True)


@pytest.fixture
def make_env(fake):
    """Build CarlaEnvs on the fake server (small frames, no traffic unless asked); closes them."""
    envs = []

    def make(**options) -> CarlaEnv:
        defaults = {"port": fake.port, "image_size": 16, "view_size": 0, "num_vehicles": 0}
        envs.append(CarlaEnv(**{**defaults, **options}))
        return envs[-1]

    yield make
    for env in envs:
        env.close()


def _ego(server) -> fake_carla.Vehicle:
    (ego,) = [a for a in server.vehicles() if a.attributes["role_name"] == "hero"]
    return ego


def _lane_of(actor) -> int:
    return -(int(actor.get_location().y // fake_carla.LANE_WIDTH) + 1)


def _run(env, action, steps=400):
    """Step until the episode ends; returns the last step's result."""
    for _ in range(steps):
        result = env.step(np.asarray(action, np.float32))
        if result[2] or result[3]:
            return result
    raise AssertionError(f"the episode did not end within {steps} agent steps")


# --------------------------------------------------------------------------- maths


def test_highway_reward_and_action_split_by_hand():
    # r = progress - 1e-4 * impulse - 1.0 * |steer|
    assert highway_reward(1.25, 0.0, 0.0, 1e-4, 1.0) == 1.25
    assert highway_reward(1.25, 5000.0, -0.5, 1e-4, 1.0) == pytest.approx(1.25 - 0.5 - 0.5)
    assert highway_reward(-0.5, 0.0, 0.0, 1e-4, 1.0) == -0.5
    assert split_action(np.array([0.6, -0.3])) == pytest.approx((0.6, -0.3, 0.0))
    assert split_action(np.array([-0.4, 0.2])) == pytest.approx((0.0, 0.2, 0.4))
    assert split_action(np.array([7.0, -9.0])) == (1.0, -1.0, 0.0)  # clipped


# --------------------------------------------------------------------------- reward


def test_progress_reward_is_the_metres_driven_along_the_highway(make_env, fake):
    env = make_env(action_repeat=4)
    env.reset(seed=0)
    ego = _ego(fake)
    x0 = ego.get_location().x
    _, reward, terminated, truncated, info = env.step(np.array([1.0, 0.0], np.float32))
    driven = ego.get_location().x - x0
    # From rest at full throttle the fake car reaches 0.2, 0.3998, 0.5994, 0.7988 m/s over the
    # four ticks: (0.2 + 0.3998 + 0.5994002 + 0.7988008) * 0.05 = 0.09990005 m.
    assert driven == pytest.approx(0.09990005, abs=1e-7)
    assert info["progress"] == pytest.approx(driven)
    assert info["driving_distance"] == pytest.approx(driven)
    assert reward == pytest.approx(driven / 4)  # DBC: the mean of the four ticks' rewards
    assert info["env_steps"] == 4 and info["collision_impulse"] == 0.0
    assert not terminated and not truncated and info["end_reason"] == ""


def test_driving_backwards_along_the_highway_is_negative_reward(make_env, fake):
    env = make_env()
    env.reset(seed=0)
    ego = _ego(fake)
    location = ego.get_location()
    ego.set_transform(fake_carla.Transform(location, fake_carla.Rotation(yaw=180.0)))
    _, reward, _, _, info = env.step(np.array([1.0, 0.0], np.float32))
    assert ego.get_location().x < location.x
    assert info["progress"] == pytest.approx(ego.get_location().x - location.x)
    assert reward < 0 and info["driving_distance"] < 0


@pytest.mark.parametrize(("aggregation", "ticks_factor"), [("mean", 1 / 4), ("sum", 1.0)])
def test_steering_costs_its_magnitude_per_tick(make_env, aggregation, ticks_factor):
    env = make_env(reward_aggregation=aggregation)
    env.reset(seed=0)
    # At rest, no throttle: no progress, so the reward is the steering penalty alone.
    _, reward, _, _, info = env.step(np.array([0.0, -0.5], np.float32))
    assert info["progress"] == 0.0
    assert reward == pytest.approx(-1.0 * 0.5 * 4 * ticks_factor)


@pytest.mark.parametrize(("aggregation", "expected"), [("mean", -0.125), ("sum", -0.5)])
def test_collision_impulse_costs_1e_4_per_newton_second(make_env, fake, aggregation, expected):
    env = make_env(reward_aggregation=aggregation)
    env.reset(seed=0)
    fake.inject_collision(_ego(fake), 5000.0)
    _, reward, terminated, _, info = env.step(np.array([0.0, 0.0], np.float32))
    assert info["collision_impulse"] == pytest.approx(5000.0)
    assert reward == pytest.approx(expected)  # -1e-4 * 5000 in one of the four ticks
    assert not terminated  # DBC: collisions cost reward, they do not end the episode


def test_crash_into_a_standing_car_ends_the_episode_above_the_threshold(make_env, fake):
    env = make_env(reward_aggregation="sum", collision_end_impulse=100.0)
    env.reset(seed=0)
    ego = _ego(fake)
    fake.place("vehicle.tesla.model3", _lane_of(ego), ego.get_location().x + 8.0)
    _, reward, terminated, truncated, info = _run(env, [1.0, 0.0])
    assert terminated and not truncated and info["end_reason"] == "collision"
    assert info["collision_impulse"] > 100.0
    assert reward == pytest.approx(info["progress"] - 1e-4 * info["collision_impulse"])


# --------------------------------------------------------------------------- episode ends


def test_horizon_truncates_and_a_cut_repeat_counts_only_its_ticks(make_env, fake):
    env = make_env(max_episode_env_steps=6, action_repeat=4)
    env.reset(seed=0)
    ticks_at_start = fake.ticks
    first = env.step(np.array([1.0, 0.0], np.float32))
    _, _, terminated, truncated, info = env.step(np.array([1.0, 0.0], np.float32))
    assert first[4]["env_steps"] == 4 and info["env_steps"] == 2
    assert truncated and not terminated and info["end_reason"] == "horizon"
    assert env.env_steps == 6 == fake.ticks - ticks_at_start  # reset's settling ticks not counted
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.array([1.0, 0.0], np.float32))


def test_standing_still_ends_the_episode_as_stuck(make_env):
    env = make_env(stuck_env_steps=6)
    env.reset(seed=0)
    _, _, terminated, _, info = _run(env, [-1.0, 0.0])
    assert terminated and info["end_reason"] == "stuck" and env.env_steps == 6


def test_leaving_the_lanes_terminates(make_env, fake):
    env = make_env()
    env.reset(seed=0)
    _, _, terminated, _, info = _run(env, [1.0, 0.3])
    assert terminated and info["end_reason"] == "off_road"
    assert fake.map_name.endswith("Town04") and not 0 <= _ego(fake).get_location().y <= 14


def test_running_out_of_road_terminates(make_env, fake):
    env = make_env()
    env.reset(seed=0)
    ego = _ego(fake)
    end = fake_carla.Location(fake_carla.ROAD_LENGTH - 3.0, ego.get_location().y, 0.3)
    ego.set_transform(fake_carla.Transform(end, fake_carla.Rotation()))
    _, _, terminated, _, info = env.step(np.array([1.0, 0.0], np.float32))
    assert terminated and info["end_reason"] == "road_end"


def test_ghost_pedestrian_steps_out_and_hitting_them_ends_the_episode(make_env, fake):
    env = make_env(
        scenario="ghost_pedestrian", ghost_window=(1, 1), ghost_distance=6.0, ghost_speed=1.0
    )
    env.reset(seed=0)
    ego = _ego(fake)
    env.step(np.array([1.0, 0.0], np.float32))
    (walker,) = [a for a in fake.actors.values() if a.type_id.startswith("walker.")]
    assert walker.attributes["is_invincible"] == "false"
    # Appeared 1 m right (+y) of the ego lane's edge, ~6 m ahead, and walks left (-y) across it:
    # 3 ticks at 1 m/s since.
    offset = walker.get_location() - ego.get_location()
    assert 4.0 < offset.x < 7.0 and offset.y == pytest.approx(3.5 / 2 + 1.0 - 3 * 0.05)
    assert walker.get_control().direction.y == pytest.approx(-1.0)
    _, _, terminated, _, info = _run(env, [1.0, 0.0])
    assert terminated and info["end_reason"] == "pedestrian" and info["collision_impulse"] > 0


def test_braking_for_the_ghost_pedestrian_keeps_the_episode_going(make_env, fake):
    env = make_env(
        scenario="ghost_pedestrian",
        ghost_window=(1, 1),
        ghost_distance=6.0,
        ghost_speed=1.0,
        stuck_env_steps=1000,
    )
    env.reset(seed=0)
    for _ in range(40):  # 8 s of standing still: the pedestrian crosses and walks on
        _, _, terminated, truncated, _ = env.step(np.array([-1.0, 0.0], np.float32))
        assert not terminated and not truncated


# --------------------------------------------------------------------------- metrics, frames


def test_distances_are_in_every_info_and_add_up(make_env):
    env = make_env(action_repeat=4)
    env.reset(seed=0)
    total, returns = 0.0, 0.0
    for _ in range(5):
        _, reward, _, _, info = env.step(np.array([1.0, 0.0], np.float32))
        total += info["progress"]
        returns += reward
        assert info["driving_distance"] == pytest.approx(total)
        assert info["episode_return"] == pytest.approx(returns)
        # DBC counts one tick per agent step: about a quarter of the metres at action repeat 4.
        assert 0 < info["dbc_distance"] < info["driving_distance"]
        assert info["speed"] > 0


def test_panorama_stitches_cameras_left_to_right(make_env, fake):
    env = make_env(cameras=3, fov=60.0, frame_stack=2, view_size=24)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (6, 16, 48) == env.observation_space.shape
    assert env.frame_shape == (3, 16, 48)
    red = obs[3, 0, ::16]  # the fake encodes each camera's yaw in red: yaw + 128
    assert list(red) == [128 - 60, 128, 128 + 60]
    assert env.render().shape == (24, 24, 3) and env.render(10, 12).shape == (10, 12, 3)
    cameras = [a for a in fake.sensors() if a.type_id == "sensor.camera.rgb"]
    assert sorted(int(c.attributes["image_size_x"]) for c in cameras) == [16, 16, 16, 24]


def test_render_without_a_view_camera_resizes_the_centre_camera(make_env):
    env = make_env(cameras=3, view_size=0)
    assert env.render(8, 8).max() == 0  # black before the first reset
    env.reset(seed=0)
    view = env.render(32, 32)
    assert view.shape == (32, 32, 3) and view[0, 0, 0] == 128  # the centre camera's red


# --------------------------------------------------------------------------- actors


def test_reset_and_close_destroy_every_spawned_actor(make_env, fake):
    env = make_env(num_vehicles=6, scenario="ghost_pedestrian", ghost_window=(1, 1))
    env.reset(seed=5)
    env.step(np.array([0.0, 0.0], np.float32))
    first = set(fake.actors)
    assert len(fake.vehicles()) > 3 and any(a.startswith("walker.") for a in _types(fake))
    assert all(a.is_listening() for a in fake.sensors())
    env.reset(seed=5)
    assert first <= set(fake.destroyed) and not first & set(fake.actors)
    assert len(fake.actors) == len(first) - 1  # the pedestrian appears only after a tick
    env.close()
    assert fake.actors == {} and sorted(fake.destroyed) == sorted(fake.spawned)
    assert not fake.settings.synchronous_mode and not fake.traffic_managers[8000].synchronous
    env.close()  # idempotent
    assert carla_server.SERVERS == {}


def _types(server) -> list[str]:
    return [a.type_id for a in server.actors.values()]


def test_episode_uses_synchronous_town04_and_dbc_traffic(make_env, fake):
    env = make_env(num_vehicles=20)
    env.reset(seed=1)
    assert fake.loads == ["Town04"] and fake.settings.synchronous_mode
    assert fake.settings.fixed_delta_seconds == DT
    tm = fake.traffic_managers[8000]
    assert tm.synchronous and tm.percentage == 30.0
    traffic = [v for v in fake.vehicles() if v.attributes["role_name"] == "autopilot"]
    assert 10 <= len(traffic) <= 20 and all(v._autopilot == 8000 for v in traffic)
    assert all(100.0 <= v.get_location().x <= 300.0 for v in traffic)
    assert all(v.type_id != "vehicle.bh.crossbike" for v in traffic)  # four wheels only


def test_two_envs_share_the_world_by_parking_each_other(make_env, fake):
    train, evaluation = make_env(), make_env()
    train.reset(seed=0)
    train.step(np.array([1.0, 0.0], np.float32))
    ego = _ego(fake)
    before = ego.get_transform()
    evaluation.reset(seed=0)  # same lane and spot: only possible while the other is parked
    assert ego.get_location().z == pytest.approx(before.location.z + 500.0)
    for _ in range(3):
        _, _, _, _, info = evaluation.step(np.array([1.0, 0.0], np.float32))
        assert info["collision_impulse"] == 0.0
    assert ego.get_location().x == pytest.approx(before.location.x)  # frozen while parked
    _, reward, _, _, info = train.step(np.array([1.0, 0.0], np.float32))
    assert ego.get_location().z == pytest.approx(before.location.z)
    assert ego.get_location().x > before.location.x and info["collision_impulse"] == 0.0
    assert reward > 0 and info["speed"] > 0.4  # it kept its speed through the pause


@pytest.mark.skipif(carla_server.fcntl is None, reason="the server lock needs fcntl")
def test_a_server_driven_by_another_process_is_refused(make_env, fake):
    with open(_lock_file(fake.port), "a+") as handle:
        carla_server.fcntl.flock(handle, carla_server.fcntl.LOCK_EX | carla_server.fcntl.LOCK_NB)
        with pytest.raises(
            ConfigError, match=f"already drives the CARLA server at localhost:{fake.port}"
        ):
            make_env()
        carla_server.fcntl.flock(handle, carla_server.fcntl.LOCK_UN)
    make_env().reset(seed=0)


# --------------------------------------------------------------------------- connections


def test_a_tick_time_out_reconnects_and_truncates_the_episode(make_env, fake, caplog):
    env = make_env(num_vehicles=3)
    env.reset(seed=0)
    env.step(np.array([1.0, 0.0], np.float32))
    fake.fail_ticks(1)
    with caplog.at_level(logging.WARNING, logger="covr_lightning.envs.carla"):
        obs, reward, terminated, truncated, info = env.step(np.array([1.0, 0.0], np.float32))
    assert truncated and not terminated and info["end_reason"] == "connection_lost"
    assert info["env_steps"] == 0 and reward == 0.0 and obs.shape == env.observation_space.shape
    assert "lost the CARLA server" in caplog.text and "connection was lost" in caplog.text
    assert fake.actors == {}  # the lost episode's actors are cleaned up
    env.reset(seed=1)
    assert env.step(np.array([1.0, 0.0], np.float32))[4]["end_reason"] == ""


def test_a_restarted_server_is_reconnected_and_the_next_episode_runs(make_env, fake):
    env = make_env()
    env.reset(seed=0)
    fake.restart()
    _, _, _, truncated, info = env.step(np.array([1.0, 0.0], np.float32))
    assert truncated and info["end_reason"] == "connection_lost"
    assert fake.settings.synchronous_mode  # re-applied on the new connection
    env.reset(seed=0)
    assert env.step(np.array([1.0, 0.0], np.float32))[4]["progress"] > 0


def test_a_server_that_stays_gone_is_one_clear_error(make_env, fake):
    env = make_env()
    env.reset(seed=0)
    fake.stop()
    with pytest.raises(ConfigError) as err:
        env.step(np.array([1.0, 0.0], np.float32))
    line = err.value.line()
    assert f"localhost:{fake.port}" in line and "--resume last" in line and "\n" not in line
    env.close()  # nothing left to destroy on a dead server: no exception


def test_no_server_names_the_port_and_how_to_start_one(fake):
    port = _free_port()
    with pytest.raises(ConfigError) as err:
        CarlaEnv(port=port, timeout=1.0)
    _lock_file(port).unlink()  # taken and released again
    line = err.value.line()
    assert f"no CARLA server answered at localhost:{port}" in line
    assert "CarlaUE4.sh -RenderOffScreen" in line and "carlasim/carla" in line
    assert carla_server.SERVERS == {}


def test_missing_carla_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)  # makes `import carla` fail
    with pytest.raises(ConfigError, match=r'pip install "covr-lightning\[carla\]"'):
        CarlaEnv()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cameras": 5, "fov": 90.0}, "do not fit in 360 degrees"),
        ({"ghost_window": (50, 10)}, "ghost_window"),
    ],
)
def test_option_relations_are_config_errors_before_connecting(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CarlaEnv(**options)


@pytest.mark.parametrize(
    "override",
    [
        "env.scenario=city",
        "env.cameras=2",
        "env.image_size=0",
        "env.reward_aggregation=max",
        "env.timeout=0.0",
        "env.num_vehicles=-1",
        "env.ghost_window=[0, 10]",
        "env.collision_end_impulse=0",
    ],
)
def test_typed_options_are_refused_when_the_recipe_is_parsed(override):
    with pytest.raises(ConfigError) as err:
        load_recipe("carla_highway", [override])
    assert "\n" not in err.value.line()


def test_resolved_action_repeat_needs_no_server():
    assert CarlaEnv.resolved_action_repeat({}) == 4
    assert CarlaEnv.resolved_action_repeat({"action_repeat": 2}) == 2
    assert CarlaEnv.max_num_envs == 1
    assert CarlaEnv.episode_metrics == ("driving_distance", "dbc_distance")


# --------------------------------------------------------------------------- CLI and recipes


def test_fit_without_a_server_exits_2_with_one_line(fake, workdir, capsys):
    port = _free_port()
    code = main(["fit", "--recipe", "carla_highway", f"env.port={port}", "env.timeout=1"])
    _lock_file(port).unlink(missing_ok=True)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"localhost:{port}" in err and "CarlaUE4.sh -RenderOffScreen" in err


def test_dry_run_needs_no_server(workdir, capsys):
    assert main(["fit", "--recipe", "carla_ghost_pedestrian", "--dry-run"]) == 0
    assert "ghost_pedestrian" in capsys.readouterr().out


def _real_carla():
    """The installed carla client, or skip (never the fake)."""
    real = pytest.importorskip("carla")
    if real is fake_carla or not hasattr(real, "libcarla"):
        pytest.skip("the real carla client is not installed")
    return real


def test_real_client_without_a_server_exits_2_naming_the_port(workdir):
    _real_carla()
    port = _free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "covr_lightning", "fit", "--recipe", "carla_highway"]
        + [f"env.port={port}", "env.timeout=1", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _lock_file(port).unlink(missing_ok=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"localhost:{port}" in lines[0] and "carlasim/carla:0.9.16" in lines[0]


def _public(cls) -> dict[str, object]:
    """A fake class's public members (methods, properties, dataclass fields), own and inherited."""
    members: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ != fake_carla.__name__:
            continue
        members.update({n: v for n, v in vars(klass).items() if not n.startswith("_")})
        if dataclasses.is_dataclass(klass):
            members.update({f.name: None for f in dataclasses.fields(klass)})
    return members


def _real_parameters(function) -> list[str]:
    """Argument names from a Boost.Python docstring: ``name( (Map)arg1, (bool)x=True) -> T``."""
    first = (function.__doc__ or "").strip().splitlines()[0]
    return re.findall(r"\(\w+\)(\w+)", first)[1:]  # minus self (arg1)


FAKE_ONLY = {"Actor": {"get_control"}}
"""Fake conveniences the real class has only on its subclasses."""


def test_the_fake_speaks_the_real_clients_names_and_signatures():
    real = _real_carla()
    checked = 0
    for name, cls in vars(fake_carla).items():
        if not inspect.isclass(cls) or cls.__module__ != fake_carla.__name__:
            continue
        if name == "FakeServer":
            continue
        real_cls = getattr(real, name)  # every fake class exists in the real client
        for member, value in _public(cls).items():
            if member in FAKE_ONLY.get(name, ()):
                continue
            assert hasattr(real_cls, member), f"carla.{name} has no {member}"
            if inspect.isfunction(value) and not member.startswith("__"):
                fake_args = list(inspect.signature(value).parameters)[1:]
                real_args = _real_parameters(getattr(real_cls, member))
                # Boost names positional-only arguments arg2, arg3...: only their place counts.
                assert len(fake_args) == len(real_args), f"carla.{name}.{member}{real_args}"
                for fake_arg, real_arg in zip(fake_args, real_args, strict=True):
                    if not re.fullmatch(r"arg\d+", real_arg):
                        assert fake_arg == real_arg, f"carla.{name}.{member}{real_args}"
                checked += 1
    assert checked > 40


def test_the_env_builds_real_value_types_the_way_it_builds_fake_ones():
    real = _real_carla()
    for module in (real, fake_carla):
        location = module.Location(x=1.0, y=2.0, z=3.0)
        transform = module.Transform(location, module.Rotation(yaw=90.0))
        forward, right = transform.get_forward_vector(), transform.get_right_vector()
        assert (round(forward.x, 6), round(forward.y, 6)) == (0.0, 1.0)
        assert (round(right.x, 6), round(right.y, 6)) == (-1.0, 0.0)
        control = module.VehicleControl(throttle=0.5, steer=-0.25, brake=0.0)
        assert (control.throttle, control.steer, control.brake) == (0.5, -0.25, 0.0)
        walk = module.WalkerControl(direction=module.Vector3D(x=0.0, y=-1.0, z=0.0), speed=2.0)
        assert (walk.direction.y, walk.speed) == (-1.0, 2.0)
        settings = module.WorldSettings()
        assert not settings.synchronous_mode and settings.fixed_delta_seconds is None
        assert math.isclose((module.Location(x=3.0, y=4.0) - module.Location()).length(), 5.0)


TINY_CARLA = [
    "env.image_size=24",
    "env.view_size=32",
    "env.num_vehicles=3",
    "env.max_episode_env_steps=24",
    "policy.hidden_dim=32",
    "policy.num_filters=8",
    "replay.batch_size=4",
    "run.seed_env_steps=8",
    "run.total_env_steps=24",
    "run.eval_episodes=1",
    "tracking.enabled=false",
    "vlm.backbone=tiny-qwen2.5-vl",
    "covr.vlm_image_size=56",
]


@pytest.mark.parametrize("name", ["carla_highway", "carla_ghost_pedestrian"])
def test_carla_recipe_trains_on_the_fake_client(name, fake, workdir):
    from covr_lightning.build import build_loop

    overrides = [*TINY_CARLA, f"env.port={fake.port}", "env.ghost_window=[2, 4]"]
    cfg = load_recipe(name, overrides)
    assert cfg.covr.prior_weight == 2.0 and cfg.covr.cold_start_rounds == 2
    assert cfg.vlm.init_args.lora_alpha == 256
    loop = build_loop(cfg)
    loop.fit()
    assert loop.updates >= 3 and loop.module.update_step == loop.updates
    assert fake.ticks >= 24
    # The evaluation reports the driving distance beside the return.
    metrics = loop.last_evaluation.episode_metrics
    assert set(metrics) == {"driving_distance", "dbc_distance"}
    assert all(math.isfinite(v) for v in metrics["driving_distance"])
    # fit() closed the training and evaluation envs: every actor is gone, the server is async.
    assert fake.actors == {} and not fake.settings.synchronous_mode


def test_more_than_one_training_env_is_refused_up_front(fake, workdir):
    from covr_lightning.build import build_loop

    cfg = load_recipe("carla_highway", [*TINY_CARLA, f"env.port={fake.port}", "run.num_envs=2"])
    with pytest.raises(ConfigError, match="set run.num_envs=1"):
        build_loop(cfg)
