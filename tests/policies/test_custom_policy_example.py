"""examples/custom_policy.py: the cutout is what it says, and the class works from a recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from examples.custom_policy import CutoutSAC, random_cutout
from tests.helpers import TINY

from covr_lightning.config import load_recipe
from covr_lightning.errors import ConfigError


def test_random_cutout_blanks_one_rectangle_per_sample_on_all_channels():
    obs = torch.full((64, 6, 20, 20), 7, dtype=torch.uint8)
    out = random_cutout(obs, 4, 12, generator=torch.Generator().manual_seed(0))
    assert out.shape == obs.shape and out.dtype == obs.dtype
    assert torch.equal(out[:, 0], out[:, 5])  # the same cut on every channel of a sample
    blank = out[:, 0] == 0
    heights, widths = blank.any(2).sum(1), blank.any(1).sum(1)
    assert torch.equal(blank.sum((1, 2)), heights * widths)  # a rectangle
    assert heights.min() >= 4 and heights.max() <= 12 and widths.min() >= 4 and widths.max() <= 12
    assert len(set(zip(heights.tolist(), widths.tolist(), strict=True))) > 10


def test_cutout_sac_trains_and_acts():
    torch.manual_seed(0)
    m = CutoutSAC((9, 32, 32), 2, max_cut=8, feature_dim=8, num_filters=4, hidden_dim=16)
    batch = {
        "obs": torch.randint(0, 256, (4, 9, 32, 32), dtype=torch.uint8),
        "next_obs": torch.randint(0, 256, (4, 9, 32, 32), dtype=torch.uint8),
        "action": torch.zeros(4, 2),
        "reward": torch.ones(4),
        "terminated": torch.zeros(4),
    }
    assert np.isfinite(list(m.training_step(batch).values())).all()
    assert m.act(batch["obs"][0].numpy()).shape == (2,)
    with pytest.raises(ConfigError, match="max_cut"):
        CutoutSAC((9, 32, 32), 2, max_cut=40)


def test_the_documented_class_path_resolves_in_a_recipe():
    cfg = load_recipe(
        "quickstart",
        [*TINY, "policy.class_path=examples.custom_policy.CutoutSAC", "policy.max_cut=10"],
    )
    assert cfg.policy.class_path == "examples.custom_policy.CutoutSAC"
    assert cfg.policy.init_args.max_cut == 10
