"""SAC networks of RAD/CURL (Laskin et al. 2020): pixel/state encoders, tanh-Gaussian actor, twin Q.

Layer sizes, the ``tanh``-squashed log-std and the orthogonal initialisation follow the reference
pixel SAC (``curl_sac.py`` / ``encoder.py`` of CURL, which RAD reuses). One deliberate difference:
CURL's actor owns a second ``fc -> LayerNorm`` head on top of the shared convolutions; here the actor
reads the shared encoder's (detached) output directly, as the project contract asks (DrQ-v2 does the
same). The encoder is therefore trained by the critic loss only.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from covr_lightning.errors import ConfigError
from covr_lightning.policies.fused_conv import conv_relu
from covr_lightning.policies.losses import squashed_gaussian_log_prob

__all__ = [
    "Actor",
    "PixelEncoder",
    "StateEncoder",
    "TwinCritic",
    "make_encoder",
    "weight_init",
]


def weight_init(module: nn.Module) -> None:
    """CURL's initialisation: orthogonal linear layers, delta-orthogonal convolutions, zero biases.

    Apply with ``net.apply(weight_init)``. Delta-orthogonal (Xiao et al. 2018) puts an orthogonal
    matrix at the kernel centre and zeros elsewhere, so a fresh conv stack starts near an isometry.

    Args:
        module: Any module; only ``nn.Linear`` and ``nn.Conv2d`` are touched.
    """
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        assert module.kernel_size[0] == module.kernel_size[1], (
            "delta-orthogonal needs square kernels"
        )
        nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        mid = module.kernel_size[0] // 2
        with torch.no_grad():
            nn.init.orthogonal_(module.weight[:, :, mid, mid], gain=nn.init.calculate_gain("relu"))


class PixelEncoder(nn.Module):
    """RAD/CURL conv encoder: ``num_layers`` 3x3 convs (stride 2 then 1), ReLU, fc -> LayerNorm -> tanh.

    Pixels arrive as stored by the replay (uint8 in [0, 255]) and are scaled by 1/255 inside
    :meth:`forward`, so frames stay uint8 everywhere else. Float input is accepted too and is assumed to
    be on the same [0, 255] scale (e.g. after a float-valued augmentation).

    Args:
        obs_shape: ``(C, H, W)``, e.g. ``(9, 84, 84)`` for three stacked RGB frames.
        feature_dim: Size of the output feature vector (50 in RAD/CURL).
        num_layers: Number of conv layers (4 in RAD/CURL).
        num_filters: Channels of every conv layer (32 in RAD/CURL).

    Attributes:
        bf16: Compute the convs and the fc layer in bfloat16 (autocast); parameters, LayerNorm
            and output stay float32. The policy switches it on for its update only
            (``SACPolicyModule.encoder_precision``, :mod:`covr_lightning.policies.precision`).

    Raises:
        ConfigError: If ``obs_shape`` is not 3-d or the image is too small for the conv stack.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        feature_dim: int = 50,
        num_layers: int = 4,
        num_filters: int = 32,
    ) -> None:
        super().__init__()
        self.bf16 = False
        obs_shape = tuple(int(s) for s in obs_shape)
        if len(obs_shape) != 3:
            raise ConfigError(
                f"PixelEncoder needs obs_shape (C, H, W), got {obs_shape}",
                "pass the pixel observation_space.shape, or use StateEncoder for state vectors",
            )
        if num_layers < 1:
            raise ConfigError(f"num_conv_layers must be >= 1, got {num_layers}", "use 4 (RAD/CURL)")
        # 3x3 stride 2 gives floor((H - 3) / 2) + 1, each later valid 3x3 conv removes 2: H >= 4L - 1.
        min_side = 4 * num_layers - 1
        if min(obs_shape[1:]) < min_side:
            raise ConfigError(
                f"image {obs_shape[1]}x{obs_shape[2]} is too small for {num_layers} conv layers",
                f"render at least {min_side}x{min_side} pixels or use fewer conv layers",
            )
        self.obs_shape = obs_shape
        self.feature_dim = feature_dim
        layers: list[nn.Module] = [nn.Conv2d(obs_shape[0], num_filters, 3, stride=2), nn.ReLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(num_filters, num_filters, 3, stride=1), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        # channels_last: oneDNN convs run 15-30 % faster on CPU in this layout (benchmarked at
        # 84x84/batch 128 and 48x48/batch 64), and it is cuDNN's preferred layout too.
        self.convs.to(memory_format=torch.channels_last)
        # Flattened conv size from a dummy forward, never hard-coded (works for 64, 84, 100, ...).
        with torch.no_grad():
            conv_dim = self.convs(torch.zeros(1, *obs_shape)).flatten(1).shape[1]
        self.fc = nn.Linear(conv_dim, feature_dim)
        self.ln = nn.LayerNorm(feature_dim)

    def forward(self, obs: Tensor) -> Tensor:
        """Encode a batch of stacked frames.

        Args:
            obs: ``(B, C, H, W)`` uint8 or float on the [0, 255] scale.

        Returns:
            ``(B, feature_dim)`` features in (-1, 1).
        """
        obs = obs.contiguous(memory_format=torch.channels_last)  # no copy if already so
        if self.bf16:
            # Pixels straight to bf16 (0..255 are exact in bf16): no float32 copy of the batch.
            with torch.autocast(obs.device.type, dtype=torch.bfloat16):
                h = self._features(obs.to(torch.bfloat16))
            h = h.float()
        else:
            h = self._features(obs.float())
        return torch.tanh(self.ln(h))

    def _features(self, pixels: Tensor) -> Tensor:
        """The fc layer's output for pixels on the [0, 255] scale (channels-last)."""
        h = pixels
        # Every other layer is a Conv2d (Conv2d, ReLU, Conv2d, ...); islice, not convs[::2],
        # which builds a new Sequential on every forward (~10 us, acting included).
        for index, conv in enumerate(itertools.islice(self.convs, 0, None, 2)):
            # conv(x / 255, W) = conv(x, W / 255): scaling the 9x32x3x3 weight instead of the
            # batch saves a pass over the pixels (~5 % of the encoder's time at batch 128,
            # measured by benchmarks/encoder_variants.py); W stays the parameter, so its
            # optimiser sees the same problem as with scaled inputs.
            weight = conv.weight * (1 / 255.0) if index == 0 else conv.weight
            # One oneDNN call for conv + ReLU in the bf16 update on a CPU (same numbers).
            h = conv_relu(h, weight, conv.bias, conv.stride[0])
        # Flattened in channels-last memory order, (H, W, C): a view of the conv output, where
        # NCHW order copies it (~8 %). The fc layer's columns are in that order.
        return self.fc(h.permute(0, 2, 3, 1).flatten(1))


class StateEncoder(nn.Module):
    """Encoder for state vectors: MLP -> LayerNorm -> tanh, so the actor/critic see the same range.

    Args:
        obs_shape: ``(D,)``.
        feature_dim: Size of the output feature vector.
        hidden_dim: Width of the hidden layer.

    Raises:
        ConfigError: If ``obs_shape`` is not 1-d.
    """

    def __init__(
        self, obs_shape: tuple[int, ...], feature_dim: int = 50, hidden_dim: int = 256
    ) -> None:
        super().__init__()
        obs_shape = tuple(int(s) for s in obs_shape)
        if len(obs_shape) != 1:
            raise ConfigError(
                f"StateEncoder needs obs_shape (D,), got {obs_shape}",
                "pass the state observation_space.shape, or use PixelEncoder for images",
            )
        self.obs_shape = obs_shape
        self.feature_dim = feature_dim
        self.mlp = nn.Sequential(
            nn.Linear(obs_shape[0], hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim)
        )
        self.ln = nn.LayerNorm(feature_dim)

    def forward(self, obs: Tensor) -> Tensor:
        """Encode a batch of state vectors.

        Args:
            obs: ``(B, D)`` float.

        Returns:
            ``(B, feature_dim)`` features in (-1, 1).
        """
        return torch.tanh(self.ln(self.mlp(obs.float())))


def make_encoder(
    obs_shape: tuple[int, ...],
    feature_dim: int = 50,
    num_layers: int = 4,
    num_filters: int = 32,
    hidden_dim: int = 256,
) -> PixelEncoder | StateEncoder:
    """Pick the encoder for an observation shape: 3-d -> pixels, 1-d -> state.

    Args:
        obs_shape: ``(C, H, W)`` or ``(D,)``.
        feature_dim: Output feature size of either encoder.
        num_layers: Conv layers (pixels only).
        num_filters: Conv channels (pixels only).
        hidden_dim: Hidden width (state only).

    Returns:
        A :class:`PixelEncoder` or a :class:`StateEncoder`.

    Raises:
        ConfigError: If ``obs_shape`` is neither 3-d nor 1-d.
    """
    obs_shape = tuple(int(s) for s in obs_shape)
    if len(obs_shape) == 3:
        return PixelEncoder(obs_shape, feature_dim, num_layers=num_layers, num_filters=num_filters)
    if len(obs_shape) == 1:
        return StateEncoder(obs_shape, feature_dim, hidden_dim=hidden_dim)
    raise ConfigError(
        f"obs_shape {obs_shape} is neither pixels (C, H, W) nor a state vector (D,)",
        "pass the environment's observation_space.shape",
    )


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    # CURL's trunk: two hidden ReLU layers.
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )


class Actor(nn.Module):
    """Tanh-Gaussian policy pi(a|s) on encoder features (CURL's ``Actor`` without its own encoder).

    The trunk outputs mean mu and a raw log-std that is squashed into the bounds as in CURL:
    ``log_std = log_std_min + 0.5 (log_std_max - log_std_min) (tanh(raw) + 1)``.

    Args:
        feature_dim: Input feature size.
        action_dim: Action size A; actions lie in [-1, 1]^A.
        hidden_dim: Width of the two hidden layers (1024 in RAD/CURL).
        log_std_min: Lower bound of log sigma.
        log_std_max: Upper bound of log sigma.
    """

    def __init__(
        self,
        feature_dim: int,
        action_dim: int,
        hidden_dim: int = 1024,
        log_std_min: float = -10.0,
        log_std_max: float = 2.0,
    ) -> None:
        super().__init__()
        if not log_std_min < log_std_max:
            raise ConfigError(
                f"actor_log_std_min ({log_std_min}) must be below actor_log_std_max ({log_std_max})",
                "use the RAD/CURL bounds -10 and 2",
            )
        self.action_dim = action_dim
        self.log_std_min = float(log_std_min)
        self.log_std_max = float(log_std_max)
        self.trunk = _mlp(feature_dim, hidden_dim, 2 * action_dim)

    def forward(
        self, features: Tensor, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample a = tanh(u), u = mu + sigma * eps (reparameterised), or u = mu if deterministic.

        Args:
            features: ``(B, feature_dim)``.
            deterministic: Use the mean (u = mu) instead of sampling.

        Returns:
            ``(action, log_pi, mean_action)``: ``(B, A)`` in [-1, 1], ``(B,)`` log pi(a|s) of the
            returned action, and ``(B, A)`` tanh(mu).
        """
        mu, raw_log_std = self.trunk(features).chunk(2, dim=-1)
        # CURL: squash log sigma smoothly into [log_std_min, log_std_max] (no hard clamp, no dead grad).
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (
            torch.tanh(raw_log_std) + 1.0
        )
        # u = mu + sigma * eps, eps ~ N(0, I): the reparameterisation trick
        u = mu if deterministic else mu + log_std.exp() * torch.randn_like(mu)
        log_pi = squashed_gaussian_log_prob(u, mu, log_std)
        return torch.tanh(u), log_pi, torch.tanh(mu)


class TwinCritic(nn.Module):
    """Clipped double Q (Fujimoto et al. 2018): two independent Q(s, a) heads on shared features.

    Args:
        feature_dim: Input feature size.
        action_dim: Action size A.
        hidden_dim: Width of the two hidden layers of each head (1024 in RAD/CURL).
    """

    def __init__(self, feature_dim: int, action_dim: int, hidden_dim: int = 1024) -> None:
        super().__init__()
        self.q1 = _mlp(feature_dim + action_dim, hidden_dim, 1)
        self.q2 = _mlp(feature_dim + action_dim, hidden_dim, 1)

    def forward(self, features: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluate both heads.

        Args:
            features: ``(B, feature_dim)``.
            action: ``(B, A)``.

        Returns:
            ``(q1, q2)``, each ``(B,)``.
        """
        x = torch.cat([features, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)
