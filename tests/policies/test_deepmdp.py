"""DeepMDPModule: auxiliary losses learn, reach the encoder, ride the critic optimizer, checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

from covr_lightning.errors import ConfigError
from covr_lightning.policies.deepmdp import DeepMDPModule, reward_loss, transition_loss
from covr_lightning.policies.sac import SACPolicyModule

OBS_SHAPE = (9, 32, 32)
ACTION_DIM = 2
B = 16
AUX = ("deepmdp_transition_loss", "deepmdp_reward_loss")


def make_module(**kw) -> DeepMDPModule:
    torch.manual_seed(0)
    return DeepMDPModule(
        OBS_SHAPE,
        ACTION_DIM,
        feature_dim=16,
        num_conv_layers=2,
        num_filters=8,
        hidden_dim=32,
        model_hidden_dim=32,
        **kw,
    )


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randint(0, 256, (B, *OBS_SHAPE), dtype=torch.uint8, generator=g),
        "next_obs": torch.randint(0, 256, (B, *OBS_SHAPE), dtype=torch.uint8, generator=g),
        "action": torch.rand(B, ACTION_DIM, generator=g) * 2 - 1,
        "reward": torch.rand(B, generator=g) * 2,
        "terminated": torch.zeros(B),
    }


def test_loss_functions_are_mean_squared_errors():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert transition_loss(pred, target).item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    assert reward_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == 5.0


def test_auxiliary_losses_fall_on_a_fixed_batch():
    m = make_module()
    batch = make_batch()
    history = [m.training_step(batch) for _ in range(50)]
    for key in AUX:
        first, last = history[0][key], history[-1][key]
        assert last < 0.5 * first, (key, first, last)
    assert all(set(AUX) <= set(h) for h in history)  # logged on every update


def test_auxiliary_gradients_reach_the_encoder_and_models_only(monkeypatch):
    m = make_module()
    # Silence SAC's Bellman part: what is left of the critic loss is the auxiliary terms.
    monkeypatch.setattr(
        SACPolicyModule, "bellman_loss", lambda self, batch, features: (torch.zeros(()), {})
    )
    loss, metrics = m.critic_loss(make_batch())
    loss.backward()
    for net in (m.encoder, m.transition_model, m.reward_model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in m.critic.parameters())
    assert all(p.grad is None for p in m.actor.parameters())
    assert all(not p.requires_grad for p in m.target_encoder.parameters())  # z-bar' is detached
    assert set(metrics) == set(AUX)


def test_coefficients_weight_the_auxiliary_terms(monkeypatch):
    monkeypatch.setattr(
        SACPolicyModule, "bellman_loss", lambda self, batch, features: (torch.zeros(()), {})
    )
    m = make_module(transition_coef=0.5, reward_coef=3.0)
    loss, metrics = m.critic_loss(make_batch())
    expected = 0.5 * metrics[AUX[0]] + 3.0 * metrics[AUX[1]]
    torch.testing.assert_close(loss.detach(), expected)


def test_latent_models_are_stepped_by_the_critic_optimizer():
    m = make_module()
    actor_opt, critic_opt, temperature_opt = m.configure_optimizers()
    in_critic = {id(p) for group in critic_opt.param_groups for p in group["params"]}
    for net in (m.encoder, m.critic, m.transition_model, m.reward_model):
        assert all(id(p) in in_critic for p in net.parameters())
    assert critic_opt.param_groups[1]["lr"] == critic_opt.param_groups[0]["lr"]
    in_actor = {id(p) for group in actor_opt.param_groups for p in group["params"]}
    assert not any(id(p) in in_actor for p in m.transition_model.parameters())
    before = [p.detach().clone() for p in m.transition_model.parameters()]
    m.training_step(make_batch())
    assert any(
        not torch.equal(p, b) for p, b in zip(m.transition_model.parameters(), before, strict=True)
    )


def test_state_dict_round_trip_restores_the_latent_models():
    m = make_module()
    for seed in range(3):
        m.training_step(make_batch(seed))
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a differently initialised fresh module
    fresh = DeepMDPModule(
        OBS_SHAPE,
        ACTION_DIM,
        feature_dim=16,
        num_conv_layers=2,
        num_filters=8,
        hidden_dim=32,
        model_hidden_dim=32,
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(fresh.reward_model.parameters(), m.reward_model.parameters(), strict=True)
    )
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert any(k.startswith("transition_model.") for k in fresh.state_dict())
    for name in ("transition_model", "reward_model"):
        for a, b in zip(
            getattr(m, name).state_dict().values(),
            getattr(fresh, name).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), name
    assert fresh.update_step == 3
    batch = make_batch(9)
    torch.manual_seed(0)
    ours = m.critic_loss(batch)[1]
    torch.manual_seed(0)
    theirs = fresh.critic_loss(batch)[1]
    for key in AUX:
        assert ours[key] == theirs[key]


@pytest.mark.parametrize(
    "kwargs", [{"transition_coef": -1.0}, {"reward_coef": -0.1}, {"model_hidden_dim": 0}]
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        DeepMDPModule(OBS_SHAPE, ACTION_DIM, hidden_dim=8, num_filters=4, **kwargs)


def test_one_encoding_gives_the_loss_and_gradient_of_separate_passes():
    """Sharing the critic's encodings changes cost, not maths: same loss, same encoder gradient."""
    torch.manual_seed(0)
    # float32: exact algebra (bf16 rounds the two ways of summing the gradient differently)
    shared = make_module(encoder_precision="fp32")
    separate = make_module(encoder_precision="fp32")
    separate.load_state_dict(shared.state_dict())
    batch = make_batch()
    torch.manual_seed(1)  # the same a' ~ pi(.|s') in both
    loss, _ = shared.critic_loss(batch)
    loss.backward()

    torch.manual_seed(1)
    bellman, _ = SACPolicyModule.critic_loss(separate, batch)  # encodes s and s' itself
    z = separate.encoder(batch["obs"])  # and once more for the auxiliary terms
    with torch.no_grad():
        z_next = separate.target_encoder(batch["next_obs"])
    za = torch.cat([z, batch["action"]], dim=-1)
    aux = transition_loss(separate.transition_model(za), z_next) + reward_loss(
        separate.reward_model(za).squeeze(-1), batch["reward"]
    )
    (bellman + aux).backward()
    torch.testing.assert_close(loss.detach(), (bellman + aux).detach())
    for a, b in zip(shared.encoder.parameters(), separate.encoder.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
