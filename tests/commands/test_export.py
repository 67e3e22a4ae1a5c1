"""`covr-lightning export`: TorchScript policy = the module's deterministic actions, torch only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.commands.test_evaluate import enter, train_tiny_run

from covr_lightning.build import build_env, build_trained_policy, load_saved_run
from covr_lightning.cli import main
from covr_lightning.commands.export import trace_policy
from covr_lightning.policies.rad import RADModule


@pytest.fixture
def plain_run(tmp_path_factory, monkeypatch) -> Path:
    return enter(train_tiny_run(tmp_path_factory.getbasetemp()), monkeypatch)


def _real_observations(run_dir: Path, count: int = 6) -> np.ndarray:
    """A batch of observations exactly as the run's env returns them (uint8, B x C x H x W)."""
    env = build_env(load_saved_run(run_dir).cfg, seed=11)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=11)
    batch = [obs]
    while len(batch) < count:
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        batch.append(obs)
    env.close()
    return np.stack(batch)


def _module_actions(run_dir: Path, obs: np.ndarray) -> np.ndarray:
    saved = load_saved_run(run_dir)
    env = build_env(saved.cfg, seed=0)
    policy = build_trained_policy(saved, env)
    env.close()
    return policy.act(obs, deterministic=True)


def test_exported_policy_matches_the_module_and_writes_its_spec(plain_run, tmp_path, capsys):
    out = tmp_path / "deploy" / "policy.pt"
    assert main(["export", "--checkpoint", str(plain_run), "--out", str(out)]) == 0
    assert "MB" in capsys.readouterr().out

    obs = _real_observations(plain_run)
    assert obs.dtype == np.uint8 and obs.shape == (6, 9, 32, 32)
    exported = torch.jit.load(str(out))
    with torch.no_grad():
        got = exported(torch.from_numpy(obs)).numpy()
        single = exported(torch.from_numpy(obs[:1])).numpy()
    expected = _module_actions(plain_run, obs)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(single, expected[:1], atol=1e-5, rtol=0)
    assert np.all(np.abs(got) <= 1.0)

    spec = json.loads(out.with_suffix(".json").read_text())
    assert spec["observation"]["shape"] == [9, 32, 32]
    assert spec["observation"]["dtype"] == "uint8"
    assert spec["observation"]["frame_stack"] == 3
    assert spec["action"] == {**spec["action"], "dim": 1, "low": -1.0, "high": 1.0}
    assert spec["env"]["action_repeat"] == 8
    assert spec["env"]["class_path"] == "covr_lightning.envs.dmc.DMCEnv"
    assert spec["env"]["init_args"]["domain"] == "cartpole"
    assert spec["env_steps"] == 400
    assert spec["source_checkpoint"].endswith("env_step_000000400")
    assert spec["size_bytes"] == out.stat().st_size


def test_exported_policy_loads_with_torch_alone(plain_run, tmp_path):
    out = tmp_path / "policy.pt"
    assert main(["export", "--checkpoint", str(plain_run), "--out", str(out)]) == 0
    obs = _real_observations(plain_run)
    torch.save(
        {
            "obs": torch.from_numpy(obs),
            "actions": torch.from_numpy(_module_actions(plain_run, obs)),
        },
        tmp_path / "io.pt",
    )
    script = textwrap.dedent(
        """
        import sys


        class NoCovr:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "covr_lightning":
                    raise ImportError("covr_lightning must not be needed")


        sys.meta_path.insert(0, NoCovr())
        import json

        import torch

        policy = torch.jit.load("policy.pt", map_location="cpu")
        spec = json.load(open("policy.json"))
        io = torch.load("io.pt")
        assert tuple(io["obs"].shape[1:]) == tuple(spec["observation"]["shape"])
        with torch.no_grad():
            actions = policy(io["obs"])
        torch.testing.assert_close(actions, io["actions"], atol=1e-5, rtol=0)
        assert not any(m.startswith("covr_lightning") for m in sys.modules)
        print("ok", tuple(actions.shape))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ok (6, 1)" in done.stdout


@pytest.mark.parametrize(
    "augmentation, size", [("crop", {"crop_size": 32}), ("translate", {"translate_size": 44})]
)
def test_trace_keeps_rad_observation_transform(augmentation, size):
    torch.manual_seed(0)
    policy = RADModule(
        (9, 40, 40),
        2,
        augmentation=augmentation,
        **size,
        num_conv_layers=2,
        num_filters=8,
        hidden_dim=32,
    ).eval()
    obs = torch.randint(0, 256, (3, 9, 40, 40), dtype=torch.uint8)
    traced = trace_policy(policy, obs[:2])
    with torch.no_grad():
        got = traced(obs).numpy()
    np.testing.assert_allclose(got, policy.act(obs, deterministic=True), atol=1e-5, rtol=0)


def test_export_of_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "p.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covr-lightning: error: ") and err.count("\n") == 1
