"""replay.frames_on_device: batches gathered from the device copy equal the host's, always.

On the CPU the "device" copy is a second torch tensor, which is enough to check the bookkeeping
(every write mirrored, the copy refreshed after a load, stacks gathered by the same slots); the
GPU test checks where the batch ends up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.data.test_replay import A, C, H, W
from tests.data.test_replay_streams import STACK, STREAMS, play_interleaved
from tests.helpers import TINY

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe
from covr_lightning.data import ReplayDataModule
from covr_lightning.data.replay_device import DeviceFrames
from covr_lightning.errors import ConfigError


def make(on_device: bool, device: str | None = "cpu", seed: int = 0) -> ReplayDataModule:
    dm = ReplayDataModule(capacity=31, batch_size=8, seed=seed, frames_on_device=on_device)
    dm.declare_extra("tid", (), np.int64, -1)
    dm.allocate((C, H, W), np.uint8, STACK, (A,), num_streams=STREAMS, device=device)
    return dm


def assert_same_batches(first: ReplayDataModule, *others: ReplayDataModule, draws: int = 5):
    """Each buffer draws ``draws`` batches (same sampler state); all must be equal."""
    for _ in range(draws):
        x = first.sample()
        for other in others:
            y = other.sample()
            assert x.keys() == y.keys()
            for name in x:
                assert torch.equal(x[name].cpu(), y[name].cpu()), name


def test_batches_from_the_device_copy_equal_the_host_ones_across_wraparound():
    host, mirrored = make(False), make(True)
    assert host._ring.mirror is None and mirrored._ring.mirror is not None
    for dm in (host, mirrored):
        play_interleaved(dm, steps=40)  # 120 transitions into 31 slots: wrapped several times
    np.testing.assert_array_equal(mirrored._ring.mirror.tensor.numpy(), mirrored._ring.frames)
    assert_same_batches(host, mirrored)


def test_the_copy_is_refreshed_when_a_checkpoint_is_loaded(tmp_path):
    source = make(True)
    play_interleaved(source, steps=25)
    source.save(tmp_path / "replay")
    host, mirrored = make(False), make(True)
    play_interleaved(mirrored, steps=7, seed=1)  # stale frames that the load must replace
    for dm in (host, mirrored):
        dm.load(tmp_path / "replay")
    np.testing.assert_array_equal(mirrored._ring.mirror.tensor.numpy(), mirrored._ring.frames)
    assert_same_batches(source, host, mirrored)


def test_no_copy_without_a_device_to_put_it_on():
    assert make(True, device=None)._ring.mirror is None


def test_frames_that_do_not_fit_on_the_gpu_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    frames = np.zeros((20_000, 9, 100, 100), np.uint8)  # 1.7 GiB against 1 GiB free
    with pytest.raises(ConfigError, match="frames take 1.7 GiB, cuda has 1.0 GiB free") as error:
        DeviceFrames(frames, "cuda")
    assert "replay.frames_on_device=false" in error.value.fix


def test_a_cpu_run_trains_identically_with_the_copy(workdir):
    finals = []
    for on_device in (False, True):
        cfg = load_recipe(
            "quickstart",
            [
                *TINY,
                "covr.enabled=false",
                "tracking.enabled=false",
                "run.total_env_steps=400",
                f"replay.frames_on_device={str(on_device).lower()}",
                f"run.name=device-{on_device}",
            ],
        )
        loop = build_loop(cfg)
        assert (loop.replay._ring.mirror is not None) is on_device
        loop.fit()
        finals.append(loop.module.state_dict())
    for name, value in finals[0].items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.equal(value, finals[1][name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_observations_arrive_there():
    host, mirrored = make(False), make(True, device="cuda")
    for dm in (host, mirrored):
        play_interleaved(dm, steps=30)
    batch = mirrored.sample()
    assert batch["obs"].device.type == "cuda" and batch["next_obs"].device.type == "cuda"
    assert batch["action"].device.type == "cpu"  # the small fields still come from the host
    assert_same_batches(host, mirrored)
