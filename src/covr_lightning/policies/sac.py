"""Pixel SAC as in RAD/CURL (Laskin et al. 2020), as a LightningModule with manual optimisation.

One :meth:`SACPolicyModule.training_step` is one SAC update, in CURL's order:

1. **Critic** (every step). The loss steps ``critic_opt`` = shared encoder + both Q heads; it is the
   only loss that trains the encoder. The target y is built under ``torch.no_grad``:
   a' ~ pi(.|s') from the *current* actor on the *online* encoder's features of s' (CURL's
   ``self.actor(next_obs)``, whose conv weights are the critic's), Q-bar from the *target* encoder
   and target critic, alpha as a constant.
2. **Actor and temperature** (every ``actor_update_every`` steps, when ``update_step`` is a
   multiple of it, the first step included). The actor loss steps ``actor_opt`` only: the encoder
   runs under ``torch.no_grad`` (detached features) and the critic's parameters are frozen while
   it evaluates Q(s, pi(s)), so neither gets a gradient; alpha enters detached. The features of s
   are *recomputed* after the critic step, as CURL does (the actor sees the representation the
   just-updated critic evaluates); this costs one no-grad encoder forward on actor steps only.
   The temperature loss then steps ``temperature_opt`` with log pi detached.
3. **Targets** (every ``target_update_every`` steps): EMA of the encoder (``encoder_tau``) and of
   the Q heads (``critic_tau``), from the freshly updated online weights.

Two observation seams, both identity here (RAD overrides them):

* :meth:`SACPolicyModule.augment` runs once per update on obs and next_obs *stacked on the channel
  axis*, so a per-sample random draw (a crop offset) is shared by the two observations of a
  transition; the augmented batch feeds both the critic and the actor.
* :meth:`SACPolicyModule.observation_transform` is its deterministic counterpart for raw env
  observations in :meth:`~SACPolicyModule.act` and :meth:`~SACPolicyModule.q_value` (RAD: a
  centre crop). The networks are built for its output shape, ``network_obs_shape``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning
import numpy as np
import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    PositiveFloat,
    PositiveInt,
)
from torch import Tensor, nn

from covr_lightning.policies import losses
from covr_lightning.policies.networks import Actor, TwinCritic, make_encoder, weight_init
from covr_lightning.policies.precision import EncoderPrecision, use_bf16
from covr_lightning.types import OpenClosedUnitInterval

Tau = OpenClosedUnitInterval
"""A Polyak averaging rate in (0, 1]."""

__all__ = ["SACPolicyModule", "VLMPrior"]


@dataclass
class VLMPrior:
    """Inputs of COVR's VLM regulariser ``lambda * ||a_v - a_r||^2`` in the actor loss.

    Attributes:
        action: ``(B, A)`` VLM action a_v in [-1, 1].
        mask: ``(B,)`` bool or 0/1 float; rows whose VLM answer parsed.
        weight: lambda (1.0 DMC, 2.0 CARLA in the paper).
        filter: ``none`` (the paper: every valid row) or ``q`` (only rows where the critic values
            a_v above the actor's mean action, Nair et al. 2018's Q-filter).
    """

    action: Tensor
    mask: Tensor
    weight: float
    filter: Literal["none", "q"] = "none"


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop ``module``'s parameters from collecting gradient (inputs still get it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class SACPolicyModule(lightning.LightningModule):
    """Pixel (or state) SAC with a shared encoder, twin critics and a learned temperature.

    Defaults are RAD/CURL's DMC settings. Optimizers (:meth:`configure_optimizers`):
    ``[actor_opt, critic_opt, temperature_opt]``; Adam with betas (0.9, 0.999) for actor and
    critic, (0.5, 0.999) for the temperature. Target entropy H-bar = -action_dim.

    Where the optimizers come from in :meth:`training_step`:

    * under ``lightning.Fabric`` (after ``fabric.setup(module, *module.configure_optimizers())``)
      and under ``lightning.Trainer``: ``self.optimizers()`` and ``self.manual_backward()``;
    * standalone (neither attached, e.g. a unit test or a notebook): the first step builds
      optimizers with :meth:`configure_optimizers` and keeps them in ``standalone_optimizers``;
      backward is plain ``loss.backward()``. Checkpoint those yourself if you train this way.

    Args:
        obs_shape: ``(C, H, W)`` pixels (uint8 frames stacked on channels) or ``(D,)`` state.
        action_dim: A; actions lie in [-1, 1]^A.
        feature_dim: Encoder output size (50).
        num_conv_layers: Conv layers of the pixel encoder (4).
        num_filters: Channels per conv layer (32).
        hidden_dim: Width of actor and critic hidden layers (1024).
        actor_lr: Actor learning rate (1e-3; RAD uses 2e-4 for cheetah).
        critic_lr: Encoder + critic learning rate (1e-3).
        temperature_lr: log alpha learning rate (1e-4).
        init_temperature: Initial alpha (0.1).
        gamma: Discount (0.99).
        critic_tau: EMA step of the target Q heads (0.01).
        encoder_tau: EMA step of the target encoder (0.05).
        actor_update_every: Update actor and alpha every this many steps (2).
        target_update_every: Update the targets every this many steps (2).
        actor_log_std_min: Lower bound of the actor's log sigma (-10).
        actor_log_std_max: Upper bound of the actor's log sigma (2).
        encoder_precision: Compute of the pixel encoders' convs during :meth:`training_step`:
            ``auto`` (bf16 where the device has native bf16 units, e.g. AVX-512-BF16/AMX CPUs
            and Ampere+ GPUs; else float32), ``bf16`` or ``fp32``. Weights, Q-heads, targets and
            losses stay float32; acting, evaluation and export compute in float32
            (docs/performance.md).

    Raises:
        ConfigError: On an unsupported ``obs_shape``. Value ranges are stated by the argument
            types (``jsonargparse.typing``) and checked when a recipe is parsed.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        action_dim: int,
        *,
        feature_dim: PositiveInt = 50,
        num_conv_layers: PositiveInt = 4,
        num_filters: PositiveInt = 32,
        hidden_dim: PositiveInt = 1024,
        actor_lr: PositiveFloat = 1e-3,
        critic_lr: PositiveFloat = 1e-3,
        temperature_lr: PositiveFloat = 1e-4,
        init_temperature: PositiveFloat = 0.1,
        gamma: ClosedUnitInterval = 0.99,
        critic_tau: Tau = 0.01,
        encoder_tau: Tau = 0.05,
        actor_update_every: PositiveInt = 2,
        target_update_every: PositiveInt = 2,
        actor_log_std_min: float = -10.0,
        actor_log_std_max: float = 2.0,
        encoder_precision: EncoderPrecision = "auto",
    ) -> None:
        super().__init__()
        # Value ranges are in the signature's types (checked when a recipe is parsed); the
        # builder passes action_dim from the env, so a bad one is our bug, not the user's.
        if int(action_dim) < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.obs_shape = tuple(int(s) for s in obs_shape)
        # What the networks see: obs_shape after observation_transform (a dummy forward).
        self.network_obs_shape = self._transformed_shape(self.obs_shape)
        self.action_dim = int(action_dim)
        self.actor_lr = actor_lr
        self.critic_lr = critic_lr
        self.temperature_lr = temperature_lr
        self.gamma = gamma
        self.critic_tau = critic_tau
        self.encoder_tau = encoder_tau
        self.actor_update_every = actor_update_every
        self.target_update_every = target_update_every
        self.target_entropy = -float(action_dim)  # H-bar = -|A|

        self.encoder = make_encoder(
            self.network_obs_shape, feature_dim, num_layers=num_conv_layers, num_filters=num_filters
        )
        self.encoder_precision = encoder_precision
        self.actor = Actor(
            feature_dim, action_dim, hidden_dim, actor_log_std_min, actor_log_std_max
        )
        self.critic = TwinCritic(feature_dim, action_dim, hidden_dim)
        for net in (self.encoder, self.actor, self.critic):
            net.apply(weight_init)
        # Targets start as exact copies and are never in an optimizer.
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(init_temperature)))

        self.prior_weight: float = 0.0  # lambda; set by the COVR loop (not checkpointed here)
        self.prior_filter: Literal["none", "q"] = "none"  # covr.prior_filter; set by the loop
        self.update_step: int = 0  # training_step calls; in state_dict via get_extra_state
        self.standalone_optimizers: list[torch.optim.Optimizer] | None = None
        self._policy_entropy: Tensor | None = None

    # ------------------------------------------------------------------ parts
    @property
    def alpha(self) -> Tensor:
        """Temperature alpha = exp(log alpha) (carries grad to log alpha)."""
        return self.log_alpha.exp()

    @property
    def policy_entropy(self) -> float:
        """Mean of -log pi(a|s) over the last actor batch; NaN before the first actor update."""
        if self._policy_entropy is None:
            return float("nan")
        return float(self._policy_entropy)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Build the three optimizers.

        Returns:
            ``[actor_opt, critic_opt, temperature_opt]``: actor parameters; encoder + twin critic
            parameters; ``log_alpha``.
        """
        # Fused Adam (one kernel for all tensors) is ~4x faster than the default per-tensor loop on
        # CPU; it needs CPU/CUDA parameters, which is where Fabric/Trainer put them on those machines.
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters()) or None
        actor_opt = torch.optim.Adam(
            self.actor.parameters(), lr=self.actor_lr, betas=(0.9, 0.999), fused=fused
        )
        critic_opt = torch.optim.Adam(
            [*self.encoder.parameters(), *self.critic.parameters()],
            lr=self.critic_lr,
            betas=(0.9, 0.999),
            fused=fused,
        )
        temperature_opt = torch.optim.Adam(
            [self.log_alpha], lr=self.temperature_lr, betas=(0.5, 0.999), fused=fused
        )
        return [actor_opt, critic_opt, temperature_opt]

    def augment(self, obs: Tensor) -> Tensor:
        """Data augmentation seam; identity for plain SAC (RAD overrides it).

        :meth:`training_step` calls it once per update with obs and next_obs stacked on dim 1
        (``(B, 2C, H, W)`` for pixels), so draw one random transform per sample and apply it to
        all channels: the two observations of a transition then share it.

        Args:
            obs: ``(B, 2 * obs_shape[0], *obs_shape[1:])`` observations as sampled (uint8 pixels).

        Returns:
            Augmented observations whose trailing dims are ``network_obs_shape[1:]`` (same count of
            channels).
        """
        return obs

    def observation_transform(self, obs: Tensor) -> Tensor:
        """Deterministic seam from raw env observations to what the networks see; identity here.

        :meth:`act` and :meth:`q_value` apply it; the networks are built for its output shape
        (``network_obs_shape``, found by a dummy forward in ``__init__``). Override it together
        with :meth:`augment` when the augmentation changes the image size (RAD: centre crop for a
        random crop). Needs only attributes set before ``super().__init__``.

        Args:
            obs: ``(B, *obs_shape)`` raw observations.

        Returns:
            ``(B, *network_obs_shape)``.
        """
        return obs

    def _transformed_shape(self, obs_shape: tuple[int, ...]) -> tuple[int, ...]:
        dummy = torch.zeros(1, *obs_shape, dtype=torch.uint8 if len(obs_shape) == 3 else None)
        return tuple(int(s) for s in self.observation_transform(dummy).shape[1:])

    # ------------------------------------------------------------------ losses
    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Soft Bellman error of both Q heads; gradient reaches the encoder and the critic only.

        Args:
            batch: ``obs``, ``action`` (B, A), ``reward`` (B,), ``next_obs``, ``terminated`` (B,);
                already augmented.

        Returns:
            ``(loss, metrics)``; metrics are detached scalars ``critic_loss``, ``q1_mean``,
            ``q2_mean``, ``target_q_mean``.
        """
        return self.bellman_loss(batch, self.critic_features(batch))

    def critic_features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The encodings the critic update needs, each computed once.

        A subclass adding encoder losses (DeepMDP) reuses them instead of encoding again.

        Returns:
            ``obs``: online encoder of s (with grad); ``next_obs``: online encoder of s' and
            ``next_obs_target``: target encoder of s' (both without grad).
        """
        with torch.no_grad():
            next_online = self.encoder(batch["next_obs"])
            next_target = self.target_encoder(batch["next_obs"])
        return {
            "obs": self.encoder(batch["obs"]),  # grad -> encoder
            "next_obs": next_online,
            "next_obs_target": next_target,
        }

    def bellman_loss(
        self, batch: dict[str, Tensor], features: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Soft Bellman error of both Q heads from :meth:`critic_features`.

        Args:
            batch: ``action``, ``reward``, ``terminated``.
            features: From :meth:`critic_features`.

        Returns:
            ``(loss, metrics)`` as :meth:`critic_loss`.
        """
        with torch.no_grad():
            # a' ~ pi(.|s') from the current actor on the online encoder (CURL); Q-bar on the targets.
            next_action, next_log_pi, _ = self.actor(features["next_obs"])
            next_q1, next_q2 = self.target_critic(features["next_obs_target"], next_action)
            target = losses.soft_q_target(
                batch["reward"],
                batch["terminated"],
                next_q1,
                next_q2,
                next_log_pi,
                self.alpha,
                self.gamma,
            )
        q1, q2 = self.critic(features["obs"], batch["action"])  # grad -> encoder, critic
        loss = losses.critic_loss(q1, q2, target)
        metrics = {
            "critic_loss": loss.detach(),
            "q1_mean": q1.detach().mean(),
            "q2_mean": q2.detach().mean(),
            "target_q_mean": target.mean(),
        }
        return loss, metrics

    def actor_loss(
        self, batch: dict[str, Tensor], prior: VLMPrior | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """SAC policy loss (+ COVR's VLM prior); gradient reaches the actor only.

        The encoder runs under ``no_grad`` (the actor sees detached features) and the critic is
        frozen while it scores the actions, so only actor parameters get gradient. The prior term
        compares a_v with the actor's *mean* action tanh(mu): pulling the sample instead would also
        shrink the policy's variance and fight the entropy bonus.

        Args:
            batch: Needs ``obs`` (already augmented).
            prior: VLM actions, mask and lambda, or ``None`` for plain SAC.

        Returns:
            ``(loss, metrics)``; metrics are detached scalars ``actor_loss``, ``log_pi`` (mean),
            ``entropy`` (mean of -log pi), ``actor_q_mean`` and, with a prior,
            ``prior_penalty``, ``prior_valid_frac`` (rows with a valid a_v),
            ``critic_prefers_prior`` (of those, the share where min Q(s, a_v) > min Q(s, tanh(mu)))
            and ``prior_accepted_frac`` (of those, the share the prior term applied to: all
            under filter ``none``, the preferred ones under ``q``).
        """
        with torch.no_grad():
            features = self.encoder(batch["obs"])  # detached: the actor never trains the encoder
        action, log_pi, mean_action = self.actor(features)
        with _frozen(self.critic):
            q1, q2 = self.critic(features, action)
        loss = losses.actor_loss(self.alpha.detach(), log_pi, q1, q2)
        log_pi_mean = log_pi.detach().mean()
        metrics = {
            "log_pi": log_pi_mean,
            "entropy": -log_pi_mean,
            "actor_q_mean": torch.min(q1, q2).detach().mean(),
        }
        if prior is not None:
            valid = prior.mask.detach().to(torch.bool)
            with torch.no_grad():
                preferred = losses.critic_prefers(
                    self.critic, features, prior.action, mean_action.detach(), valid
                )
            applied = valid & preferred if prior.filter == "q" else valid
            # L = L_pi + lambda * P(a_v, tanh(mu)) over the applied rows
            penalty = losses.vlm_prior_penalty(prior.action, mean_action, applied)
            loss = loss + prior.weight * penalty
            n_valid = valid.sum().clamp_min(1).float()
            metrics["prior_penalty"] = penalty.detach()
            metrics["prior_valid_frac"] = valid.float().mean()
            metrics["critic_prefers_prior"] = (valid & preferred).sum().float() / n_valid
            metrics["prior_accepted_frac"] = applied.sum().float() / n_valid
        metrics["actor_loss"] = loss.detach()
        return loss, metrics

    def temperature_loss(self, log_pi_mean: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Entropy-tuning loss of log alpha (log pi detached inside).

        Args:
            log_pi_mean: Scalar mean log pi(a|s) of the last actor batch.

        Returns:
            ``(loss, metrics)``; metrics ``temperature_loss`` and ``alpha`` (before this update).
        """
        loss = losses.temperature_loss(self.log_alpha, log_pi_mean, self.target_entropy)
        return loss, {"temperature_loss": loss.detach(), "alpha": self.alpha.detach()}

    # ------------------------------------------------------------------ update
    def training_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, float]:
        """One SAC update (critic; actor and alpha on their steps; targets on theirs).

        Args:
            batch: Replay batch: ``obs``, ``action``, ``reward``, ``next_obs``, ``terminated``, and
                optionally ``prior`` (B, A) and ``prior_mask`` (B,). Moved to this module's device.
            batch_idx: Unused (Lightning signature).

        Returns:
            Flat dict of floats for the terms computed this step (one host sync in total).
        """
        with self._update_precision():
            return self._update(batch)

    @contextmanager
    def _update_precision(self) -> Iterator[None]:
        """The encoders compute in bf16 during an update where ``encoder_precision`` says so."""
        bf16 = use_bf16(self.encoder_precision, self.device)
        encoders = [e for e in (self.encoder, self.target_encoder) if hasattr(e, "bf16")]
        for encoder in encoders:
            encoder.bf16 = bf16
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.bf16 = False

    def _update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        actor_opt, critic_opt, temperature_opt = self._get_optimizers()
        step = self.update_step
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # Augment once, obs and next_obs stacked on channels (one draw per transition); the same
        # augmented views feed the critic and the actor.
        both = self.augment(torch.cat([batch["obs"], batch["next_obs"]], dim=1))
        batch["obs"], batch["next_obs"] = both.chunk(2, dim=1)
        if tuple(batch["obs"].shape[1:]) != self.network_obs_shape:
            # A bug in a subclass's code, not a recipe value: it keeps its traceback.
            raise ValueError(
                f"{type(self).__name__}.augment returned observations of shape "
                f"{tuple(batch['obs'].shape[1:])} per half, the networks expect "
                f"{self.network_obs_shape}: make observation_transform produce the same size"
            )
        metrics: dict[str, Tensor] = {}

        # Critic loss -> critic_opt (encoder + Q1 + Q2).
        loss, m = self.critic_loss(batch)
        critic_opt.zero_grad(set_to_none=True)
        self._backward(loss)
        critic_opt.step()
        metrics.update(m)

        if step % self.actor_update_every == 0:
            prior = None
            if self.prior_weight > 0 and "prior" in batch and "prior_mask" in batch:
                prior = VLMPrior(
                    batch["prior"], batch["prior_mask"], float(self.prior_weight), self.prior_filter
                )
            # Actor loss -> actor_opt (actor only).
            loss, m = self.actor_loss(batch, prior)
            actor_opt.zero_grad(set_to_none=True)
            self._backward(loss)
            actor_opt.step()
            metrics.update(m)
            self._policy_entropy = m["entropy"]
            # Temperature loss -> temperature_opt (log alpha only).
            loss, m = self.temperature_loss(m["log_pi"])
            temperature_opt.zero_grad(set_to_none=True)
            self._backward(loss)
            temperature_opt.step()
            metrics.update(m)

        if step % self.target_update_every == 0:
            losses.soft_update_(self.target_encoder, self.encoder, self.encoder_tau)
            losses.soft_update_(self.target_critic, self.critic, self.critic_tau)

        self.update_step = step + 1
        names = list(metrics)
        values = torch.stack([metrics[k].float().reshape(()) for k in names]).tolist()
        return dict(zip(names, values, strict=True))

    def _get_optimizers(self) -> tuple[Any, Any, Any]:
        """``(actor_opt, critic_opt, temperature_opt)`` from Fabric/Trainer, else our own."""
        if self.fabric is not None or self._trainer is not None:
            opts = self.optimizers()
            opts = opts if isinstance(opts, list) else [opts]
            if len(opts) != 3:
                raise RuntimeError(
                    f"{type(self).__name__} expects 3 optimizers from its Fabric/Trainer, got "
                    f"{len(opts)}. Fix: fabric.setup(module, *module.configure_optimizers())."
                )
            return opts[0], opts[1], opts[2]
        if self.standalone_optimizers is None:
            self.standalone_optimizers = self.configure_optimizers()
        actor_opt, critic_opt, temperature_opt = self.standalone_optimizers
        return actor_opt, critic_opt, temperature_opt

    def _backward(self, loss: Tensor) -> None:
        if self.fabric is not None or self._trainer is not None:
            self.manual_backward(loss)  # Fabric: fabric.backward; Trainer: strategy.backward
        else:
            loss.backward()

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = False) -> np.ndarray:
        """Choose an action with the online encoder and actor (no augmentation, no grad).

        Raw observations go through :meth:`observation_transform` first (RAD: centre crop).

        Args:
            obs: One observation shaped ``obs_shape`` or a batch ``(B, *obs_shape)``; uint8 pixels
                as the env returns them.
            deterministic: Return tanh(mu) instead of a sample (evaluation).

        Returns:
            float32 ``(A,)`` for one observation, ``(B, A)`` for a batch, in [-1, 1].

        Raises:
            ConfigError: If ``obs`` does not match ``obs_shape``.
        """
        x = torch.as_tensor(np.ascontiguousarray(obs)) if isinstance(obs, np.ndarray) else obs
        single = tuple(x.shape) == self.obs_shape
        if not single and tuple(x.shape[1:]) != self.obs_shape:
            raise ValueError(  # the caller's bug (the builder sizes the policy from the env)
                f"act() got an observation of shape {tuple(x.shape)}, expected {self.obs_shape} "
                f"or (B, {', '.join(map(str, self.obs_shape))})"
            )
        if x.is_floating_point():
            x = x.float()
        x = x.to(self.device, non_blocking=True)
        if single:
            x = x.unsqueeze(0)
        x = self.observation_transform(x)
        action, _, _ = self.actor(self.encoder(x), deterministic=deterministic)
        out = action[0] if single else action
        return out.float().cpu().numpy()

    @torch.no_grad()
    def q_value(self, obs: Tensor, action: Tensor | None = None) -> Tensor:
        """min(Q1, Q2)(s, a) from the online encoder and critic; COVR's return signals use it.

        Args:
            obs: Batch of raw observations ``(B, *obs_shape)`` (``observation_transform`` is applied).
            action: ``(B, A)``; ``None`` scores the actor's mean action, which makes this the
                state value used to bootstrap the return-to-go of a segment cut by a time limit
                or a round boundary.

        Returns:
            ``(B,)`` float32 on the module's device.
        """
        obs = obs.to(self.device)
        obs = obs.float() if obs.is_floating_point() else obs
        features = self.encoder(self.observation_transform(obs))
        if action is None:
            action, _, _ = self.actor(features, deterministic=True)
        q1, q2 = self.critic(features, action.to(self.device).float())
        return torch.min(q1, q2).reshape(-1).float()

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Non-tensor training state saved in ``state_dict()`` under ``_extra_state``.

        Returns:
            ``{"update_step": int, "policy_entropy": float | None}``.
        """
        entropy = None if self._policy_entropy is None else float(self._policy_entropy)
        return {"update_step": int(self.update_step), "policy_entropy": entropy}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved.

        Args:
            state: The dict from :meth:`get_extra_state`.
        """
        self.update_step = int(state["update_step"])
        entropy = state.get("policy_entropy")
        self._policy_entropy = None if entropy is None else torch.tensor(float(entropy))
