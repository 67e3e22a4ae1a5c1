"""The builder: call-site arguments passed in one place, the loop chosen by covr.enabled, the
env protocol and the policy class checked, and the same seed building the same objects."""

from __future__ import annotations

import pytest
import torch

from covr_lightning.build import (
    build_covr_parts,
    build_env,
    build_loop,
    build_policy,
    build_rl_parts,
    env_class,
)
from covr_lightning.config import load_recipe, run_directory
from covr_lightning.errors import ConfigError
from covr_lightning.loop.episodes import EVAL_SEED_OFFSET
from tests.helpers import TINY

VLM_TINY = ["vlm.init_args.lora_rank=4", "vlm.init_args.lora_alpha=8"]


def _cfg(*overrides: str):
    return load_recipe("quickstart", [*TINY, "tracking.enabled=false", *overrides])


def test_policy_is_sized_from_the_env():
    cfg = _cfg()
    env = build_env(cfg, seed=0)
    policy = build_policy(cfg, env)
    assert policy.obs_shape == tuple(env.observation_space.shape)
    assert policy.action_dim == env.action_space.shape[0]
    env.close()


def test_same_seed_builds_the_same_networks_and_another_seed_does_not():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        parts = build_rl_parts(_cfg(f"run.seed={seed}"))
        parts.envs.close()
        parts.eval_env.close()
        return parts.policy.state_dict()

    first, again, other = weights(3), weights(3), weights(4)
    name = next(
        k
        for k, v in first.items()
        if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1
    )
    assert torch.equal(first[name], again[name])
    assert not torch.equal(first[name], other[name])


def test_eval_env_is_seeded_from_the_evaluation_seed(monkeypatch):
    seen = []
    cls = env_class(_cfg())
    original = cls.__init__

    def spy(self, *args, seed=None, **kwargs):
        seen.append(seed)
        original(self, *args, seed=seed, **kwargs)

    monkeypatch.setattr(cls, "__init__", spy)
    parts = build_rl_parts(_cfg("run.seed=5"))
    parts.envs.close()
    assert seen[0] == 5 + EVAL_SEED_OFFSET and seen[1] == 5  # eval env, then training env 0


def test_sft_gamma_and_vlm_device_default_to_the_policy_side():
    cfg = _cfg(*VLM_TINY)
    env = build_env(cfg, seed=0)
    policy = build_policy(cfg, env)
    parts = build_covr_parts(cfg, env, policy, device="cpu")
    assert parts.sft.gamma == pytest.approx(policy.gamma)
    assert str(next(parts.vlm.model.parameters()).device) == "cpu"
    explicit = build_covr_parts(_cfg(*VLM_TINY, "sft.init_args.gamma=0.5"), env, policy, "cpu")
    assert explicit.sft.gamma == 0.5
    env.close()


def test_env_that_is_not_a_pixel_env_is_refused():
    cfg = _cfg()
    cfg.env.class_path = "gymnasium.envs.classic_control.CartPoleEnv"
    with pytest.raises(ConfigError, match="PixelEnv"):
        env_class(cfg)


def test_more_envs_than_the_env_class_allows_are_refused(monkeypatch):
    cfg = _cfg("run.num_envs=3")
    monkeypatch.setattr(env_class(_cfg()), "max_num_envs", 2)
    with pytest.raises(ConfigError, match=r"run.num_envs=3.*1 to 2"):
        env_class(cfg)


def test_fresh_run_over_checkpoints_is_refused(workdir):
    cfg = _cfg("covr.enabled=false", "run.total_env_steps=200")
    build_loop(cfg).fit()
    assert (run_directory(cfg) / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="already holds a run"):
        build_loop(cfg)
