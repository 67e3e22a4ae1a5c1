"""SAC maths checked against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from covr_lightning.policies.losses import (
    actor_loss,
    critic_loss,
    critic_prefers,
    soft_q_target,
    soft_update_,
    squashed_gaussian_log_prob,
    temperature_loss,
    vlm_prior_penalty,
)


def test_soft_q_target_hand_values():
    reward = torch.tensor([1.0, 0.5])
    terminated = torch.tensor([0.0, 1.0])
    next_q1 = torch.tensor([2.0, 3.0])
    next_q2 = torch.tensor([1.5, 4.0])
    next_log_pi = torch.tensor([-1.0, 2.0])
    y = soft_q_target(reward, terminated, next_q1, next_q2, next_log_pi, alpha=0.1, gamma=0.9)
    # row 0: 1 + 0.9 * (min(2, 1.5) - 0.1 * -1) = 1 + 0.9 * 1.6 = 2.44 ; row 1 terminated: y = r
    torch.testing.assert_close(y, torch.tensor([2.44, 0.5]))


def test_soft_q_target_accepts_tensor_alpha():
    y = soft_q_target(
        torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), torch.ones(1),
        alpha=torch.tensor(0.5), gamma=1.0,
    )  # fmt: skip
    torch.testing.assert_close(y, torch.tensor([0.5]))  # 0 + 1 * (1 - 0.5 * 1)


def test_critic_loss_is_sum_of_two_mses():
    q1 = torch.tensor([1.0, 2.0])
    q2 = torch.tensor([0.0, 0.0])
    target = torch.tensor([1.0, 1.0])
    # MSE(q1) = (0 + 1) / 2 = 0.5 ; MSE(q2) = (1 + 1) / 2 = 1.0
    torch.testing.assert_close(critic_loss(q1, q2, target), torch.tensor(1.5))


def test_actor_loss_hand_values_and_entropy_term():
    log_pi = torch.tensor([-1.0, 1.0])
    q1 = torch.tensor([1.0, 3.0])
    q2 = torch.tensor([2.0, 0.0])
    # min Q = [1, 0]; alpha log pi = [-0.2, 0.2]; mean([-1.2, 0.2]) = -0.5
    torch.testing.assert_close(actor_loss(0.2, log_pi, q1, q2), torch.tensor(-0.5))
    # with alpha = 0 only -min Q remains: mean([-1, 0]) = -0.5 ; the entropy term adds alpha E[log pi] = 0
    torch.testing.assert_close(actor_loss(0.0, log_pi, q1, q2), torch.tensor(-0.5))
    torch.testing.assert_close(actor_loss(1.0, log_pi + 1.0, q1, q2), torch.tensor(0.5))


@pytest.mark.parametrize(
    ("log_pi", "expected_loss", "expected_grad"),
    [
        # entropy -log pi = -1 exceeds the target -6: grad = -alpha (1 - 6) = +0.5 -> alpha shrinks
        (1.0, 0.5, 0.5),
        # entropy -10 below the target -6: grad = -alpha (10 - 6) = -0.4 -> alpha grows
        (10.0, -0.4, -0.4),
    ],
)
def test_temperature_loss_value_and_gradient_sign(log_pi, expected_loss, expected_grad):
    log_alpha = torch.tensor(math.log(0.1), requires_grad=True)
    log_pi_t = torch.full((4,), log_pi, requires_grad=True)
    loss = temperature_loss(log_alpha, log_pi_t, target_entropy=-6.0)
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(expected_loss))
    torch.testing.assert_close(log_alpha.grad, torch.tensor(expected_grad))
    assert log_pi_t.grad is None  # log pi is detached inside


def test_squashed_log_prob_matches_change_of_variables_1d():
    mean, std, u = 0.2, 0.5, 0.7
    a = math.tanh(u)
    # p_A(a) = p_U(u) / |da/du| = N(u; mean, std) / (1 - tanh(u)^2)
    gauss = math.exp(-0.5 * ((u - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    expected = math.log(gauss / (1 - a**2))
    got = squashed_gaussian_log_prob(
        torch.tensor([[u]], dtype=torch.float64),
        torch.tensor([[mean]], dtype=torch.float64),
        torch.tensor([[math.log(std)]], dtype=torch.float64),
    )
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # and against the numerical derivative of the CDF of A: P(A <= a) = Phi((atanh(a) - mean) / std)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), std)
    eps = 1e-6
    cdf = [normal.cdf(torch.atanh(torch.tensor(a + s * eps, dtype=torch.float64))) for s in (1, -1)]
    density = ((cdf[0] - cdf[1]) / (2 * eps)).item()
    assert got.item() == pytest.approx(math.log(density), rel=1e-6)


def test_squashed_log_prob_sums_dims_and_matches_torch_tanh_transform():
    torch.manual_seed(0)
    mean = torch.randn(5, 3, dtype=torch.float64)
    log_std = torch.randn(5, 3, dtype=torch.float64) * 0.3
    u = mean + log_std.exp() * torch.randn(5, 3, dtype=torch.float64)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), torch.distributions.TanhTransform()
    )
    expected = dist.log_prob(torch.tanh(u)).sum(-1)
    torch.testing.assert_close(squashed_gaussian_log_prob(u, mean, log_std), expected)


def test_squashed_log_prob_is_finite_for_saturated_tanh():
    u = torch.tensor([[20.0, -30.0]], requires_grad=True)
    lp = squashed_gaussian_log_prob(u, torch.zeros(1, 2), torch.zeros(1, 2))
    lp.backward()
    # log(1 - tanh(u)^2) -> log 4 - 2|u| for large |u|
    expected = sum(
        -0.5 * x**2 - 0.5 * math.log(2 * math.pi) - (math.log(4) - 2 * abs(x)) for x in (20, -30)
    )
    assert lp.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(u.grad).all()


def test_vlm_prior_penalty_masks_rows_and_nan():
    a_v = torch.tensor([[1.0, 0.0], [0.0, 0.0], [float("nan"), float("nan")]])
    a_r = torch.zeros(3, 2, requires_grad=True)
    with torch.no_grad():
        a_r[1, 1] = 2.0
    mask = torch.tensor([True, True, False])
    # valid rows: ||(1, 0)||^2 = 1 and ||(0, -2)||^2 = 4 -> mean over 2 valid rows = 2.5
    penalty = vlm_prior_penalty(a_v, a_r, mask)
    torch.testing.assert_close(penalty, torch.tensor(2.5))
    penalty.backward()
    # d/da_r of (||a_v - a_r||^2) / 2 = (a_r - a_v) ; invalid row gets exactly zero
    torch.testing.assert_close(a_r.grad, torch.tensor([[-1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    # a float mask means the same
    torch.testing.assert_close(
        vlm_prior_penalty(a_v, a_r.detach(), mask.float()), torch.tensor(2.5)
    )


def test_vlm_prior_penalty_is_zero_without_valid_rows():
    a_r = torch.randn(4, 3, requires_grad=True)
    penalty = vlm_prior_penalty(torch.ones(4, 3), a_r, torch.zeros(4, dtype=torch.bool))
    assert penalty.item() == 0.0
    penalty.backward()
    assert torch.equal(a_r.grad, torch.zeros(4, 3))


def test_soft_update_moves_by_exactly_tau():
    target, source = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(0.0)
        for p in source.parameters():
            p.fill_(1.0)
    soft_update_(target, source, tau=0.25)
    for p in target.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.25))  # 0.25 * 1 + 0.75 * 0
    soft_update_(target, source, tau=1.0)
    for p in target.parameters():
        torch.testing.assert_close(p, torch.ones_like(p))


def test_critic_prefers_compares_min_q_of_both_actions_and_ignores_invalid_rows():
    def critic(features, action):  # Q1 peaks at 0.5, Q2 is Q1 - 0.1: min is Q2
        q = -(action - 0.5).pow(2).sum(-1) + features.sum(-1)
        return q, q - 0.1

    features = torch.zeros(4, 3)
    a_r = torch.tensor([[0.0], [0.0], [0.5], [0.0]])
    a_v = torch.tensor([[0.4], [-0.4], [0.0], [float("nan")]])
    mask = torch.tensor([True, True, True, False])
    assert critic_prefers(critic, features, a_v, a_r, mask).tolist() == [True, False, False, False]
