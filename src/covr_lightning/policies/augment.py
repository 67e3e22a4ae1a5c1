"""Image augmentations for pixel RL, as plain tensor functions.

Each random augmentation takes a batch of frames ``(B, C, H, W)`` and draws **one offset per
sample**, shared by all ``C`` channels of that sample (the stacked frames move together) and
independent across samples. To give two batches the same draw, stack them on the channel axis
first: :meth:`~covr_lightning.policies.sac.SACPolicyModule.training_step` augments
``cat([obs, next_obs], dim=1)`` in one call, so a transition's two observations share their crop,
as RAD's translate does. Offsets come from ``generator`` if given, else torch's global RNG (on the
frames' device).

* :func:`random_shift` (DrQ): replicate-pad by ``pad`` and cut the original size back out. Output
  size = input size, so acting needs no matching transform. Returns float32 (as it always has).
* :func:`random_crop` (RAD's crop): cut a random ``out_size`` window out of a larger render
  (100 -> 84). Acting uses :func:`center_crop`. Keeps the dtype (uint8 stays uint8).
* :func:`random_translate` (RAD's translate): place the frame at a random offset inside a larger
  zero canvas (100 -> 108). Acting uses :func:`center_translate`. Keeps the dtype.

None of them loops over the batch in Python: each reads its output with one gather
(:func:`_gather_pixels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "center_crop",
    "center_translate",
    "random_crop",
    "random_shift",
    "random_translate",
]


def _check_frames(obs: Tensor, name: str) -> None:
    if obs.dim() != 4:
        raise ValueError(f"{name} needs frames (B, C, H, W), got shape {tuple(obs.shape)}")


def _gather_pixels(frames: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Read ``frames[b, :, rows[b, i], cols[b, j]]`` for every sample ``b`` in one gather.

    The flat index of output pixel (i, j) of sample b is ``rows[b, i] * W + cols[b, j]``, the
    same for every channel, so a window (or any per-sample grid of rows and columns) costs one
    ``torch.gather`` over the flattened pixels and no Python loop over the batch.

    Args:
        frames: ``(B, C, H, W)``.
        rows: ``(B, h)`` int64 source rows in ``[0, H)``.
        cols: ``(B, w)`` int64 source columns in ``[0, W)``.

    Returns:
        ``(B, C, h, w)`` in the dtype of ``frames``.
    """
    batch, channels, _, full_width = frames.shape
    height, width = rows.shape[1], cols.shape[1]
    flat = (rows[:, :, None] * full_width + cols[:, None, :]).reshape(batch, 1, height * width)
    pixels = torch.gather(frames.flatten(2), 2, flat.expand(batch, channels, height * width))
    return pixels.reshape(batch, channels, height, width)


def _offsets(
    batch: int, high: int, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """``batch`` integer offsets uniform in ``[0, high]``."""
    return torch.randint(0, high + 1, (batch,), device=device, generator=generator)


def random_shift(obs: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to ``pad`` pixels in each direction (DrQ's random shift).

    The image is padded by ``pad`` pixels on every side with copies of its border
    (``replicate``, so no black bars appear), then an ``H x W`` window at a random integer offset
    in ``[0, 2 * pad]`` is cut out. Computed without building the padded image: output row i of a
    sample with offset dy reads source row ``clamp(i + dy - pad, 0, H - 1)`` (columns likewise),
    which is exactly what replicate padding holds there. The output size equals the input size,
    so acting needs no matching eval-time transform.

    Args:
        obs: ``(B, C, H, W)`` frames.
        pad: Maximum shift in pixels (4 for 84x84 in DrQ; about 5 % of the side).
        generator: Optional RNG for the offsets (defaults to torch's global RNG).

    Returns:
        ``(B, C, H, W)`` float32 frames.
    """
    _check_frames(obs, "random_shift")
    if pad <= 0:
        return obs.float()
    batch, _, height, width = obs.shape
    dy = _offsets(batch, 2 * pad, obs.device, generator)
    dx = _offsets(batch, 2 * pad, obs.device, generator)
    rows = (dy[:, None] - pad + torch.arange(height, device=obs.device)).clamp_(0, height - 1)
    cols = (dx[:, None] - pad + torch.arange(width, device=obs.device)).clamp_(0, width - 1)
    return _gather_pixels(obs, rows, cols).float()


def random_crop(obs: Tensor, out_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Cut a random ``out_size x out_size`` window out of each image (RAD's random crop).

    RAD renders DMC at 100x100 and trains on 84x84 crops; the top-left corner of each sample's
    window is uniform over the ``(H - out_size + 1) x (W - out_size + 1)`` valid positions.

    Args:
        obs: ``(B, C, H, W)`` frames with ``H, W >= out_size``.
        out_size: Side of the crop (84 in RAD).
        generator: Optional RNG for the offsets (defaults to torch's global RNG).

    Returns:
        ``(B, C, out_size, out_size)`` in the dtype of ``obs``.

    Raises:
        ValueError: If the frames are smaller than ``out_size``.
    """
    _check_frames(obs, "random_crop")
    batch, _, height, width = obs.shape
    if not 0 < out_size <= min(height, width):
        raise ValueError(
            f"random_crop to {out_size} px needs frames at least that big, got {height}x{width}"
        )
    top = _offsets(batch, height - out_size, obs.device, generator)
    left = _offsets(batch, width - out_size, obs.device, generator)
    window = torch.arange(out_size, device=obs.device)
    return _gather_pixels(obs, top[:, None] + window, left[:, None] + window)


def random_translate(
    obs: Tensor, out_size: int, generator: torch.Generator | None = None
) -> Tensor:
    """Place each image at a random offset inside an ``out_size`` zero canvas (RAD's translate).

    Canvas pixel (r, c) of sample b is ``obs[b, :, r - dy_b, c - dx_b]`` where that lies inside
    the image, else 0, with ``dy_b`` uniform in ``[0, out_size - H]`` (``dx_b`` likewise in
    ``[0, out_size - W]``): the whole image always stays on the canvas.

    Args:
        obs: ``(B, C, H, W)`` frames with ``H, W <= out_size``.
        out_size: Side of the canvas (108 for 100x100 renders in RAD).
        generator: Optional RNG for the offsets (defaults to torch's global RNG).

    Returns:
        ``(B, C, out_size, out_size)`` in the dtype of ``obs``.

    Raises:
        ValueError: If the frames are larger than ``out_size``.
    """
    _check_frames(obs, "random_translate")
    batch, _, height, width = obs.shape
    if out_size < max(height, width):
        raise ValueError(
            f"random_translate to {out_size} px needs frames at most that big, got {height}x{width}"
        )
    # Zero-pad by p = out_size - H and crop an out_size window at p - dy: canvas row r then reads
    # padded row r + p - dy = image row r - dy (zero outside the image), as defined above.
    pad_h, pad_w = out_size - height, out_size - width
    padded = F.pad(obs, (pad_w, pad_w, pad_h, pad_h))
    dy = _offsets(batch, pad_h, obs.device, generator)
    dx = _offsets(batch, pad_w, obs.device, generator)
    window = torch.arange(out_size, device=obs.device)
    return _gather_pixels(padded, (pad_h - dy)[:, None] + window, (pad_w - dx)[:, None] + window)


def center_crop(obs: Tensor, out_size: int) -> Tensor:
    """The deterministic counterpart of :func:`random_crop`: the centred window (acting, eval).

    The offset is ``(H - out_size) // 2`` (and likewise for W), as RAD's ``center_crop_image``.

    Args:
        obs: ``(B, C, H, W)`` frames with ``H, W >= out_size``.
        out_size: Side of the crop.

    Returns:
        ``(B, C, out_size, out_size)``, a view of ``obs``.
    """
    _check_frames(obs, "center_crop")
    height, width = obs.shape[-2:]
    top, left = (height - out_size) // 2, (width - out_size) // 2
    if top < 0 or left < 0:
        raise ValueError(
            f"center_crop to {out_size} px needs frames at least that big, got {height}x{width}"
        )
    return obs[:, :, top : top + out_size, left : left + out_size]


def center_translate(obs: Tensor, out_size: int) -> Tensor:
    """The deterministic counterpart of :func:`random_translate`: the image centred on the canvas.

    The image's top-left corner lands at ``((out_size - H) // 2, (out_size - W) // 2)``.

    Args:
        obs: ``(B, C, H, W)`` frames with ``H, W <= out_size``.
        out_size: Side of the canvas.

    Returns:
        ``(B, C, out_size, out_size)`` in the dtype of ``obs``.
    """
    _check_frames(obs, "center_translate")
    height, width = obs.shape[-2:]
    top, left = (out_size - height) // 2, (out_size - width) // 2
    if top < 0 or left < 0:
        raise ValueError(
            f"center_translate to {out_size} px needs frames at most that big, got {height}x{width}"
        )
    bottom, right = out_size - height - top, out_size - width - left
    return F.pad(obs, (left, right, top, bottom))
