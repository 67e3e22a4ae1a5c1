"""SAC maths as plain tensor functions (Haarnoja et al. 2018, as used by RAD/CURL), plus COVR's prior.

Every function takes and returns tensors; none steps an optimizer or detaches what it was given
unless its docstring says so. Which optimizer each loss steps is decided in
:class:`covr_lightning.policies.sac.SACPolicyModule`.

Symbols: s state, a action, r reward, d terminated flag, gamma discount, alpha temperature,
pi policy, Q_1, Q_2 online critics, Q-bar target critics, H-bar target entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "actor_loss",
    "critic_loss",
    "critic_prefers",
    "soft_q_target",
    "soft_update_",
    "squashed_gaussian_log_prob",
    "temperature_loss",
    "vlm_prior_penalty",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


def squashed_gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Log-density of a = tanh(u) where u ~ N(mean, exp(log_std)^2), summed over action dims.

    Args:
        u: ``(..., A)`` pre-tanh sample.
        mean: ``(..., A)`` Gaussian mean mu.
        log_std: ``(..., A)`` log sigma.

    Returns:
        ``(...)`` log pi(a|s).
    """
    # log N(u; mu, sigma) = -1/2 ((u - mu) / sigma)^2 - log sigma - 1/2 log(2 pi)
    gaussian = -0.5 * ((u - mean) * torch.exp(-log_std)).pow(2) - log_std - _HALF_LOG_2PI
    # change of variables a = tanh(u): log pi(a) = log N(u) - log |da/du| = log N(u) - log(1 - tanh(u)^2)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and finite for any u
    # (CURL's log(relu(1 - a^2) + 1e-6) saturates at |u| > ~7).
    log_det = 2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))
    return (gaussian - log_det).sum(dim=-1)


def soft_q_target(
    reward: Tensor,
    terminated: Tensor,
    next_q1: Tensor,
    next_q2: Tensor,
    next_log_pi: Tensor,
    alpha: Tensor | float,
    gamma: float,
) -> Tensor:
    """Soft Bellman target with clipped double Q.

    Only termination cuts the bootstrap; a time-limit truncation is not a terminal state.

    Args:
        reward: ``(B,)`` r.
        terminated: ``(B,)`` d in {0, 1}.
        next_q1: ``(B,)`` Q-bar_1(s', a') from the target critic.
        next_q2: ``(B,)`` Q-bar_2(s', a').
        next_log_pi: ``(B,)`` log pi(a'|s') with a' ~ pi(.|s').
        alpha: Temperature (a scalar tensor or float).
        gamma: Discount.

    Returns:
        ``(B,)`` target y. Call under ``torch.no_grad()``; it is a regression target.
    """
    # y = r + gamma (1 - d) (min(Q-bar_1, Q-bar_2)(s', a') - alpha log pi(a'|s'))
    next_v = torch.min(next_q1, next_q2) - alpha * next_log_pi
    return reward + gamma * (1.0 - terminated) * next_v


def critic_loss(q1: Tensor, q2: Tensor, target: Tensor) -> Tensor:
    """Sum of the two heads' mean squared Bellman errors (as CURL).

    Args:
        q1: ``(B,)`` Q_1(s, a).
        q2: ``(B,)`` Q_2(s, a).
        target: ``(B,)`` y, without grad.

    Returns:
        Scalar loss.
    """
    # L_Q = E[(Q_1(s, a) - y)^2] + E[(Q_2(s, a) - y)^2]
    return F.mse_loss(q1, target) + F.mse_loss(q2, target)


def actor_loss(alpha: Tensor | float, log_pi: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
    """Policy loss of SAC with clipped double Q.

    Args:
        alpha: Temperature; pass it detached so this loss does not train the temperature.
        log_pi: ``(B,)`` log pi(a|s) of reparameterised actions a ~ pi(.|s).
        q1: ``(B,)`` Q_1(s, a) of those actions.
        q2: ``(B,)`` Q_2(s, a).

    Returns:
        Scalar loss.
    """
    # L_pi = E_s E_{a ~ pi}[alpha log pi(a|s) - min(Q_1, Q_2)(s, a)]
    return (alpha * log_pi - torch.min(q1, q2)).mean()


def temperature_loss(log_alpha: Tensor, log_pi: Tensor, target_entropy: float) -> Tensor:
    """Automatic entropy tuning of the temperature alpha = exp(log alpha) (CURL's form).

    Gradient w.r.t. log alpha is -alpha E[log pi + H-bar]: positive when the policy entropy
    E[-log pi] exceeds the target H-bar, so gradient descent shrinks alpha, and vice versa.

    Args:
        log_alpha: Scalar parameter log alpha.
        log_pi: Any shape; log pi(a|s) samples or their mean. Detached here.
        target_entropy: H-bar, usually -|A|.

    Returns:
        Scalar loss.
    """
    # L_alpha = E[-alpha (log pi(a|s) + H-bar)], log pi treated as a constant
    return (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()


def vlm_prior_penalty(a_v: Tensor, a_r: Tensor, mask: Tensor) -> Tensor:
    """COVR's VLM regulariser: masked mean over valid rows of ||a_v - a_r||^2.

    Invalid rows (the VLM answer did not parse) contribute neither value nor gradient, even if their
    a_v holds NaN; with no valid row the penalty is 0 (and its gradient is zero), without a host sync.

    Args:
        a_v: ``(B, A)`` VLM action (target; not differentiated).
        a_r: ``(B, A)`` the actor's action for the same observations.
        mask: ``(B,)`` bool or 0/1 float; nonzero marks a valid row.

    Returns:
        Scalar penalty.
    """
    valid = mask.to(torch.bool)
    # Replace invalid targets by a_r itself, so their difference is exactly 0 (no NaN * 0 in backward).
    a_v = torch.where(valid.unsqueeze(-1), a_v.to(a_r.dtype), a_r.detach())
    # P = sum_b m_b ||a_v,b - a_r,b||^2 / max(1, sum_b m_b)
    sq = (a_v - a_r).pow(2).sum(dim=-1)
    return sq.sum() / valid.sum().clamp_min(1).to(sq.dtype)


def critic_prefers(
    critic: nn.Module, features: Tensor, a_v: Tensor, a_r: Tensor, mask: Tensor
) -> Tensor:
    """Rows where the critic values the prior's action above the actor's: the Q-filter's test.

    Nair et al. (2018, "Overcoming Exploration in RL with Demonstrations") apply a behaviour-
    cloning term only where Q(s, a_demo) > Q(s, pi(s)); here the demonstration is a_v.

    Args:
        critic: ``critic(features, action) -> (Q1, Q2)``, each ``(B,)``.
        features: ``(B, F)`` encoded states.
        a_v: ``(B, A)`` prior actions (rows outside ``mask`` may hold anything, even NaN).
        a_r: ``(B, A)`` the actor's (mean) actions.
        mask: ``(B,)`` rows with a valid a_v.

    Returns:
        ``(B,)`` bool: ``mask & (min(Q1, Q2)(s, a_v) > min(Q1, Q2)(s, a_r))``.
    """
    valid = mask.to(torch.bool)
    a_v = torch.where(valid.unsqueeze(-1), a_v.to(a_r.dtype), a_r)
    # Both actions in one critic pass: (2B, F) x (2B, A).
    q1, q2 = critic(torch.cat([features, features]), torch.cat([a_v, a_r]))
    q_v, q_r = torch.min(q1, q2).chunk(2)
    return valid & (q_v > q_r)


@torch.no_grad()
def soft_update_(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak/EMA update of a target network's parameters, in place.

    Args:
        target: Network theta-bar to update (same architecture as ``source``).
        source: Online network theta.
        tau: Step size in (0, 1]; 1 copies ``source``.
    """
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        # theta-bar <- tau theta + (1 - tau) theta-bar
        t.lerp_(s, tau)
