"""Tests of the replay buffer: stacks rebuilt by index must equal what a frame-stacking env returned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from covr_lightning.data import ExtraField, ReplayDataModule
from covr_lightning.errors import ConfigError

C, H, W = 3, 8, 8
A = 2


class StackingEnv:
    """Fake pixel env with DMCEnv's stacking: reset fills the stack with copies of the first frame.

    Frame ``g`` (the g-th frame ever produced) has channel 0 = g % 256, channel 1 = g // 256 and
    channel 2 = episode % 256, so every frame is distinct.
    """

    def __init__(self, stack: int = 3) -> None:
        self.stack = stack
        self.g = -1
        self.episode = -1
        self.frames: list[np.ndarray] = []

    def _frame(self) -> np.ndarray:
        self.g += 1
        f = np.empty((C, H, W), dtype=np.uint8)
        f[0], f[1], f[2] = self.g % 256, self.g // 256, self.episode % 256
        return f

    def reset(self) -> np.ndarray:
        self.episode += 1
        self.frames = [self._frame()] * self.stack
        return np.concatenate(self.frames)

    def step(self) -> np.ndarray:
        self.frames = [*self.frames[1:], self._frame()]
        return np.concatenate(self.frames)


def make_replay(capacity: int = 20, stack: int = 3, seed: int = 0, **kw) -> ReplayDataModule:
    dm = ReplayDataModule(capacity=capacity, batch_size=8, seed=seed, **kw)
    dm.allocate((C, H, W), np.uint8, stack, (A,))
    return dm


def run_episodes(dm, env, lengths, records, terminate=True, check=None):
    """Play episodes of the given lengths into ``dm``; record every transition keyed by ``tid``.

    The last step of each episode is terminated when ``terminate``; otherwise the episode is cut
    (time limit) and the next ``start_episode`` opens a new one.
    """
    for length in lengths:
        obs = env.reset()
        dm.start_episode(obs)
        step = 0
        for t in range(length):
            tid = len(records)
            action = np.array([tid, -tid], dtype=np.float32) / 100
            next_obs = env.step()
            done = terminate and t == length - 1
            extras = {"tid": tid} if "tid" in dm.extras else {}
            dm.add(action, float(tid) + 0.5, next_obs, done, **extras)
            records.append(
                dict(obs=obs, next_obs=next_obs, action=action, reward=tid + 0.5, term=done,
                     g=env.g - 1, step=step, written=None)
            )  # fmt: skip
            obs, step = next_obs, step + 1
            if check is not None:
                check()


def expected_valid_tids(records, frames_written, capacity, stack):
    """Independent validity rule: a transition is sampleable iff every frame it needs survives."""
    oldest = frames_written - capacity  # global id of the oldest frame still stored
    return {tid for tid, r in enumerate(records) if r["g"] - min(r["step"], stack - 1) >= oldest}


def assert_all_valid_slots_match(dm, records, env):
    valid = np.flatnonzero(dm._ring.valid)
    batch = dm._batch_at(valid)
    tids = batch["tid"].numpy()
    assert set(tids.tolist()) == expected_valid_tids(
        records, env.g + 1, dm.capacity, dm.frame_stack
    )
    assert len(dm) == len(valid)
    assert_rows_match(batch, tids, records)


def assert_rows_match(batch, tids, records):
    """Every row of ``batch`` is the recorded transition its ``tid`` names."""
    for row, tid in enumerate(tids):
        r = records[tid]
        np.testing.assert_array_equal(batch["obs"][row].numpy(), r["obs"])
        np.testing.assert_array_equal(batch["next_obs"][row].numpy(), r["next_obs"])
        np.testing.assert_array_equal(batch["action"][row].numpy(), r["action"])
        assert batch["reward"][row].item() == r["reward"]
        assert batch["terminated"][row].item() == float(r["term"])


@pytest.mark.parametrize("stack", [1, 3, 4])
def test_reconstructed_stacks_equal_env_observations_across_episodes_and_wraparound(stack):
    dm = make_replay(capacity=17, stack=stack)
    dm.declare_extra("tid", dtype="int64", fill=-1)
    env, records = StackingEnv(stack), []
    check = lambda: assert_all_valid_slots_match(dm, records, env)  # noqa: E731
    # Episodes shorter than the stack, empty ones (reset twice), cut ones and ones > capacity.
    run_episodes(dm, env, [1, 2, 0, 5, 9], records, check=check)
    run_episodes(dm, env, [3, 25, 1, 4], records, terminate=False, check=check)
    run_episodes(dm, env, [2, 6, 11], records, check=check)
    assert env.g + 1 > 4 * dm.capacity  # wrapped several times


def test_first_frames_are_clamped_to_the_episode_start():
    dm = make_replay(capacity=50, stack=3)
    env, records = StackingEnv(3), []
    run_episodes(dm, env, [4, 3], records, terminate=False)
    batch = dm._batch_at(np.arange(8))  # slots 0..4: episode 0's frames, 5..8: episode 1's
    ids = batch["obs"][:, ::C, 0, 0].numpy()  # channel 0 of each stacked frame = frame id
    nxt = batch["next_obs"][:, ::C, 0, 0].numpy()
    np.testing.assert_array_equal(ids[:4], [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]])
    np.testing.assert_array_equal(nxt[:4], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]])
    np.testing.assert_array_equal(ids[5:7], [[5, 5, 5], [5, 5, 6]])  # new episode: no leak
    assert sorted(np.flatnonzero(dm._ring.valid)) == [
        0,
        1,
        2,
        3,
        5,
        6,
        7,
    ]  # not 4 (end) nor 8 (head)
    assert len(dm) == 7 and dm.num_frames_stored == 9


def test_sample_shapes_dtypes_and_alignment():
    dm = make_replay(capacity=40, stack=3)
    dm.declare_extra("tid", dtype="int64")
    env, records = StackingEnv(3), []
    run_episodes(dm, env, [6, 7], records)
    batch = dm.sample()
    assert batch["obs"].shape == (8, 9, H, W) and batch["obs"].dtype == torch.uint8
    assert batch["next_obs"].shape == (8, 9, H, W) and batch["next_obs"].dtype == torch.uint8
    assert batch["action"].shape == (8, A) and batch["action"].dtype == torch.float32
    assert batch["reward"].shape == (8,) and batch["reward"].dtype == torch.float32
    assert batch["terminated"].dtype == torch.float32
    assert dm.sample(32)["obs"].shape[0] == 32
    before = batch["next_obs"].clone()
    batch["obs"].zero_()  # in-place augmentation of obs must not touch next_obs
    assert torch.equal(batch["next_obs"], before)
    batch = dm._batch_at(dm._ring.valid.nonzero()[0])
    # next_obs of a transition is the obs of the following transition of the same episode.
    for row, tid in enumerate(batch["tid"].tolist()):
        assert not records[tid]["term"] or batch["terminated"][row] == 1
        np.testing.assert_array_equal(batch["obs"][row].numpy(), records[tid]["obs"])
        np.testing.assert_array_equal(batch["next_obs"][row].numpy(), records[tid]["next_obs"])
        if not records[tid]["term"]:
            np.testing.assert_array_equal(records[tid + 1]["obs"], records[tid]["next_obs"])


def test_terminated_flag_only_on_terminal_transitions():
    dm = make_replay(capacity=30)
    dm.declare_extra("tid", dtype="int64")
    env, records = StackingEnv(3), []
    run_episodes(dm, env, [3, 2], records)
    run_episodes(dm, env, [2], records, terminate=False)
    batch = dm._batch_at(np.flatnonzero(dm._ring.valid))
    terminated = dict(zip(batch["tid"].tolist(), batch["terminated"].tolist(), strict=True))
    assert terminated == {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 0.0, 6: 0.0}


def test_long_episode_wraparound_keeps_capacity_minus_stack_transitions():
    dm = make_replay(capacity=10, stack=3)
    env, records = StackingEnv(3), []
    run_episodes(dm, env, [33], records, terminate=False)
    # Frames 24..33 are stored; obs frame g needs g-2..g+1, so g in 26..32 -> 7 = 10 - 3.
    assert len(dm) == dm.capacity - dm.frame_stack
    assert dm.num_frames_stored == dm.capacity


def test_extras_defaults_and_values():
    dm = ReplayDataModule(capacity=16, batch_size=4)
    dm.declare_extra("prior", shape=(A,), dtype="float32", fill=0.0)
    dm.allocate((C, H, W), np.uint8, 2, (A,))
    dm.declare_extra("prior_mask", shape=(), dtype="bool", fill=False)  # after allocate
    dm.declare_extra("prior", shape=(A,), dtype="float32", fill=0.0)  # same spec again: no-op
    assert dm.extras["prior_mask"] == ExtraField((), "bool", False)
    env = StackingEnv(2)
    dm.start_episode(env.reset())
    dm.add(np.zeros(A), 0.0, env.step(), False, prior=np.array([0.5, -0.5]), prior_mask=True)
    dm.add(np.zeros(A), 0.0, env.step(), False)  # extras missing -> fill
    dm.add(np.zeros(A), 0.0, env.step(), False, prior_mask=True)
    dm.declare_extra("score", dtype="float32", fill=7)  # declared with data present
    batch = dm._batch_at(np.arange(3))
    np.testing.assert_array_equal(batch["prior"].numpy(), [[0.5, -0.5], [0, 0], [0, 0]])
    assert batch["prior_mask"].dtype == torch.bool
    assert batch["prior_mask"].tolist() == [True, False, True]
    assert batch["score"].tolist() == [7.0, 7.0, 7.0]
    assert set(dm.sample()) == {
        "obs", "next_obs", "action", "reward", "terminated", "prior", "prior_mask", "score"
    }  # fmt: skip


def _filled_replay(seed: int = 3) -> tuple[ReplayDataModule, StackingEnv, list]:
    dm = make_replay(capacity=23, stack=3, seed=seed)
    dm.declare_extra("tid", dtype="int64", fill=-1)
    dm.declare_extra("prior_mask", dtype="bool")
    env, records = StackingEnv(3), []
    run_episodes(dm, env, [4, 9, 1, 12, 7], records)
    run_episodes(dm, env, [5], records, terminate=False)  # leaves an open episode
    dm.sample()  # advance the RNG away from its seed state
    return dm, env, records


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _continue(dm, env, records):
    obs = env.step()
    dm.add(np.ones(A), 1.0, obs, False, tid=len(records))


@pytest.mark.parametrize("allocate_first", [True, False])
def test_save_load_round_trip_reproduces_samples(tmp_path, allocate_first):
    dm, env, records = _filled_replay()
    dm.save(tmp_path / "replay")
    files = sorted(p.name for p in (tmp_path / "replay").iterdir())
    assert "meta.json" in files and "frames.npy" in files and "extra_tid.npy" in files
    assert len(json.dumps(dm.state_dict())) < 4096  # metadata only

    other = ReplayDataModule(capacity=23, batch_size=8, seed=99)
    if allocate_first:
        other.allocate((C, H, W), np.uint8, 3, (A,))
        other.declare_extra("tid", dtype="int64", fill=-1)
    other.load(tmp_path / "replay")
    assert len(other) == len(dm) and other.num_frames_stored == dm.num_frames_stored
    _assert_batches_equal(dm.sample(), other.sample())
    _assert_batches_equal(dm.sample(64), other.sample(64))
    # The open episode and the write head resume where they were.
    env_copy = StackingEnv(3)
    env_copy.__dict__.update(g=env.g, episode=env.episode, frames=list(env.frames))
    _continue(dm, env, records)
    _continue(other, env_copy, records)
    _assert_batches_equal(dm._batch_at(np.arange(23)), other._batch_at(np.arange(23)))
    np.testing.assert_array_equal(dm._ring.valid, other._ring.valid)


def test_state_dict_restores_sampler_rng():
    dm, _, _ = _filled_replay()
    state = json.loads(json.dumps(dm.state_dict()))  # survives JSON (and torch.save)
    first = dm.sample()
    dm.load_state_dict(state)
    _assert_batches_equal(first, dm.sample())


def test_load_rejects_corrupt_truncated_and_mismatched_checkpoints(tmp_path):
    dm, _, _ = _filled_replay()
    good = tmp_path / "good"
    dm.save(good)

    def broken(name: str):
        d = tmp_path / name
        d.mkdir()
        for p in good.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        return d

    truncated = broken("truncated")
    data = (truncated / "frames.npy").read_bytes()
    (truncated / "frames.npy").write_bytes(data[:-100])
    garbage = broken("garbage")
    (garbage / "reward.npy").write_bytes(b"not a numpy file at all")
    no_meta = broken("no_meta")
    (no_meta / "meta.json").unlink()
    bad_meta = broken("bad_meta")
    (bad_meta / "meta.json").write_text("{ truncated")
    missing = broken("missing")
    (missing / "action.npy").unlink()
    wrong_shape = broken("wrong_shape")
    np.save(wrong_shape / "action.npy", np.zeros((5, A), np.float32))

    for bad in (truncated, garbage, no_meta, bad_meta, missing, wrong_shape):
        fresh = ReplayDataModule(capacity=23)
        with pytest.raises(ConfigError, match="Fix: resume from another checkpoint"):
            fresh.load(bad)
        assert len(fresh) == 0 and fresh.num_frames_stored == 0  # untouched

    other_frames = ReplayDataModule(capacity=23)
    other_frames.allocate((C, 16, 16), np.uint8, 3, (A,))
    with pytest.raises(ConfigError, match="allocated for"):
        other_frames.load(good)
    with pytest.raises(ConfigError, match="capacity=23"):
        ReplayDataModule(capacity=50).load(good)
    declared = ReplayDataModule(capacity=23)
    declared.declare_extra("prior", shape=(A,))
    with pytest.raises(ConfigError, match="lacks declared extras"):
        declared.load(good)


def test_memory_is_one_frame_per_step():
    frame_bytes = 3 * 84 * 84
    dm = ReplayDataModule(capacity=1000)
    dm.declare_extra("prior", shape=(6,))
    dm.declare_extra("prior_mask", dtype="bool")
    dm.allocate((3, 84, 84), np.uint8, 3, (6,))
    obs = np.zeros((9, 84, 84), np.uint8)
    dm.start_episode(obs)
    for t in range(1000):
        obs[-3:] = t % 256
        dm.add(np.zeros(6), 0.0, obs, False)
    assert dm.num_frames_stored == 1000 and len(dm) == 1000 - 3
    assert dm._ring.frames.nbytes == 1000 * frame_bytes
    assert dm.nbytes < 1.1 * 1000 * frame_bytes


def test_state_vector_mode():
    dm = ReplayDataModule(capacity=12, batch_size=5)
    dm.allocate((4,), np.float32, 1, (A,))
    obs = np.zeros(4, np.float32)
    dm.start_episode(obs)
    states = [obs]
    for t in range(1, 20):
        obs = np.full(4, t, np.float32)
        states.append(obs)
        dm.add(np.full(A, t), float(t), obs, t == 19)
    batch = dm.sample()
    assert batch["obs"].shape == (5, 4) and batch["obs"].dtype == torch.float32
    # action t was taken in state t-1 and led to state t.
    np.testing.assert_array_equal(batch["obs"][:, 0] + 1, batch["action"][:, 0])
    np.testing.assert_array_equal(batch["next_obs"][:, 0], batch["action"][:, 0])
    assert len(dm) == 11  # 12 stored states, the newest has no successor


def test_train_dataloader_yields_sample_batches():
    dm, _, _ = _filled_replay()
    batches = iter(dm.train_dataloader())
    for _ in range(2):
        batch = next(batches)
        assert batch["obs"].shape == (8, 9, H, W)


def test_capacity_too_small_for_the_stack_is_a_config_error():
    """The recipe's replay.capacity against the env's frame stack: the user fixes the recipe."""
    with pytest.raises(ConfigError, match="replay.capacity") as err:
        ReplayDataModule(capacity=3).allocate((C, H, W), np.uint8, 3, (A,))
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


def test_misuse_by_the_loop_is_a_programming_error_not_a_config_error():
    """Calls a recipe cannot cause raise ordinary exceptions, so they keep their traceback."""
    dm = ReplayDataModule(capacity=10)
    errors = []

    def expect(kind, match, call, *args, **kwargs):
        with pytest.raises(kind, match=match) as err:
            call(*args, **kwargs)
        errors.append(err.value)

    expect(RuntimeError, "before allocation", dm.start_episode, np.zeros((9, H, W), np.uint8))
    expect(RuntimeError, "before allocation", dm.sample)
    expect(RuntimeError, "before allocation", dm.save, "unused")
    for name in ("obs", "reward", "frames", "bad-name"):
        expect(ValueError, "replay extra", dm.declare_extra, name)
    dm.declare_extra("prior", shape=(A,))
    expect(ValueError, "already declared", dm.declare_extra, "prior", shape=(3,))
    dm.allocate((C, H, W), np.uint8, 3, (A,))
    expect(RuntimeError, "already allocated", dm.allocate, (C, H, W), np.uint8, 4, (A,))
    expect(RuntimeError, "no sampleable", dm.sample)
    obs = np.zeros((9, H, W), np.uint8)
    expect(RuntimeError, "start_episode", dm.add, np.zeros(A), 0.0, obs, False)
    expect(ValueError, "shape", dm.start_episode, np.zeros((3, H, W), np.uint8))  # unstacked
    expect(ValueError, "dtype", dm.start_episode, np.zeros((9, H, W), np.float32))  # normalised
    expect(IndexError, "stream 1 does not exist", dm.start_episode, obs, stream=1)
    dm.start_episode(obs)
    expect(ValueError, "action", dm.add, np.zeros(A + 1), 0.0, obs, False)
    expect(ValueError, "not declared", dm.add, np.zeros(A), 0.0, obs, False, value=1.0)
    expect(ValueError, "declared", dm.add, np.zeros(A), 0.0, obs, False, prior=np.zeros(3))
    dm.add(np.zeros(A), 0.0, obs, True)
    # After a termination the env must be reset before the next add.
    expect(RuntimeError, "no open episode", dm.add, np.zeros(A), 0.0, obs, False)
    assert errors and not any(isinstance(err, ConfigError) for err in errors)


def test_transitions_by_id_survive_until_overwritten():
    from covr_lightning.data.replay import ReplayDataModule

    replay = ReplayDataModule(capacity=8, batch_size=2)
    replay.allocate(frame_shape=(1,), frame_dtype=np.float32, frame_stack=1, action_shape=(1,))
    replay.start_episode(np.zeros(1, np.float32))
    ids = []
    for t in range(12):
        replay.add(np.array([t], np.float32), float(t), np.full(1, t + 1, np.float32), False)
        ids.append(replay.last_transition_id)
    assert ids == list(range(12))
    batch, present = replay.transitions_at(np.array(ids))
    # 13 frames written into 8 slots: transitions 0..4 lost a frame they need; 11 lacks nothing.
    assert present.tolist() == [False] * 5 + [True] * 7
    assert batch["action"][present].flatten().tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert batch["obs"][present].flatten().tolist() == [5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize(("key", "value"), [("capacity", 1), ("batch_size", 0), ("seed", -1)])
def test_bad_values_are_refused_by_the_typed_signature(key, value):
    """Single-value bounds live in the __init__ types, checked where a recipe is parsed."""
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ReplayDataModule, "replay")
    assert parser.parse_args([]).replay.capacity == 100_000  # the defaults pass
    with pytest.raises(ArgumentError, match=rf"replay\.{key}"):
        parser.parse_args([f"--replay.{key}={value}"])
