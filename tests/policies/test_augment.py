"""Augmentations: shapes, per-sample offsets, the eval-time centre transforms, one offset per transition."""

from __future__ import annotations

import pytest
import torch

from covr_lightning.errors import ConfigError
from covr_lightning.policies.augment import (
    center_crop,
    center_translate,
    random_crop,
    random_shift,
    random_translate,
)
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


# ---------------------------------------------------------------- crop and translate (RAD)
def _ramp_pair(batch: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """obs = ramp + 1 and next_obs = ramp + 101: every pixel says where it came from, never 0."""
    obs = _ramp(batch, size) + 1
    return obs, obs + 100


def _crop_offset(frame: torch.Tensor, size: int = 12, base: int = 1) -> tuple[int, int]:
    value = int(frame[0, 0, 0]) - base  # top-left pixel of the window
    return value // size, value % size


def _translate_offset(frame: torch.Tensor) -> tuple[int, int]:
    nonzero = frame[0].nonzero()  # the image is all non-zero, the canvas around it zero
    return int(nonzero[:, 0].min()), int(nonzero[:, 1].min())


def test_random_crop_shape_dtype_and_window_content():
    obs = _ramp(32) + 1
    out = random_crop(obs, 8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (32, 6, 8, 8) and out.dtype == torch.uint8
    offsets = []
    for b in range(32):
        top, left = _crop_offset(out[b])
        assert 0 <= top <= 4 and 0 <= left <= 4
        assert torch.equal(out[b], obs[b, :, top : top + 8, left : left + 8])
        offsets.append((top, left))
    assert len(set(offsets)) > 8  # per-sample offsets
    assert torch.equal(out[:, 0], out[:, 5])  # the stacked frames of a sample move together


def test_random_translate_shape_dtype_and_placement():
    obs = _ramp(32) + 1
    out = random_translate(obs, 16, generator=torch.Generator().manual_seed(0))
    assert out.shape == (32, 6, 16, 16) and out.dtype == torch.uint8
    offsets = []
    for b in range(32):
        dy, dx = _translate_offset(out[b])
        assert 0 <= dy <= 4 and 0 <= dx <= 4
        assert torch.equal(out[b, :, dy : dy + 12, dx : dx + 12], obs[b])  # the whole frame
        assert int(out[b].sum()) == int(obs[b].sum())  # and nothing else: zeros around it
        offsets.append((dy, dx))
    assert len(set(offsets)) > 8


def test_random_augmentations_follow_the_generator_or_the_global_seed():
    obs = _ramp(16) + 1
    for fn, size in ((random_crop, 8), (random_translate, 16), (random_shift, 2)):
        a = fn(obs, size, generator=torch.Generator().manual_seed(3))
        b = fn(obs, size, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b), fn.__name__
        torch.manual_seed(5)
        c = fn(obs, size)
        torch.manual_seed(5)
        assert torch.equal(c, fn(obs, size)), fn.__name__


def test_full_size_crop_and_translate_are_identity():
    obs = _ramp(3)
    assert torch.equal(random_crop(obs, 12), obs)
    assert torch.equal(random_translate(obs, 12), obs)


def test_sizes_that_do_not_fit_raise():
    obs = _ramp(2)
    with pytest.raises(ValueError, match="at least"):
        random_crop(obs, 13)
    with pytest.raises(ValueError, match="at most"):
        random_translate(obs, 11)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_crop(obs[0], 8)


def test_eval_transforms_are_deterministic_and_centred():
    obs = torch.randint(0, 256, (4, 9, 100, 100), dtype=torch.uint8)
    crop = center_crop(obs, 84)
    assert torch.equal(crop, obs[:, :, 8:92, 8:92])  # (100 - 84) // 2 = 8
    assert torch.equal(center_crop(obs, 84), crop)
    canvas = center_translate(obs, 108)
    assert canvas.shape == (4, 9, 108, 108) and canvas.dtype == torch.uint8
    assert torch.equal(canvas[:, :, 4:104, 4:104], obs)  # (108 - 100) // 2 = 4
    assert int(canvas.sum()) == int(obs.sum())


# ---------------------------------------------------------------- one offset per transition
class _Capture(RADModule):
    """Records the augmented batch the losses see."""

    def critic_loss(self, batch):
        self.seen = (batch["obs"].clone(), batch["next_obs"].clone())
        return super().critic_loss(batch)


@pytest.mark.parametrize(
    ("augmentation", "offset_of"),
    [("crop", _crop_offset), ("translate", _translate_offset)],
)
def test_training_step_gives_obs_and_next_obs_of_a_sample_the_same_offset(augmentation, offset_of):
    torch.manual_seed(0)
    module = _Capture(
        (6, 12, 12),
        1,
        augmentation=augmentation,
        crop_size=8,
        translate_size=16,
        num_conv_layers=1,
        num_filters=4,
        hidden_dim=8,
        feature_dim=4,
    )
    obs, next_obs = _ramp_pair(32)
    batch = {
        "obs": obs,
        "next_obs": next_obs,
        "action": torch.zeros(32, 1),
        "reward": torch.zeros(32),
        "terminated": torch.zeros(32),
    }
    module.training_step(batch)
    seen_obs, seen_next = module.seen
    side = 8 if augmentation == "crop" else 16
    assert seen_obs.shape == seen_next.shape == (32, 6, side, side)
    if augmentation == "crop":
        pairs = [(offset_of(seen_obs[b]), offset_of(seen_next[b], base=101)) for b in range(32)]
    else:
        pairs = [(offset_of(seen_obs[b]), offset_of(seen_next[b])) for b in range(32)]
    assert all(a == b for a, b in pairs)  # the same offset for obs and next_obs of a sample
    assert len({a for a, _ in pairs}) > 8  # and different ones across samples
