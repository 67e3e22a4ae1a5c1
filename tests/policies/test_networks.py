"""Encoder, actor and critic shapes and ranges."""

from __future__ import annotations

import pytest
import torch

from covr_lightning.errors import ConfigError
from covr_lightning.policies.losses import squashed_gaussian_log_prob
from covr_lightning.policies.networks import (
    Actor,
    PixelEncoder,
    StateEncoder,
    TwinCritic,
    make_encoder,
    weight_init,
)


@pytest.mark.parametrize(("size", "conv_side"), [(84, 35), (64, 25), (100, 43)])
def test_pixel_encoder_shapes(size, conv_side):
    enc = PixelEncoder((9, size, size), feature_dim=50, num_layers=4, num_filters=8)
    # conv size found by a dummy forward: 84 -> 41 -> 39 -> 37 -> 35 (RAD's 35x35)
    assert enc.fc.in_features == 8 * conv_side * conv_side
    obs = torch.randint(0, 256, (2, 9, size, size), dtype=torch.uint8)
    out = enc(obs)
    assert out.shape == (2, 50)
    assert out.dtype == torch.float32
    assert out.abs().max() < 1.0  # tanh


def test_pixel_encoder_scales_uint8_inside_forward():
    torch.manual_seed(0)
    enc = PixelEncoder((3, 32, 32), feature_dim=16, num_filters=8)
    obs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # uint8 and the same values as float give the same features: both are divided by 255
    torch.testing.assert_close(enc(obs), enc(obs.float()))
    # ... and the fc layer reads the conv output flattened in (H, W, C) order (no layout copy)
    conv = enc.convs(obs.float() / 255.0)
    expected = torch.tanh(enc.ln(enc.fc(conv.permute(0, 2, 3, 1).flatten(1))))
    torch.testing.assert_close(enc(obs), expected)


def test_pixel_encoder_rejects_tiny_images_and_bad_shapes():
    PixelEncoder((3, 15, 15), num_layers=4)  # smallest side that 4 layers allow
    with pytest.raises(ConfigError, match="too small"):
        PixelEncoder((3, 14, 14), num_layers=4)
    with pytest.raises(ConfigError, match=r"\(C, H, W\)"):
        PixelEncoder((3, 64))


def test_state_encoder_and_make_encoder():
    enc = make_encoder((17,), feature_dim=20, hidden_dim=32)
    assert isinstance(enc, StateEncoder)
    out = enc(torch.randn(4, 17, dtype=torch.float64))
    assert out.shape == (4, 20) and out.dtype == torch.float32
    assert out.abs().max() < 1.0
    assert isinstance(make_encoder((9, 64, 64), num_filters=8), PixelEncoder)
    with pytest.raises(ConfigError, match="neither pixels"):
        make_encoder((3, 64))
    with pytest.raises(ConfigError):
        StateEncoder((3, 64, 64))


def test_actor_shapes_bounds_and_deterministic():
    torch.manual_seed(0)
    actor = Actor(feature_dim=10, action_dim=3, hidden_dim=32)
    features = torch.randn(5, 10) * 10
    action, log_pi, mean_action = actor(features)
    assert action.shape == (5, 3) and mean_action.shape == (5, 3) and log_pi.shape == (5,)
    assert action.abs().max() <= 1.0 and mean_action.abs().max() <= 1.0
    det_action, det_log_pi, det_mean = actor(features, deterministic=True)
    torch.testing.assert_close(det_action, det_mean)
    torch.testing.assert_close(det_mean, mean_action)
    assert torch.isfinite(det_log_pi).all()


def test_actor_log_std_is_squashed_into_bounds():
    actor = Actor(feature_dim=4, action_dim=2, hidden_dim=8, log_std_min=-10.0, log_std_max=2.0)
    last = actor.trunk[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 1e4, 1e4]))  # raw log-std -> +inf
    u = torch.zeros(1, 2)
    # tanh squashes the raw value: log sigma = -10 + 0.5 * 12 * (1 + 1) = 2 exactly at saturation
    _, log_pi, _ = actor(torch.zeros(1, 4), deterministic=True)
    torch.testing.assert_close(log_pi, squashed_gaussian_log_prob(u, u, torch.full((1, 2), 2.0)))
    with pytest.raises(ConfigError):
        Actor(4, 2, log_std_min=2.0, log_std_max=-10.0)


def test_twin_critic_shapes_and_independent_heads():
    critic = TwinCritic(feature_dim=10, action_dim=3, hidden_dim=16)
    critic.apply(weight_init)
    q1, q2 = critic(torch.randn(6, 10), torch.rand(6, 3))
    assert q1.shape == (6,) and q2.shape == (6,)
    assert not torch.allclose(q1, q2)


def test_weight_init_is_delta_orthogonal_for_convs():
    enc = PixelEncoder((3, 32, 32), num_filters=8)
    enc.apply(weight_init)
    w = enc.convs[0].weight
    centre = w[:, :, 1, 1]
    assert torch.count_nonzero(w) == torch.count_nonzero(centre)
    assert torch.count_nonzero(enc.convs[0].bias) == 0
