"""Random shift: shapes, the shift is a true translation within the pad, per-sample offsets."""

from __future__ import annotations

import pytest
import torch

from covr_lightning.errors import ConfigError
from covr_lightning.policies.augment import random_shift
from covr_lightning.policies.rad import RADModule


def _ramp(batch: int, size: int = 12) -> torch.Tensor:
    """Frames whose pixel value encodes its (row, col): each shift is recoverable."""
    rows = torch.arange(size)[:, None] * size
    cols = torch.arange(size)[None, :]
    frame = (rows + cols).to(torch.uint8)
    return frame.expand(batch, 6, size, size).clone()


def _offset(shifted: torch.Tensor, size: int) -> tuple[int, int]:
    """Recover (dy, dx) from the centre pixel (6, 6), which stays inside the image for pad <= 5."""
    value = int(shifted[0, 6, 6])
    return value // size - 6, value % size - 6


def test_shape_dtype_and_translation_within_pad():
    obs = _ramp(64)
    out = random_shift(obs, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == obs.shape and out.dtype == torch.float32
    offsets = {_offset(out[i], 12) for i in range(64)}
    assert all(abs(dy) <= 2 and abs(dx) <= 2 for dy, dx in offsets)
    assert len(offsets) > 10  # samples draw their own offsets
    # all channels (the stacked frames) of one sample move together
    assert torch.equal(out[:, 0], out[:, 5])


def test_shift_is_a_translation_with_replicated_border():
    obs = _ramp(1)
    out = random_shift(obs, pad=3, generator=torch.Generator().manual_seed(1))
    dy, dx = _offset(out[0], 12)
    shifted = torch.roll(obs[0].float(), shifts=(-dy, -dx), dims=(1, 2))
    interior = slice(3, 9)
    assert torch.equal(out[0][:, interior, interior], shifted[:, interior, interior])
    assert out.min() >= 0 and out.max() <= obs.max()  # replicate padding adds no new values


def test_zero_pad_is_identity():
    obs = _ramp(4)
    assert torch.equal(random_shift(obs, pad=0), obs.float())


def test_rad_module_augments_images_only():
    module = RADModule((9, 32, 32), 1, shift_pad=2, hidden_dim=16, num_filters=8)
    obs = torch.randint(0, 256, (4, 9, 32, 32), dtype=torch.uint8)
    assert module.augment(obs).shape == obs.shape
    with pytest.raises(ConfigError, match="augments images"):
        RADModule((5,), 1)
