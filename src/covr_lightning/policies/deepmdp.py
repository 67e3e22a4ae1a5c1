"""DeepMDP: SAC whose shared encoder also learns a latent model (Gelada et al., 2019).

Two small models read the online encoder's latent z = phi(s) and the action a:

* a **transition model** P-bar(z, a) that predicts the next latent, trained towards the *target
  encoder's* latent of s' (z-bar' = phi-bar(s'), under ``no_grad``: a slowly moving target, as the
  critic's own targets are), and
* a **reward model** R-bar(z, a) that predicts r.

Their losses are added to the critic loss::

    L_critic+aux = L_Q + c_P * mean_(b,k) (P-bar(z_b, a_b)_k - z-bar'_bk)^2 + c_R * mean_b (R-bar(z_b, a_b) - r_b)^2

so they step the critic optimizer (encoder + twin Q + both models: see :meth:`configure_optimizers`)
and shape the encoder together with the Bellman error; the actor still sees detached features.
Deterministic transition model with a squared (L2) loss, i.e. DeepMDP's Wasserstein loss for a
deterministic latent model. Defaults ``transition_coef = reward_coef = 1``: the DeepMDP baseline of
DBC (Zhang et al. 2021, ``deepmdp_agent.py``) adds the two losses with unit weights, and its model
widths (512, LayerNorm) are the default ``model_hidden_dim`` here.

Cost: none in encoder passes. The auxiliary terms reuse the critic update's encodings
(:meth:`SACPolicyModule.critic_features`): z = phi(s) is the same tensor the Q heads read, so the
encoder's gradient is the sum of the Bellman and model terms from one forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covr_lightning.errors import ConfigError
from covr_lightning.policies.networks import weight_init
from covr_lightning.policies.sac import SACPolicyModule

__all__ = ["DeepMDPModule", "latent_model", "reward_loss", "transition_loss"]


def transition_loss(predicted_next_latent: Tensor, target_next_latent: Tensor) -> Tensor:
    """Latent transition loss L_P = mean over batch and latent dims of (P-bar(z, a) - z-bar')^2.

    Args:
        predicted_next_latent: ``(B, d)`` P-bar(z, a); carries gradient.
        target_next_latent: ``(B, d)`` z-bar' = target encoder of s'; detached by the caller.

    Returns:
        Scalar loss.
    """
    return F.mse_loss(predicted_next_latent, target_next_latent)


def reward_loss(predicted_reward: Tensor, reward: Tensor) -> Tensor:
    """Reward loss L_R = mean_b (R-bar(z_b, a_b) - r_b)^2.

    Args:
        predicted_reward: ``(B,)`` R-bar(z, a).
        reward: ``(B,)`` r.

    Returns:
        Scalar loss.
    """
    return F.mse_loss(predicted_reward, reward)


def latent_model(feature_dim: int, action_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MLP on ``cat(z, a)``: Linear -> LayerNorm -> ReLU -> Linear (DBC's DeepMDP model shape).

    Args:
        feature_dim: Latent size d.
        action_dim: Action size A.
        hidden_dim: Hidden width.
        out_dim: ``d`` for the transition model, 1 for the reward model.

    Returns:
        The model (orthogonally initialised like the other networks).
    """
    model = nn.Sequential(
        nn.Linear(feature_dim + action_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )
    model.apply(weight_init)
    return model


class DeepMDPModule(SACPolicyModule):
    """SAC with DeepMDP's latent transition and reward losses on the shared encoder.

    Args:
        obs_shape: ``(C, H, W)`` stacked uint8 frames or ``(D,)`` state.
        action_dim: Number of action dimensions.
        transition_coef: c_P, weight of the latent transition loss (1.0).
        reward_coef: c_R, weight of the reward loss (1.0).
        model_hidden_dim: Hidden width of both latent models (512).
        **sac_kwargs: Every :class:`SACPolicyModule` hyperparameter.

    Raises:
        ConfigError: On a negative coefficient or a non-positive width.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        *,
        transition_coef: float = 1.0,
        reward_coef: float = 1.0,
        model_hidden_dim: int = 512,
        **sac_kwargs,
    ) -> None:
        for name, value in (("transition_coef", transition_coef), ("reward_coef", reward_coef)):
            if not value >= 0:
                raise ConfigError(f"policy.{name} must be >= 0, got {value}", "use 1.0 (DeepMDP)")
        if model_hidden_dim < 1:
            raise ConfigError(
                f"policy.model_hidden_dim must be >= 1, got {model_hidden_dim}", "use 512"
            )
        super().__init__(obs_shape, action_dim, **sac_kwargs)
        self.transition_coef = float(transition_coef)
        self.reward_coef = float(reward_coef)
        feature_dim = self.encoder.feature_dim
        self.transition_model = latent_model(
            feature_dim, self.action_dim, model_hidden_dim, feature_dim
        )
        self.reward_model = latent_model(feature_dim, self.action_dim, model_hidden_dim, 1)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """SAC's three optimizers, with both latent models added to the critic optimizer.

        Returns:
            ``[actor_opt, critic_opt, temperature_opt]``; ``critic_opt`` has a second parameter
            group (transition + reward model) with the critic's learning rate and betas.
        """
        actor_opt, critic_opt, temperature_opt = super().configure_optimizers()
        critic_opt.add_param_group(
            {"params": [*self.transition_model.parameters(), *self.reward_model.parameters()]}
        )
        return [actor_opt, critic_opt, temperature_opt]

    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """SAC's soft Bellman error plus the weighted transition and reward losses.

        Args:
            batch: ``obs``, ``action``, ``reward``, ``next_obs``, ``terminated``; already augmented.

        Returns:
            ``(loss, metrics)``: SAC's metrics plus ``deepmdp_transition_loss`` and
            ``deepmdp_reward_loss`` (unweighted), ``critic_loss`` being the Bellman part alone.
        """
        # One encoding serves both: z = phi(s) (with grad), z-bar' = phi-bar(s') (no grad).
        features = self.critic_features(batch)
        loss, metrics = self.bellman_loss(batch, features)
        z, z_next_target = features["obs"], features["next_obs_target"]
        za = torch.cat([z, batch["action"]], dim=-1)
        l_p = transition_loss(self.transition_model(za), z_next_target)
        l_r = reward_loss(self.reward_model(za).squeeze(-1), batch["reward"])
        # L = L_Q + c_P L_P + c_R L_R
        loss = loss + self.transition_coef * l_p + self.reward_coef * l_r
        metrics["deepmdp_transition_loss"] = l_p.detach()
        metrics["deepmdp_reward_loss"] = l_r.detach()
        return loss, metrics
