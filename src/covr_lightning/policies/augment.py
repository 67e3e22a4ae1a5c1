"""Image augmentations for pixel RL, as plain tensor functions.

Each takes a batch of frames ``(B, C, H, W)`` (uint8 or float) and returns float32 frames of the
same spatial size (the encoder divides by 255, so values stay in [0, 255]). Every sample draws its
own offset. The RAD issue adds random crop and random translate beside :func:`random_shift`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(obs: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to ``pad`` pixels in each direction (DrQ's random shift).

    The image is padded by ``pad`` pixels on every side with copies of its border
    (``replicate``, so no black bars appear), then an ``H x W`` window at a random integer offset
    in ``[0, 2 * pad]`` is cut out. The output size equals the input size, so acting needs no
    matching eval-time transform.

    Args:
        obs: ``(B, C, H, W)`` frames.
        pad: Maximum shift in pixels (4 for 84x84 in DrQ; about 5 % of the side).
        generator: Optional RNG for the offsets (defaults to torch's global RNG).

    Returns:
        ``(B, C, H, W)`` float32 frames.
    """
    if pad <= 0:
        return obs.float()
    batch, channels, height, width = obs.shape
    padded = F.pad(obs.float(), (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (batch,), device=obs.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), device=obs.device, generator=generator)
    rows = (dy[:, None] + torch.arange(height, device=obs.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=obs.device))[:, None, None, :]
    samples = torch.arange(batch, device=obs.device)[:, None, None, None]
    chans = torch.arange(channels, device=obs.device)[None, :, None, None]
    return padded[samples, chans, rows, cols]
