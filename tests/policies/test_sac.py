"""SACPolicyModule: gradient routing, update schedule, Fabric/Trainer paths, targets, state, acting."""

from __future__ import annotations

import io

import lightning
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from covr_lightning.errors import ConfigError
from covr_lightning.policies import SACPolicyModule, VLMPrior

OBS_SHAPE = (9, 64, 64)
ACTION_DIM = 3
B = 8


def make_module(**kw) -> SACPolicyModule:
    torch.manual_seed(0)
    return SACPolicyModule(
        OBS_SHAPE, ACTION_DIM, feature_dim=16, num_filters=8, hidden_dim=32, **kw
    )


def make_batch(batch_size: int = B, seed: int = 0, prior: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "obs": torch.randint(0, 256, (batch_size, *OBS_SHAPE), dtype=torch.uint8, generator=g),
        "next_obs": torch.randint(0, 256, (batch_size, *OBS_SHAPE), dtype=torch.uint8, generator=g),
        "action": torch.rand(batch_size, ACTION_DIM, generator=g) * 2 - 1,
        "reward": torch.rand(batch_size, generator=g),
        "terminated": (torch.rand(batch_size, generator=g) < 0.2).float(),
    }
    if prior:
        batch["prior"] = torch.rand(batch_size, ACTION_DIM, generator=g) * 2 - 1
        batch["prior_mask"] = torch.arange(batch_size) % 2 == 0
    return batch


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_q_filter_applies_the_prior_only_where_the_critic_prefers_it():
    m = make_module()
    batch = make_batch(batch_size=64, prior=True)
    with torch.no_grad():
        features = m.encoder(batch["obs"])
        _, _, mean_action = m.actor(features)
        q_v = torch.min(*m.critic(features, batch["prior"]))
        q_r = torch.min(*m.critic(features, mean_action))
    valid = batch["prior_mask"]
    preferred = valid & (q_v > q_r)
    assert 0 < preferred.sum() < valid.sum()  # the test needs both kinds of rows
    torch.manual_seed(1)
    _, unfiltered = m.actor_loss(batch, VLMPrior(batch["prior"], valid, 1.0, "none"))
    torch.manual_seed(1)
    _, filtered = m.actor_loss(batch, VLMPrior(batch["prior"], valid, 1.0, "q"))
    expected = (batch["prior"][preferred] - mean_action[preferred]).pow(2).sum(-1).mean()
    torch.testing.assert_close(filtered["prior_penalty"], expected)
    share = preferred.sum() / valid.sum()
    for metrics in (unfiltered, filtered):
        torch.testing.assert_close(metrics["critic_prefers_prior"], share.float())
    assert unfiltered["prior_accepted_frac"] == 1.0
    torch.testing.assert_close(filtered["prior_accepted_frac"], share.float())
    assert filtered["prior_penalty"] != unfiltered["prior_penalty"]


# ---------------------------------------------------------------- gradient isolation
def test_critic_loss_gives_grad_to_encoder_and_critic_only():
    m = make_module()
    loss, metrics = m.critic_loss(make_batch())
    loss.backward()
    assert all(g is not None for g in grads(m.encoder))
    assert all(g is not None for g in grads(m.critic))
    assert all(g is None for g in grads(m.actor))  # a' is sampled under no_grad
    assert m.log_alpha.grad is None  # alpha is a constant in the target
    assert all(not p.requires_grad for p in m.target_encoder.parameters())
    assert all(not p.requires_grad for p in m.target_critic.parameters())
    assert set(metrics) == {"critic_loss", "q1_mean", "q2_mean", "target_q_mean"}
    assert all(not v.requires_grad for v in metrics.values())


def test_actor_loss_gives_grad_to_actor_only():
    m = make_module()
    m.prior_weight = 1.0
    batch = make_batch(prior=True)
    prior = VLMPrior(batch["prior"], batch["prior_mask"], 1.0)
    loss, metrics = m.actor_loss(batch, prior)
    loss.backward()
    assert all(g is not None for g in grads(m.actor))
    assert all(g is None for g in grads(m.encoder))  # detached features
    assert all(g is None for g in grads(m.critic))  # critic frozen while scoring
    assert m.log_alpha.grad is None  # alpha detached
    assert all(p.requires_grad for p in m.critic.parameters())  # freeze was undone
    assert {"actor_loss", "log_pi", "entropy", "prior_penalty", "prior_valid_frac"} <= set(metrics)
    assert metrics["entropy"] == -metrics["log_pi"]
    assert metrics["prior_valid_frac"].item() == pytest.approx(0.5)


def test_actor_loss_prior_term_adds_lambda_times_penalty_on_mean_action():
    m = make_module()
    batch = make_batch(prior=True)
    torch.manual_seed(1)
    plain, _ = m.actor_loss(batch)
    torch.manual_seed(1)
    with_prior, metrics = m.actor_loss(batch, VLMPrior(batch["prior"], batch["prior_mask"], 2.0))
    torch.testing.assert_close(with_prior, plain + 2.0 * metrics["prior_penalty"])
    with torch.no_grad():
        _, _, mean_action = m.actor(m.encoder(batch["obs"]))
    valid = batch["prior_mask"]
    expected = (batch["prior"][valid] - mean_action[valid]).pow(2).sum(-1).mean()
    torch.testing.assert_close(metrics["prior_penalty"], expected)


def test_temperature_loss_gives_grad_to_log_alpha_only():
    m = make_module()
    loss, metrics = m.temperature_loss(torch.tensor(1.0))
    loss.backward()
    assert m.log_alpha.grad is not None
    assert all(p.grad is None for name, p in m.named_parameters() if name != "log_alpha")
    assert metrics["alpha"].item() == pytest.approx(0.1)
    assert m.target_entropy == -ACTION_DIM


# ---------------------------------------------------------------- Fabric path
def test_training_step_under_fabric_updates_on_schedule():
    m = make_module()
    fabric = lightning.Fabric(accelerator="cpu", devices=1)
    module, *opts = fabric.setup(m, *m.configure_optimizers())
    assert len(opts) == 3
    calls = []
    real_backward = fabric.backward

    def counting_backward(loss, *args, **kwargs):
        calls.append(loss.detach())
        return real_backward(loss, *args, **kwargs)

    fabric.backward = counting_backward  # manual_backward must route through Fabric

    before = {n: snapshot(getattr(m, n)) for n in ("encoder", "critic", "actor")}
    alpha_before = m.log_alpha.detach().clone()
    out = module.training_step(make_batch(seed=1))  # update_step 0: even -> actor and alpha too
    assert m.update_step == 1
    assert len(calls) == 3  # critic, actor, temperature
    assert changed(m.encoder, before["encoder"]) and changed(m.critic, before["critic"])
    assert changed(m.actor, before["actor"])
    assert not torch.equal(m.log_alpha.detach(), alpha_before)
    assert {"critic_loss", "actor_loss", "temperature_loss", "alpha", "entropy", "q1_mean"} <= set(
        out
    )
    assert all(type(v) is float for v in out.values())
    assert m.policy_entropy == pytest.approx(out["entropy"])
    # the Fabric-wrapped optimizers did the stepping, no private copies were made
    assert m.standalone_optimizers is None
    assert all(len(o.state) > 0 for o in opts)

    before = {n: snapshot(getattr(m, n)) for n in ("critic", "actor")}
    alpha_before = m.log_alpha.detach().clone()
    out = module.training_step(make_batch(seed=2))  # update_step 1: odd -> critic only
    assert len(calls) == 4
    assert changed(m.critic, before["critic"])
    assert not changed(m.actor, before["actor"])
    assert torch.equal(m.log_alpha.detach(), alpha_before)
    assert "actor_loss" not in out and "temperature_loss" not in out


def test_fabric_setup_without_optimizers_is_a_clear_error():
    m = make_module()
    fabric = lightning.Fabric(accelerator="cpu", devices=1)
    module = fabric.setup(m)
    with pytest.raises(RuntimeError, match="expects 3 optimizers"):
        module.training_step(make_batch())


# ---------------------------------------------------------------- standalone and Trainer paths
def test_standalone_training_step_keeps_its_own_optimizers():
    m = make_module()
    m.training_step(make_batch())
    opts = m.standalone_optimizers
    assert opts is not None and len(opts) == 3
    m.training_step(make_batch(seed=1))
    assert m.standalone_optimizers is opts
    assert m.update_step == 2


class _Batches(IterableDataset):
    def __iter__(self):
        seed = 0
        while True:
            seed += 1
            yield make_batch(seed=seed)


def test_training_step_under_trainer():
    m = make_module()
    before = snapshot(m.critic)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,  # manual optimisation counts optimizer steps: 3 + 1 = two updates
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, train_dataloaders=DataLoader(_Batches(), batch_size=None))
    assert m.update_step >= 1
    assert changed(m.critic, before)
    assert m.standalone_optimizers is None


# ---------------------------------------------------------------- augmentation, prior, targets
class _CountingAugment(SACPolicyModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment_inputs = []

    def augment(self, obs):
        self.augment_inputs.append(obs.clone())
        return obs


def test_augment_runs_once_per_step_on_obs_and_next_obs_stacked_on_channels():
    torch.manual_seed(0)
    m = _CountingAugment(OBS_SHAPE, ACTION_DIM, feature_dim=16, num_filters=8, hidden_dim=32)
    batch = make_batch()
    m.training_step(batch)  # actor step: still one call, the batch is reused
    assert len(m.augment_inputs) == 1
    seen = m.augment_inputs[0]
    assert seen.shape == (B, 2 * OBS_SHAPE[0], *OBS_SHAPE[1:])
    assert torch.equal(seen, torch.cat([batch["obs"], batch["next_obs"]], dim=1))
    m.training_step(batch)
    assert len(m.augment_inputs) == 2
    assert batch["obs"].dtype == torch.uint8 and set(batch) == set(make_batch())  # not mutated


class _HalfSize(SACPolicyModule):
    """Networks see every other pixel: the observation_transform seam resizes what they get."""

    def augment(self, obs):
        return obs[..., ::2, ::2]

    def observation_transform(self, obs):
        return obs[..., ::2, ::2]


def test_networks_are_built_for_the_observation_transform_and_act_applies_it():
    torch.manual_seed(0)
    m = _HalfSize(OBS_SHAPE, ACTION_DIM, feature_dim=16, num_filters=8, hidden_dim=32)
    assert m.obs_shape == OBS_SHAPE
    assert m.network_obs_shape == (OBS_SHAPE[0], OBS_SHAPE[1] // 2, OBS_SHAPE[2] // 2)
    assert m.encoder.obs_shape == m.network_obs_shape
    batch = make_batch()
    assert np.isfinite(list(m.training_step(batch).values())).all()
    assert m.act(batch["obs"][0].numpy()).shape == (ACTION_DIM,)  # raw env size in
    assert m.q_value(batch["obs"], batch["action"]).shape == (B,)
    assert make_module().network_obs_shape == OBS_SHAPE  # identity for plain SAC


class _WrongAugment(SACPolicyModule):
    def augment(self, obs):
        return obs[..., 1:, 1:]


def test_augment_that_changes_the_size_alone_is_a_clear_error():
    m = _WrongAugment(OBS_SHAPE, ACTION_DIM, feature_dim=16, num_filters=8, hidden_dim=32)
    with pytest.raises(ValueError, match="observation_transform") as err:
        m.training_step(make_batch())
    assert not isinstance(err.value, ConfigError)  # a bug in code keeps its traceback


def test_prior_is_used_only_when_weighted_and_present():
    m = make_module()
    out = m.training_step(make_batch(prior=True))
    assert "prior_penalty" not in out  # prior_weight is 0
    m.prior_weight = 1.0
    m.update_step = 0
    out = m.training_step(make_batch())
    assert "prior_penalty" not in out  # no prior keys in the batch
    m.update_step = 0
    out = m.training_step(make_batch(prior=True))
    assert out["prior_penalty"] >= 0.0 and out["prior_valid_frac"] == pytest.approx(0.5)


def test_target_ema_moves_by_exactly_tau_on_target_steps():
    m = make_module(encoder_tau=0.05, critic_tau=0.01)
    m.training_step(make_batch())  # builds optimizers; update_step 0 also updates targets
    m.training_step(make_batch(seed=1))  # update_step 1: no target update
    old_enc, old_critic = snapshot(m.target_encoder), snapshot(m.target_critic)
    m.training_step(make_batch(seed=2))  # update_step 2: targets move
    for tau, target, online, old in (
        (0.05, m.target_encoder, m.encoder, old_enc),
        (0.01, m.target_critic, m.critic, old_critic),
    ):
        moved = 0.0
        for t, s, o in zip(target.parameters(), online.parameters(), old, strict=True):
            # theta-bar_new = tau theta_new + (1 - tau) theta-bar_old, up to float32 rounding
            expected = tau * s.double() + (1 - tau) * o.double()
            torch.testing.assert_close(t.double(), expected, rtol=0, atol=3e-7)
            moved = max(moved, (tau * (s - o)).abs().max().item())
        assert moved > 1e-6  # the step is far above the tolerance, so a wrong tau would fail
    frozen_enc, frozen_critic = snapshot(m.target_encoder), snapshot(m.target_critic)
    m.training_step(make_batch(seed=3))  # update_step 3: targets stay
    assert not changed(m.target_encoder, frozen_enc)
    assert not changed(m.target_critic, frozen_critic)


def test_targets_start_as_copies_of_online_networks():
    m = make_module()
    for t, s in zip(m.target_encoder.parameters(), m.encoder.parameters(), strict=True):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()
    for t, s in zip(m.target_critic.parameters(), m.critic.parameters(), strict=True):
        assert torch.equal(t, s)


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_keeps_update_step_and_entropy():
    m = make_module()
    for seed in range(3):
        m.training_step(make_batch(seed=seed))
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # extra state is plain ints/floats
    fresh = SACPolicyModule(OBS_SHAPE, ACTION_DIM, feature_dim=16, num_filters=8, hidden_dim=32)
    assert fresh.update_step == 0
    fresh.load_state_dict(state, strict=True)
    assert fresh.update_step == 3
    assert fresh.policy_entropy == pytest.approx(m.policy_entropy)
    for (name, a), b in zip(m.state_dict().items(), fresh.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    obs = make_batch()["obs"][0].numpy()
    np.testing.assert_array_equal(
        m.act(obs, deterministic=True), fresh.act(obs, deterministic=True)
    )


def test_policy_entropy_is_nan_before_the_first_actor_update():
    assert np.isnan(make_module().policy_entropy)


# ---------------------------------------------------------------- acting
def test_act_shapes_bounds_and_determinism():
    m = make_module()
    obs = make_batch()["obs"]
    single = m.act(obs[0].numpy())
    assert single.shape == (ACTION_DIM,) and single.dtype == np.float32
    batch = m.act(obs)
    assert batch.shape == (B, ACTION_DIM)
    assert np.abs(batch).max() <= 1.0 and np.abs(single).max() <= 1.0
    a1 = m.act(obs[0].numpy(), deterministic=True)
    a2 = m.act(obs[0], deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    m.eval()
    np.testing.assert_array_equal(m.act(obs[0].numpy(), deterministic=True), a1)
    torch.manual_seed(0)
    s1 = m.act(obs[0].numpy())
    s2 = m.act(obs[0].numpy())
    assert not np.array_equal(s1, s2)  # stochastic by default


def test_act_handles_non_contiguous_numpy_and_rejects_wrong_shapes():
    m = make_module()
    obs = np.ascontiguousarray(make_batch()["obs"][0].numpy()[::-1])[::-1]  # negative strides
    assert m.act(obs).shape == (ACTION_DIM,)
    with pytest.raises(ValueError, match="expected") as err:
        m.act(np.zeros((3, 64, 64), dtype=np.uint8))
    assert not isinstance(err.value, ConfigError)


def test_state_observations_work_end_to_end():
    torch.manual_seed(0)
    m = SACPolicyModule((5,), 2, feature_dim=8, hidden_dim=16)
    batch = {
        "obs": torch.randn(B, 5),
        "next_obs": torch.randn(B, 5),
        "action": torch.rand(B, 2) * 2 - 1,
        "reward": torch.randn(B),
        "terminated": torch.zeros(B),
    }
    out = m.training_step(batch)
    assert np.isfinite(list(out.values())).all()
    assert m.act(np.zeros(5)).shape == (2,)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("critic_tau=0.0", "'policy.critic_tau' is 0.0, but it must be a number in (0, 1]"),
        ("encoder_tau=1.5", "'policy.encoder_tau' is 1.5, but it must be a number in (0, 1]"),
        ("actor_update_every=0", "'policy.actor_update_every' is 0, but it must be an integer > 0"),
        ("target_update_every=1.5", "'policy.target_update_every' expects an integer > 0"),
        ("init_temperature=0.0", "'policy.init_temperature' is 0.0, but it must be a number > 0"),
        ("gamma=1.1", "'policy.gamma' is 1.1, but it must be a number in [0, 1]"),
    ],
)
def test_bad_hyperparameters_are_refused_by_the_typed_signature(override, message):
    from covr_lightning.config import load_recipe

    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", [f"policy.{override}"])
    assert message in err.value.line()


def test_prior_term_pulls_the_mean_action_towards_a_v_on_valid_rows_only():
    m = make_module(actor_lr=1e-2)
    batch = make_batch(prior=True)
    target = torch.full((B, ACTION_DIM), 0.7)
    target[1::2] = -0.7  # invalid rows point the other way: they must not matter
    prior = VLMPrior(target, batch["prior_mask"], 50.0)
    optimizer = torch.optim.Adam(m.actor.parameters(), lr=1e-2)

    def mean_action():
        with torch.no_grad():
            return m.actor(m.encoder(batch["obs"]), deterministic=True)[0]

    before = mean_action()
    for _ in range(30):
        optimizer.zero_grad()
        loss, _ = m.actor_loss(batch, prior)
        loss.backward()
        optimizer.step()
    after = mean_action()
    valid = batch["prior_mask"]
    distance = lambda a: (a[valid] - 0.7).abs().mean()  # noqa: E731
    assert distance(after) < 0.5 * distance(before)
    # With 50x weight the valid rows dominate; every valid row moved up, towards +0.7.
    assert (after[valid] > before[valid]).float().mean() > 0.9
