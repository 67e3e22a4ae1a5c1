"""Replay with several streams (one per env of a vectorised loop): each stream is its own ring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.data.test_replay import (
    A,
    C,
    H,
    StackingEnv,
    W,
    assert_rows_match,
    expected_valid_tids,
)

from covr_lightning.data import ReplayDataModule
from covr_lightning.errors import ConfigError

STREAMS, STACK, CAPACITY = 3, 3, 31  # 10 slots per stream; one slot of the 31 stays unused


def make(capacity: int = CAPACITY, streams: int = STREAMS, seed: int = 0) -> ReplayDataModule:
    dm = ReplayDataModule(capacity=capacity, batch_size=8, seed=seed)
    dm.declare_extra("tid", (), np.int64, -1)
    dm.allocate((C, H, W), np.uint8, STACK, (A,), num_streams=streams)
    return dm


def play_interleaved(dm, steps: int, seed: int = 0):
    """Step every stream once per round, in a shuffled order, with random episode lengths.

    Returns per-stream records (keyed by a global tid) and the stream envs.
    """
    rng = np.random.default_rng(seed)
    envs = [StackingEnv(STACK) for _ in range(dm.num_streams)]
    for k, env in enumerate(envs):  # distinct frames across streams: episode channel offset
        env.episode = 50 * k - 1
    obs = [None] * dm.num_streams
    step_in_episode = [0] * dm.num_streams
    left = [0] * dm.num_streams
    records: list[dict] = []
    for _ in range(steps):
        for s in rng.permutation(dm.num_streams):
            if obs[s] is None:
                obs[s] = envs[s].reset()
                dm.start_episode(obs[s], stream=s)
                step_in_episode[s], left[s] = 0, int(rng.integers(1, 8))
            tid = len(records)
            action = np.array([tid, -tid], np.float32) / 100
            next_obs = envs[s].step()
            left[s] -= 1
            done = left[s] == 0 and bool(rng.integers(0, 2))
            cut = left[s] == 0 and not done
            dm.add(action, tid + 0.5, next_obs, done, stream=s, tid=tid)
            records.append(
                dict(obs=obs[s], next_obs=next_obs, action=action, reward=tid + 0.5, term=done,
                     g=envs[s].g - 1, step=step_in_episode[s], stream=s, tid=tid,
                     id=dm.last_transition_id)
            )  # fmt: skip
            obs[s] = None if done or cut else next_obs
            step_in_episode[s] += 1
    return records, envs


def check_against_records(dm, records, envs):
    valid = np.flatnonzero(dm._ring.valid)
    batch = dm._batch_at(valid)
    tids = batch["tid"].numpy()
    per_stream = dm.capacity // dm.num_streams
    for s, env in enumerate(envs):
        mine = [r for r in records if r["stream"] == s]
        alive = expected_valid_tids(mine, env.g + 1, per_stream, STACK)  # indices into mine
        assert {int(t) for t in tids if records[t]["stream"] == s} == {
            mine[i]["tid"] for i in alive
        }
    assert_rows_match(batch, tids, records)


@pytest.mark.parametrize("steps", [2, 9, 40])
def test_interleaved_streams_keep_their_own_episodes(steps):
    dm = make()
    records, envs = play_interleaved(dm, steps)
    check_against_records(dm, records, envs)
    assert dm.num_frames_stored <= 3 * (CAPACITY // 3)


def test_transition_ids_name_transitions_across_streams():
    dm = make()
    records, _ = play_interleaved(dm, 40)
    ids = np.array([r["id"] for r in records])
    assert len(set(ids.tolist())) == len(ids)  # unique across streams
    batch, present = dm.transitions_at(ids)
    assert present.sum() == len(dm) and present[-3:].all() and not present[:10].any()
    for row in np.flatnonzero(present):
        assert batch["tid"][row].item() == row  # the id fetched its own transition
        np.testing.assert_array_equal(batch["obs"][row].numpy(), records[row]["obs"])


def test_one_stream_layout_equals_the_plain_ring():
    one = ReplayDataModule(capacity=12, batch_size=8, seed=3)
    one.allocate((C, H, W), np.uint8, STACK, (A,), num_streams=1)
    env = StackingEnv(STACK)
    for _ in range(3):
        one.start_episode(env.reset())
        for t in range(6):
            one.add(np.zeros(A), 1.0, env.step(), t == 5)
    assert one.num_frames_stored == 12 and one._ring.extent == 12
    assert one.last_transition_id == 3 * 7 - 2  # the plain frame write counter
    assert one.frames_written.tolist() == [3 * 7]  # counts overwritten frames too


def test_frames_written_counts_per_stream():
    dm = ReplayDataModule(capacity=CAPACITY, batch_size=8)
    assert dm.frames_written.tolist() == [0]  # before allocation
    dm = make()
    play_interleaved(dm, 10)
    written = dm.frames_written
    assert written.shape == (dm.num_streams,) and written.sum() >= dm.num_frames_stored
    assert written.min() >= 10  # every stream wrote at least one frame per round
    written[:] = -1  # a copy: the buffer's counters are untouched
    assert dm.frames_written.min() >= 0


def test_save_load_round_trip_with_streams(tmp_path):
    dm = make(seed=5)
    records, envs = play_interleaved(dm, 25)
    dm.save(tmp_path / "replay")
    meta = json.loads((tmp_path / "replay" / "meta.json").read_text())
    assert meta["num_streams"] == STREAMS and meta["extent"] <= CAPACITY
    restored = ReplayDataModule(capacity=CAPACITY, batch_size=8, seed=0)
    restored.declare_extra("tid", (), np.int64, -1)
    restored.load(tmp_path / "replay")
    check_against_records(restored, records, envs)
    for key in ("obs", "next_obs", "tid"):
        np.testing.assert_array_equal(restored.sample()[key], dm.sample()[key])
    # Writing goes on in the same slots as the original would use.
    obs = envs[1].step()
    restored.start_episode(obs, stream=1)
    dm.start_episode(obs, stream=1)
    assert restored._ring.cur.tolist() == dm._ring.cur.tolist()


def test_checkpoint_with_other_stream_count_is_refused(tmp_path):
    dm = make()
    play_interleaved(dm, 5)
    dm.save(tmp_path / "replay")
    other = ReplayDataModule(capacity=CAPACITY, batch_size=8)
    other.declare_extra("tid", (), np.int64, -1)
    other.allocate((C, H, W), np.uint8, STACK, (A,), num_streams=2)
    with pytest.raises(ConfigError, match="num_envs"):
        other.load(tmp_path / "replay")


def test_state_of_another_format_version_is_a_config_error():
    dm = ReplayDataModule(capacity=12, batch_size=4)
    dm.allocate((C, H, W), np.uint8, STACK, (A,))
    state = dm.state_dict()
    # A one-stream state of the never-released format 1 is refused like any foreign checkpoint.
    old = {k: v for k, v in state.items() if k not in ("num_streams", "extent", "heads")}
    old.update(version=1, head=0, num_written=0, cur=-1, cur_step=0)
    for foreign in (old, {**state, "version": 3}):
        fresh = ReplayDataModule(capacity=12, batch_size=4)
        with pytest.raises(ConfigError, match="Fix: resume from another checkpoint"):
            fresh.load_state_dict(foreign)
        assert not fresh.extras and len(fresh) == 0 and fresh.frame_shape == ()  # untouched


def test_bad_stream_is_an_index_error_and_too_small_share_a_config_error():
    dm = make()
    with pytest.raises(IndexError, match="stream 3 does not exist") as err:
        dm.start_episode(np.zeros((STACK * C, H, W), np.uint8), stream=3)
    assert not isinstance(err.value, ConfigError)
    small = ReplayDataModule(capacity=7, batch_size=4)
    with pytest.raises(ConfigError, match="capacity >= 8"):
        small.allocate((C, H, W), np.uint8, STACK, (A,), num_streams=2)
