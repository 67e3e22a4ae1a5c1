"""Atomic checkpoint writes, the `last` pointer, corrupt files and RNG round-trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lightning import Fabric

from covr_lightning.errors import ConfigError
from covr_lightning.loop import checkpoint as ckpt


class _FakeReplay:
    """Only the save() seam of the replay buffer, which has its own tests."""

    def save(self, directory):
        directory.mkdir()
        (directory / "meta.json").write_text("{}")


@pytest.fixture
def fabric():
    return Fabric(accelerator="cpu", devices=1)


def test_save_points_last_at_newest_and_prunes(tmp_path, fabric):
    for step in (100, 200, 300):
        ckpt.save_checkpoint(
            fabric, tmp_path, step, {"x": torch.tensor(step)}, {"replay": _FakeReplay()}, keep=2
        )
    kept = sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).glob("env_step_*"))
    assert kept == ["env_step_000000200", "env_step_000000300"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "env_step_000000300"
    assert ckpt.read_state(latest, fix="")["x"].item() == 300


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, fabric):
    ckpt.save_checkpoint(fabric, tmp_path, 100, {"x": 1}, {"replay": _FakeReplay()})

    class _DyingReplay:
        def save(self, directory):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(fabric, tmp_path, 200, {"x": 2}, {"replay": _DyingReplay()})
    assert ckpt.latest_checkpoint(tmp_path).name == "env_step_000000100"
    assert ckpt.resolve_resume("last", tmp_path).name == "env_step_000000100"
    # the next save clears the half-written temporary directory
    ckpt.save_checkpoint(fabric, tmp_path, 300, {"x": 3}, {"replay": _FakeReplay()})
    assert not list(ckpt.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_corrupt_state_file_is_a_config_error(tmp_path, fabric):
    path = ckpt.save_checkpoint(fabric, tmp_path, 100, {"x": 1}, {"replay": _FakeReplay()})
    (path / ckpt.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt or unreadable.*Fix: resume from an older"):
        ckpt.read_state(path, fix="resume from an older checkpoint")


def test_resume_without_checkpoint_explains(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        ckpt.resolve_resume("last", tmp_path)
    with pytest.raises(ConfigError, match="not a checkpoint or run directory"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_rng_round_trip_through_a_weights_only_checkpoint(tmp_path, fabric):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_checkpoint(
        fabric, tmp_path, 1, {"rng": ckpt.capture_rng_state()}, {"replay": _FakeReplay()}
    )
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path), fix="")
    ckpt.restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
