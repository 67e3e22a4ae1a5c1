"""The fused conv+ReLU of the bf16 update gives the numbers the plain ops give, to the bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import pixel_batch

from covr_lightning.policies import fused_conv
from covr_lightning.policies.networks import PixelEncoder
from covr_lightning.policies.sac import SACPolicyModule

needs_fused = pytest.mark.skipif(
    not fused_conv.fused_conv_relu_available(),
    reason="this torch build has no exact oneDNN conv+ReLU (the plain path runs everywhere)",
)


@pytest.fixture
def plain_only(monkeypatch):
    """Every conv_relu call takes the plain path; returns a counter of fused calls."""
    calls = []
    real_apply = fused_conv._ConvReLU.apply

    def counting_apply(*args):
        calls.append(1)
        return real_apply(*args)

    monkeypatch.setattr(fused_conv._ConvReLU, "apply", counting_apply)

    def switch(fused: bool) -> None:
        monkeypatch.setattr(fused_conv, "fused_conv_relu_available", lambda: fused)

    return calls, switch


@needs_fused
def test_bf16_encoder_forward_and_gradients_equal_the_plain_ops(plain_only):
    calls, switch = plain_only
    obs = torch.randint(0, 256, (16, 9, 84, 84), dtype=torch.uint8)
    results = []
    for fused in (True, False):
        switch(fused)
        torch.manual_seed(0)
        encoder = PixelEncoder((9, 84, 84))  # RAD's: 4 convs of 32 filters, 84 px
        encoder.bf16 = True
        out = encoder(obs)
        out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, *(p.grad for p in encoder.parameters())])
    assert len(calls) == 4  # the fused run used the fused op for every conv, the plain run never
    for fused_value, plain_value in zip(*results, strict=True):
        assert torch.equal(fused_value, plain_value)


@needs_fused
def test_sac_updates_are_identical_with_and_without_fusion(plain_only):
    _, switch = plain_only
    batch = pixel_batch()
    states = []
    for fused in (True, False):
        switch(fused)
        torch.manual_seed(0)
        policy = SACPolicyModule(
            (9, 32, 32), 2, hidden_dim=32, num_filters=8, encoder_precision="bf16"
        )
        for step in range(3):  # critic, actor, temperature and target updates all ran
            policy.training_step(dict(batch), step)
        states.append(dict([*policy.named_parameters(), *policy.named_buffers()]))
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_float32_and_other_devices_take_the_plain_path(plain_only):
    calls, switch = plain_only
    switch(True)
    x = torch.randn(2, 9, 16, 16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 9, 3, 3), torch.randn(8)
    out = fused_conv.conv_relu(x, weight, bias, 2)
    assert calls == []
    assert torch.equal(out, F.relu(F.conv2d(x, weight, bias, 2)))


def test_no_fusion_without_onednn(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    fused_conv.fused_conv_relu_available.cache_clear()
    try:
        assert not fused_conv.fused_conv_relu_available()
    finally:
        fused_conv.fused_conv_relu_available.cache_clear()
