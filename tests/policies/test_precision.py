"""bf16 encoder compute: float32 weights and outputs, features equal to float32 up to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import pixel_batch

from covr_lightning.policies.networks import PixelEncoder
from covr_lightning.policies.precision import cpu_has_fast_bf16, use_bf16
from covr_lightning.policies.sac import SACPolicyModule

CPU = torch.device("cpu")


def test_settings_resolve_per_device():
    assert use_bf16("bf16", CPU) and not use_bf16("fp32", CPU)
    assert use_bf16("auto", CPU) == cpu_has_fast_bf16()
    assert not use_bf16("auto", torch.device("meta"))  # unknown hardware: float32


def _pair() -> tuple[PixelEncoder, PixelEncoder]:
    torch.manual_seed(0)
    fp32 = PixelEncoder((9, 48, 48), feature_dim=32, num_layers=2, num_filters=16)
    bf16 = PixelEncoder((9, 48, 48), feature_dim=32, num_layers=2, num_filters=16)
    bf16.load_state_dict(fp32.state_dict())
    bf16.bf16 = True
    return fp32, bf16


def test_bf16_encoder_matches_float32_up_to_rounding_and_keeps_float32_weights():
    fp32, bf16 = _pair()
    obs = torch.randint(0, 256, (16, 9, 48, 48), dtype=torch.uint8)
    a, b = fp32(obs), bf16(obs)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert not torch.equal(a, b)  # it really computed in bf16
    torch.testing.assert_close(b, a, atol=0.05, rtol=0)
    b.pow(2).sum().backward()
    for p in bf16.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()


def test_bf16_gradient_points_where_the_float32_gradient_does():
    fp32, bf16 = _pair()
    obs = torch.randint(0, 256, (32, 9, 48, 48), dtype=torch.uint8)
    for enc in (fp32, bf16):
        enc(obs).pow(2).sum().backward()
    for p32, p16 in zip(fp32.parameters(), bf16.parameters(), strict=True):
        cosine = torch.nn.functional.cosine_similarity(p32.grad.flatten(), p16.grad.flatten(), 0)
        assert cosine > 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_sac_updates_in_either_precision(precision):
    torch.manual_seed(0)
    policy = SACPolicyModule(
        obs_shape=(9, 32, 32),
        action_dim=2,
        hidden_dim=32,
        num_filters=8,
        num_conv_layers=2,
        encoder_precision=precision,
    )
    batch = pixel_batch()
    before = [p.detach().clone() for p in policy.encoder.parameters()]
    for step in range(2):
        metrics = policy.training_step(dict(batch), step)
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    moved = [
        not torch.equal(a, b) for a, b in zip(before, policy.encoder.parameters(), strict=True)
    ]
    assert all(moved)  # the critic's gradient reached every encoder weight
    assert not policy.encoder.bf16 and not policy.target_encoder.bf16  # for the update only


def test_acting_computes_in_float32_whatever_the_update_precision():
    obs = np.random.default_rng(0).integers(0, 256, (4, 9, 32, 32), dtype=np.uint8)
    actions = []
    for precision in ("bf16", "fp32"):
        torch.manual_seed(0)
        policy = SACPolicyModule(
            (9, 32, 32), 2, hidden_dim=32, num_filters=8, encoder_precision=precision
        )
        actions.append(policy.act(obs, deterministic=True))
    np.testing.assert_array_equal(actions[0], actions[1])
