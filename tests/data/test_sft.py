"""The SFT data module: D_f collection, return-to-go, EDDF -> RALW -> drop zeros, serving, checkpoints.

Frames are 8x8x3 uint8 filled with a tag (the step's number), so a served frame says which row it
came from; actions are ``[step / 10, 0]`` and targets their first entry with two decimals.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from jsonargparse import ArgumentError, ArgumentParser

from covr_lightning.data.sft import SFTDataModule
from covr_lightning.data.sft_loader import LengthBuckets
from covr_lightning.errors import ConfigError

LN3 = math.log(3.0)  # s(ln 3) = sigmoid(-ln 3) = 1 / (1 + 3) = 0.25 with the default sign


def frame(tag: int) -> np.ndarray:
    return np.full((8, 8, 3), tag, dtype=np.uint8)


def action(tag: int) -> np.ndarray:
    return np.array([tag / 10, 0.0], dtype=np.float32)


def encode(a: np.ndarray) -> str:
    return f"{a[0]:.2f}"


def collate(frames: list[np.ndarray], targets: list[str], weights: np.ndarray) -> dict:
    return {
        "tags": [int(f[0, 0, 0]) for f in frames],
        "frames": np.stack(frames),
        "targets": list(targets),
        "weights": np.asarray(weights),
    }


def play(dm, rewards, framed=None, *, first_tag=0, end=True, bootstrap=0.0, truncated=False):
    """Record one segment; steps in ``framed`` (all when None) get frame/action tagged first_tag+t."""
    for t, r in enumerate(rewards):
        tag = first_tag + t
        if framed is None or t in framed:
            dm.record_step(r, frame=frame(tag), action=action(tag), replay_index=100 + tag)
        else:
            dm.record_step(r)
    if end:
        dm.end_segment(bootstrap=bootstrap, truncated=truncated)


def build(dm, entropy=0.0, q_values=None) -> dict[str, float]:
    return dm.build(entropy=entropy, encode_target=encode, collate=collate, q_values=q_values)


def epoch(dm) -> list[dict]:
    return list(dm.train_dataloader())


# ---------------------------------------------------------------------- (1) a worked example
def test_hand_computed_example():
    # gamma = 0.5, one terminated segment of 9 steps, every step framed (rows 0..8).
    # Rewards r = [1, 5, -2, 8, -5.5, 9, -2, 7.5, 9]; backwards, G_t = r_t + 0.5 G_{t+1}, G_9 = 0:
    #   G8 = 9;  G7 = 7.5 + 4.5 = 12;  G6 = -2 + 6 = 4;  G5 = 9 + 2 = 11;  G4 = -5.5 + 5.5 = 0
    #   G3 = 8 + 0 = 8;  G2 = -2 + 4 = 2;  G1 = 5 + 1 = 6;  G0 = 1 + 3 = 4
    # G = [4, 6, 2, 8, 0, 11, 4, 12, 9]; sorted [0, 2, 4, 4, 6, 8, 9, 11, 12] (9 values, so the
    # linear 25/50/75th percentiles are exactly sorted[2], sorted[4], sorted[6]): 4, 6, 9.
    # EDDF is affine-equivariant (docs/method.md), so in raw units: median 6, IQR 9 - 4 = 5,
    # s(ln 3) = 0.25, threshold 6 + 0.25 * 5 = 7.25 -> kept rows 3 (8), 5 (11), 7 (12), 8 (9).
    # In z units: mean 56/9, population variance 482/9 - (56/9)^2 = 1202/81, std sqrt(1202)/9:
    #   tau_z = (7.25 - 56/9) * 9 / sqrt(1202) = 9.25 / sqrt(1202), IQR_z = 45 / sqrt(1202),
    #   median_z = (6 - 56/9) * 9 / sqrt(1202) = -2 / sqrt(1202).
    # RALW over the kept [8, 11, 12, 9]: min 8, max 12, g_bar = 2 (g - 8) / 4 - 1 = [-1, .5, 1, -.5]
    #   -> w = [0, 0.5, 1, 0]; mean weight 1.5 / 4 = 0.375; rows 3 and 8 are dropped.
    # Served: row 5 (target "0.50", w 0.5) and row 7 (target "0.70", w 1).
    dm = SFTDataModule(gamma=0.5, return_signal="bootstrapped_return_to_go")
    play(dm, [1, 5, -2, 8, -5.5, 9, -2, 7.5, 9])
    np.testing.assert_allclose(dm.returns, [4, 6, 2, 8, 0, 11, 4, 12, 9])

    metrics = build(dm, entropy=LN3)
    assert dm.built_indices.tolist() == [5, 7]
    assert dm.built_targets == ["0.50", "0.70"]
    np.testing.assert_allclose(dm.built_weights, [0.5, 1.0])
    root = math.sqrt(1202)
    expected = {
        "eddf/threshold": 9.25 / root,
        "eddf/median": -2 / root,
        "eddf/iqr": 45 / root,
        "eddf/entropy_scale": 0.25,
        "eddf/rows_in": 9,
        "eddf/rows_kept": 4,
        "eddf/kept_fraction": 4 / 9,
        "ralw/mean_weight": 0.375,
        "sft/rows_in": 9,
        "sft/rows_kept": 4,
        "sft/rows_out": 2,
        "sft/rows_zero_weight": 2,
        "sft/rows_dropped": 0,
        "sft/entropy": LN3,
    }
    assert metrics == pytest.approx(expected, abs=1e-6)
    assert dm.last_metrics == metrics

    (batch,) = epoch(dm)
    rows = zip(batch["targets"], batch["weights"], strict=True)
    served = dict(zip(batch["tags"], rows, strict=True))
    assert served == {5: ("0.50", 0.5), 7: ("0.70", 1.0)}


# ---------------------------------------------------------------------- (2), (3) returns
def test_return_to_go_matches_brute_force_with_bootstrap():
    gamma = 0.9
    rng = np.random.default_rng(1)
    segments = [  # (rewards, framed steps, bootstrap, truncated)
        (rng.normal(size=7), {0, 2, 3, 6}, 0.0, False),
        (rng.normal(size=5), {1, 4}, 2.5, True),
    ]
    dm = SFTDataModule(gamma=gamma, return_signal="bootstrapped_return_to_go")
    expected, flags = [], []
    for rewards, framed, bootstrap, cut in segments:
        play(dm, rewards, framed, bootstrap=bootstrap, truncated=cut)
        n = len(rewards)
        for t in sorted(framed):
            brute = sum(gamma ** (k - t) * rewards[k] for k in range(t, n))
            expected.append(brute + gamma ** (n - t) * bootstrap)
            flags.append(cut)
    np.testing.assert_allclose(dm.returns, expected, rtol=1e-12)
    assert dm.truncated.tolist() == flags
    assert dm.segment_steps.tolist() == [0, 2, 3, 6, 1, 4]


def test_rows_only_where_a_frame_is_given_but_returns_use_every_reward():
    dm = SFTDataModule(gamma=0.5, return_signal="bootstrapped_return_to_go")
    play(dm, [1, 2, 3, 4, 5], framed={1, 3}, end=False)
    assert len(dm) == 2 and dm.open_segment_length == 5
    assert np.isnan(dm.returns).all()  # not known before the segment ends
    dm.end_segment()
    # G3 = 4 + 0.5 * 5 = 6.5; G2 = 3 + 0.5 * 6.5 = 6.25; G1 = 2 + 0.5 * 6.25 = 5.125
    np.testing.assert_allclose(dm.returns, [5.125, 6.5])
    np.testing.assert_allclose(dm.rewards, [2, 4])
    assert dm.segment_steps.tolist() == [1, 3]
    assert dm.replay_indices.tolist() == [101, 103]
    assert dm.frames[:, 0, 0, 0].tolist() == [1, 3]
    np.testing.assert_allclose(dm.actions[:, 0], [0.1, 0.3])
    assert dm.open_segment_length == 0
    dm.end_segment()  # nothing open: no-op
    np.testing.assert_allclose(dm.returns, [5.125, 6.5])


def test_open_segment_rows_are_never_kept_and_warned_about(caplog):
    dm = SFTDataModule(eddf_mode="top_k", eddf_quantile=0.0, ralw_mode="none")
    play(dm, [1, 2, 3])
    play(dm, [50, 60], first_tag=3, end=False)  # would be the best rows, but G is unknown
    with caplog.at_level(logging.WARNING, logger="covr_lightning.data.sft_build"):
        build(dm)
    assert dm.built_indices.tolist() == [0, 1, 2]
    assert any("end_segment" in r.getMessage() for r in caplog.records)


def test_rows_over_max_rows_are_dropped_with_one_warning(caplog):
    dm = SFTDataModule(gamma=1.0, max_rows=3, return_signal="bootstrapped_return_to_go")
    with caplog.at_level(logging.WARNING, logger="covr_lightning.data.sft"):
        play(dm, [1, 1, 1, 1, 1])
    assert len(dm) == 3 and dm.dropped_rows == 2
    assert len([r for r in caplog.records if "max_rows" in r.getMessage()]) == 1
    np.testing.assert_allclose(dm.returns, [5, 4, 3])  # dropped steps' rewards still count
    assert build(dm)["sft/rows_dropped"] == 2


def test_record_step_rejects_half_rows_and_bad_frames():
    dm = SFTDataModule()
    with pytest.raises(ValueError, match="both frame and action"):
        dm.record_step(1.0, frame=frame(0))
    with pytest.raises(ValueError, match="uint8"):
        dm.record_step(1.0, frame=np.zeros((8, 8, 3), np.float32), action=action(0))
    dm.record_step(1.0, frame=frame(0), action=action(0))
    with pytest.raises(ValueError, match="D_f holds") as err:
        dm.record_step(1.0, frame=np.zeros((4, 4, 3), np.uint8), action=action(0))
    assert not isinstance(err.value, ConfigError)  # the loop's mistake: keeps its traceback
    full = SFTDataModule(max_rows=1)
    full.record_step(1.0, frame=frame(0), action=action(0))
    with pytest.raises(ValueError, match="uint8"):  # checked even when the row would be dropped
        full.record_step(1.0, frame=np.zeros((8, 8, 3), np.float32), action=action(1))


# ---------------------------------------------------------------------- (4) return signals
@pytest.mark.parametrize(
    ("signal", "q_values", "best"),
    [
        # G = [4.42315, 3.8035, 3.115, 2.35, 1.5] with gamma 0.9: the first row is best
        ("return_to_go", None, 0),
        ("immediate_reward", None, 4),  # r = 1.5 on the last step
        ("q_value", np.array([0.0, 5.0, 0.0, 0.0, 0.0]), 1),
    ],
)
def test_return_signal_selects_g(signal, q_values, best):
    # top_k with q = 0.8 over 5 rows: threshold between the 4th and 5th value -> only the best row
    dm = SFTDataModule(
        gamma=0.9, return_signal=signal, eddf_mode="top_k", eddf_quantile=0.8, ralw_mode="none"
    )
    play(dm, [1, 1, 1, 1, 1.5])
    build(dm, q_values=q_values)
    assert dm.built_indices.tolist() == [best]


def test_q_value_signal_needs_one_q_per_row():
    dm = SFTDataModule(return_signal="q_value")
    play(dm, [1, 2, 3])
    with pytest.raises(ValueError, match="needs q_values"):
        build(dm)
    with pytest.raises(ValueError, match="shape"):
        build(dm, q_values=np.zeros(2))


# ---------------------------------------------------------------------- (5), (6) ablations
def random_rows(dm, n=100, seed=0):
    play(dm, np.random.default_rng(seed).normal(size=n))


def test_ralw_none_keeps_every_row_eddf_kept():
    dm = SFTDataModule(return_signal="immediate_reward", ralw_mode="none")
    random_rows(dm)
    metrics = build(dm)
    assert 0 < metrics["sft/rows_kept"] < 100
    assert metrics["sft/rows_out"] == metrics["sft/rows_kept"]
    np.testing.assert_array_equal(dm.built_weights, 1.0)


def test_ralw_random_is_uniform_and_reproducible_with_the_seed():
    built = []
    for seed in (7, 7, 8):
        dm = SFTDataModule(
            return_signal="immediate_reward",
            eddf_mode="top_k",
            eddf_quantile=0.0,
            ralw_mode="random",
            seed=seed,
        )
        random_rows(dm)
        build(dm)
        assert ((dm.built_weights > 0) & (dm.built_weights < 1)).all()
        built.append(dm.built_weights.copy())
    np.testing.assert_array_equal(built[0], built[1])
    assert len(built[0]) != len(built[2]) or not np.array_equal(built[0], built[2])
    assert built[0].mean() == pytest.approx(0.5, abs=0.1)


def test_eddf_random_keeps_as_many_rows_as_dynamic_but_others():
    kept = {}
    for mode in ("dynamic", "random"):
        dm = SFTDataModule(return_signal="immediate_reward", eddf_mode=mode, ralw_mode="none")
        random_rows(dm)
        build(dm, entropy=0.0)
        kept[mode] = dm.built_indices.tolist()
    assert 0 < len(kept["dynamic"]) < 100
    assert len(kept["random"]) == len(kept["dynamic"])
    assert kept["random"] != kept["dynamic"]


def test_top_k_keeps_the_best_tenth():
    dm = SFTDataModule(
        return_signal="immediate_reward", eddf_mode="top_k", eddf_quantile=0.9, ralw_mode="none"
    )
    random_rows(dm)
    build(dm)
    best = np.argsort(-np.asarray(dm.rewards))[:10]
    assert dm.built_indices.tolist() == sorted(best.tolist())


# ---------------------------------------------------------------------- (7), (11) serving
def test_zero_weight_rows_are_dropped_and_served_weights_match():
    # Rewards 0..9, every row kept (top_k q = 0); RALW: g_bar = 2 g / 9 - 1, positive for g >= 5:
    # w(5..9) = [1/9, 3/9, 5/9, 7/9, 1]; rows 0..4 (g_bar <= -1/9) are dropped.
    dm = SFTDataModule(
        batch_size=2, return_signal="immediate_reward", eddf_mode="top_k", eddf_quantile=0.0
    )
    play(dm, range(10))
    metrics = build(dm)
    assert (metrics["sft/rows_kept"], metrics["sft/rows_out"]) == (10, 5)
    assert dm.built_indices.tolist() == [5, 6, 7, 8, 9]
    np.testing.assert_allclose(dm.built_weights, [1 / 9, 3 / 9, 5 / 9, 7 / 9, 1])
    assert metrics["ralw/mean_weight"] == pytest.approx(25 / 9 / 10)
    batches = epoch(dm)
    assert sorted(len(b["tags"]) for b in batches) == [1, 2, 2]
    served = {t: w for b in batches for t, w in zip(b["tags"], b["weights"], strict=True)}
    assert served == pytest.approx({5: 1 / 9, 6: 3 / 9, 7: 5 / 9, 8: 7 / 9, 9: 1.0})
    targets = {t: s for b in batches for t, s in zip(b["tags"], b["targets"], strict=True)}
    assert targets == {5: "0.50", 6: "0.60", 7: "0.70", 8: "0.80", 9: "0.90"}


def keep_all(batch_size=4, seed=0) -> SFTDataModule:
    dm = SFTDataModule(
        batch_size=batch_size,
        return_signal="immediate_reward",
        eddf_mode="top_k",
        eddf_quantile=0.0,
        ralw_mode="none",
        seed=seed,
    )
    play(dm, range(10))
    build(dm)
    return dm


def test_dataloader_serves_every_row_once_per_epoch_shuffled_and_seeded():
    dm = keep_all()
    orders = []
    for _ in range(2):
        batches = epoch(dm)
        assert sorted(len(b["tags"]) for b in batches) == [2, 4, 4]  # batch order is shuffled
        assert all(b["frames"].shape == (len(b["tags"]), 8, 8, 3) for b in batches)
        order = [t for b in batches for t in b["tags"]]
        assert sorted(order) == list(range(10))
        orders.append(order)
    assert orders[0] != orders[1] and orders[0] != list(range(10))  # reshuffled every epoch
    assert [t for b in epoch(keep_all()) for t in b["tags"]] == orders[0]  # same seed, same order


def test_length_buckets_batch_similar_lengths_and_serve_every_example_once():
    lengths = np.random.default_rng(0).integers(5, 40, size=300)
    rng = np.random.default_rng(1)
    sampler = LengthBuckets(lambda: rng, lengths, batch_size=8, pool_batches=4)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(300))  # once each
    assert epochs[0] != epochs[1]  # a fresh draw every epoch

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    plain = [list(b) for b in np.array_split(np.random.default_rng(2).permutation(300), 38)]
    assert padding(epochs[0]) < padding(plain) / 3  # sorted pools pad far less than random batches
    # The batch order is random, not longest-last.
    first_half = np.mean([lengths[b].mean() for b in epochs[0][:19]])
    assert abs(first_half - lengths.mean()) < 5


def test_dataloader_needs_a_non_empty_build():
    dm = SFTDataModule()
    with pytest.raises(RuntimeError, match="build"):
        dm.train_dataloader()
    metrics = build(dm)  # nothing recorded: nothing kept, no error
    assert dm.num_examples == 0 and metrics["sft/rows_out"] == 0
    assert math.isnan(metrics["ralw/mean_weight"])
    with pytest.raises(RuntimeError, match="num_examples"):
        dm.train_dataloader()


# ---------------------------------------------------------------------- (8) checkpoints
CONFIG = {
    "gamma": 0.8,
    "eddf_mode": "random",
    "ralw_mode": "random",
    "max_rows": 6,
    "return_signal": "bootstrapped_return_to_go",
}


def half_round() -> SFTDataModule:
    """A closed truncated segment, an open one, one dropped row and a used generator."""
    dm = SFTDataModule(**CONFIG, seed=3)
    play(dm, [1, -2, 3, 0.5], bootstrap=1.0, truncated=True)
    play(dm, [2, 0, 4], first_tag=4, end=False)  # rows 4, 5 stored, step 6 dropped (max_rows)
    dm.record_step(-1.0, frame=frame(7), action=action(7), replay_index=107, entropy=0.25)
    dm.rng.random(5)
    return dm


def finish(dm) -> tuple:
    dm.record_step(3.0)
    dm.end_segment()
    metrics = build(dm, entropy=0.3)
    return dm.built_indices.tolist(), dm.built_targets, dm.built_weights.tolist(), metrics


ARRAYS = ("frames", "actions", "rewards", "returns", "truncated", "replay_indices", "entropies")


def test_save_load_round_trip_resumes_identically(tmp_path):
    original = half_round()
    original.save(tmp_path / "sft")
    restored = SFTDataModule(**CONFIG, seed=99)
    restored.load(tmp_path / "sft")
    assert len(restored) == 6 and restored.dropped_rows == 2 and restored.open_segment_length == 4
    for name in (*ARRAYS, "segment_steps"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(original, name))
    assert restored.state_dict() == original.state_dict()
    one, two = finish(original), finish(restored)
    assert one[:3] == two[:3] and one[3] == pytest.approx(two[3], nan_ok=True)
    assert len(one[0]) > 0
    # rows of the open segment got their return once it ended: G4 = 2 + 0.8 (0 + 0.8 (4 + ...))
    assert restored.returns[4] == pytest.approx(2 + 0.8**2 * (4 + 0.8 * (-1 + 0.8 * 3)))


def test_load_after_growth_keeps_appending(tmp_path):
    original = half_round()
    original.save(tmp_path)
    restored = SFTDataModule(**{**CONFIG, "max_rows": 100})
    restored.load(tmp_path)
    play(restored, [1.0] * 3, first_tag=20)
    assert len(restored) == 9
    assert restored.frames[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 20, 21, 22]


def test_state_dict_round_trip_restores_generator_and_segment():
    dm = half_round()
    state = json.loads(json.dumps(dm.state_dict()))
    first = dm.rng.random(3)
    dm.record_step(9.0)
    dm.load_state_dict(state)
    assert dm.state_dict() == state and dm.open_segment_length == 4
    np.testing.assert_array_equal(dm.rng.random(3), first)
    with pytest.raises(ValueError, match="load") as err:
        SFTDataModule().load_state_dict(state)  # holds no rows: a misuse, not a user's mistake
    assert not isinstance(err.value, ConfigError)
    with pytest.raises(ConfigError, match="malformed"):
        dm.load_state_dict({**state, "rng": {"bit_generator": "nope"}})


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "returns.npy").write_bytes(b"not an npy file"), "returns.npy"),
        (lambda d: (d / "frames.npy").write_bytes((d / "frames.npy").read_bytes()[:200]), "frames"),
        (lambda d: (d / "actions.npy").unlink(), "actions.npy"),
        (lambda d: (d / "meta.json").write_text("{"), "meta.json"),
        (lambda d: (d / "meta.json").unlink(), "meta.json"),
    ],
)
def test_damaged_checkpoint_is_a_one_line_config_error(tmp_path, damage, named):
    half_round().save(tmp_path)
    damage(tmp_path)
    dm = SFTDataModule(**CONFIG)
    play(dm, [1.0])
    with pytest.raises(ConfigError, match=named) as err:
        dm.load(tmp_path)
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)
    assert len(dm) == 1 and dm.returns.tolist() == [1.0]  # unchanged


def test_load_refuses_more_rows_than_max_rows(tmp_path):
    half_round().save(tmp_path)
    with pytest.raises(ConfigError, match="sft.max_rows"):
        SFTDataModule(max_rows=5).load(tmp_path)


# ---------------------------------------------------------------------- (9), (10)
def test_clear_empties_everything():
    dm = keep_all()
    play(dm, [100, 100], first_tag=50, end=False)
    dm.clear()
    assert len(dm) == 0 and dm.num_examples == 0 and dm.open_segment_length == 0
    assert dm.frames.shape[0] == 0 and dm.built_indices.size == 0 and dm.dropped_rows == 0
    with pytest.raises(RuntimeError):
        dm.train_dataloader()
    play(dm, [1.0])  # the open segment's rewards (100, 100) are gone too
    assert dm.returns.tolist() == [1.0] and dm.segment_steps.tolist() == [0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("gamma", 1.5),
        ("gamma", -0.1),
        ("eddf_quantile", 1.5),
        ("eddf_temperature", 0.0),
        ("eddf_temperature", math.nan),
        ("max_rows", 0),
        ("seed", -1),
        ("return_signal", "q"),
        ("eddf_mode", "topk"),
        ("eddf_sign", "positive"),
        ("ralw_mode", "uniform"),
    ],
)
def test_invalid_config_is_refused_by_the_typed_signature(key, value):
    """Single-value bounds live in the __init__ types, checked where a recipe is parsed."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SFTDataModule, "sft")
    assert parser.parse_args([]).sft.batch_size == 8  # the defaults pass
    with pytest.raises(ArgumentError, match=rf"sft\.{key}"):
        parser.parse_args([f"--sft.{key}={value}"])


def test_state_of_another_format_version_is_a_config_error(tmp_path):
    dm = half_round()
    state = json.loads(json.dumps(dm.state_dict()))
    # The never-released format 1 kept one open segment as a suffix of the rows.
    old = {k: v for k, v in state.items() if k != "open_segments"}
    old.update(version=1, segment_first_row=2, segment_rewards=[1.0, 2.0])
    for foreign in (old, {**state, "version": 3}):
        with pytest.raises(ConfigError, match="Fix: resume from another checkpoint"):
            dm.load_state_dict(foreign)
    dm.save(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(old))
    fresh = SFTDataModule(**CONFIG)
    with pytest.raises(ConfigError, match="format version 1|malformed"):
        fresh.load(tmp_path)
    assert len(fresh) == 0


def test_interleaved_streams_get_the_returns_of_separate_segments(tmp_path):
    """Two envs' steps arrive interleaved; each stream's rows get its own return-to-go."""
    rewards = {0: [1.0, -2.0, 3.0, 0.5, 2.0], 1: [4.0, 0.0, -1.0]}
    mixed = SFTDataModule(gamma=0.8)
    separate = {k: SFTDataModule(gamma=0.8) for k in rewards}
    order = [0, 1, 0, 1, 0, 1, 0, 0]
    seen = {0: 0, 1: 0}
    for k in order:
        t = seen[k]
        tag = 10 * k + t
        kw = dict(frame=frame(tag), action=action(tag), replay_index=tag)
        mixed.record_step(rewards[k][t], **kw, stream=k)
        separate[k].record_step(rewards[k][t], **kw)
        seen[k] += 1
        if k == 1 and seen[1] == 3:  # stream 1 terminates while stream 0 is mid-episode
            mixed.end_segment(stream=1)
            separate[1].end_segment()
    assert mixed.open_streams == [0] and mixed.open_segment_length == 5
    mixed.save(tmp_path / "sft")  # the open segment of stream 0 survives a checkpoint
    restored = SFTDataModule(gamma=0.8)
    restored.load(tmp_path / "sft")
    for dm in (mixed, restored):
        dm.end_segment(bootstrap=2.0, truncated=True, stream=0)
    separate[0].end_segment(bootstrap=2.0, truncated=True)
    for dm in (mixed, restored):
        for k, single in separate.items():
            mine = dm.replay_indices // 10 == k
            np.testing.assert_allclose(dm.returns[mine], single.returns)
            np.testing.assert_array_equal(dm.truncated[mine], single.truncated)
