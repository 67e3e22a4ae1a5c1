"""Guides other than the VLM: a trained policy (with noise) and uniform random actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe
from covr_lightning.errors import ConfigError
from covr_lightning.guides import PolicyGuide, UniformGuide
from covr_lightning.loop.covr_loop import COVRLoop
from covr_lightning.policies.sac import SACPolicyModule
from tests.helpers import TINY

LOW, HIGH = -np.ones(2, np.float32), np.ones(2, np.float32)
FRAMES = np.zeros((5, 8, 8, 3), np.uint8)


def _policy() -> SACPolicyModule:
    torch.manual_seed(0)
    return SACPolicyModule(obs_shape=(9, 32, 32), action_dim=2, hidden_dim=16, num_filters=4)


def test_uniform_guide_covers_the_bounds_and_is_seeded():
    a, valid = UniformGuide(LOW, HIGH, seed=3).propose(np.zeros((2000, 4, 4, 3), np.uint8))
    assert a.shape == (2000, 2) and a.dtype == np.float32 and valid.all()
    assert a.min() >= -1 and a.max() <= 1 and abs(a.mean()) < 0.05 and a.std() > 0.5
    b, _ = UniformGuide(LOW, HIGH, seed=3).propose(np.zeros((2000, 4, 4, 3), np.uint8))
    np.testing.assert_array_equal(a, b)


def test_policy_guide_proposes_the_policy_action_and_noise_moves_it():
    policy = _policy()
    obs = np.random.default_rng(0).integers(0, 255, (5, 9, 32, 32), dtype=np.uint8)
    clean, valid = PolicyGuide(
        "ckpt", 0.0, policy=policy, action_low=LOW, action_high=HIGH
    ).propose(FRAMES, obs)
    assert valid.all()
    np.testing.assert_allclose(clean, policy.act(obs, deterministic=True), atol=1e-6)
    noisy, _ = PolicyGuide("c", 5.0, policy=policy, action_low=LOW, action_high=HIGH).propose(
        FRAMES, obs
    )
    assert np.abs(noisy - clean).mean() > 0.3 and np.all(np.abs(noisy) <= 1)


def test_policy_guide_needs_observations():
    guide = PolicyGuide("c", policy=_policy(), action_low=LOW, action_high=HIGH)
    with pytest.raises(ValueError, match="observations"):
        guide.propose(FRAMES)


def test_frames_and_observations_must_pair_up():
    with pytest.raises(ValueError, match="5 frames but 4 observations"):
        UniformGuide(LOW, HIGH).propose(FRAMES, np.zeros((4, 3)))


GUIDED = [
    *TINY,
    "run.total_env_steps=400",
    "covr.psi_0=200",
    "covr.cold_start_rounds=0",
    "covr.vlm_image_size=56",
    "covr.sft_min_steps=0",
    "covr.vlm_eval_episodes=0",
    "vlm.init_args.lora_rank=4",
    "tracking.enabled=false",
]


def test_a_recipe_picks_the_guide_and_its_priors_reach_replay(workdir):
    cfg = load_recipe(
        "quickstart",
        [*GUIDED, "guide.class_path=covr_lightning.guides.UniformGuide", "run.name=uniform"],
    )
    loop = build_loop(cfg)
    assert isinstance(loop, COVRLoop) and isinstance(loop.guide, UniformGuide)
    loop.fit()
    batch, present = loop.replay.transitions_at(np.arange(loop.replay.last_transition_id + 1))
    mask = batch["prior_mask"].numpy()[present] > 0
    priors = batch["prior"].numpy()[present][mask]
    assert priors.std() > 0.2  # uniform draws, not the codec's zeros
    # Guided from the first step, always valid, prior_scope "query": exactly the query steps
    # (0, 10, 20 of each 25-step episode) of the 50 transitions carry a prior.
    assert present.sum() == 50 and np.flatnonzero(mask).tolist() == [0, 10, 20, 25, 35, 45]


def test_policy_guide_loads_a_checkpoint_of_the_same_env(workdir):
    plain = load_recipe("quickstart", [*GUIDED, "covr.enabled=false", "run.name=teacher"])
    teacher = build_loop(plain)
    teacher.fit()
    checkpoint = str(teacher.run_dir)
    cfg = load_recipe(
        "quickstart",
        [
            *GUIDED,
            "guide.class_path=covr_lightning.guides.PolicyGuide",
            f"guide.init_args.checkpoint={checkpoint}",
            "run.name=student",
        ],
    )
    loop = build_loop(cfg)
    assert isinstance(loop.guide, PolicyGuide)
    obs = np.stack([loop.eval_env.reset(seed=0)[0]])
    proposed, _ = loop.guide.propose(np.zeros((1, 8, 8, 3), np.uint8), obs)
    np.testing.assert_allclose(proposed, teacher.module.act(obs, deterministic=True), atol=1e-5)


def test_a_guide_class_that_is_not_a_guide_is_a_config_error(workdir):
    with pytest.raises(ConfigError, match="guide"):
        build_loop(load_recipe("quickstart", [*GUIDED, "guide.class_path=collections.Counter"]))


def test_held_scope_gives_every_transition_the_last_answer(workdir):
    cfg = load_recipe(
        "quickstart",
        [
            *GUIDED,
            "guide.class_path=covr_lightning.guides.UniformGuide",
            "covr.prior_scope=held",
            "run.name=held",
        ],
    )
    loop = build_loop(cfg)
    loop.fit()
    batch, present = loop.replay.transitions_at(np.arange(loop.replay.last_transition_id + 1))
    mask = batch["prior_mask"].numpy()[present]
    priors = batch["prior"].numpy()[present]
    assert mask.all()
    np.testing.assert_array_equal(priors[1:10], np.repeat(priors[:1], 9, axis=0))  # held
    assert not np.array_equal(priors[9], priors[10])  # the next query's answer
