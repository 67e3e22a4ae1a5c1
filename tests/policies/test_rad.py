"""RADModule: networks sized for the augmented view, acting on raw renders, training under Fabric."""

from __future__ import annotations

import lightning
import numpy as np
import pytest
import torch

from covr_lightning.envs.dmc import DMCEnv
from covr_lightning.errors import ConfigError
from covr_lightning.policies.augment import center_crop
from covr_lightning.policies.rad import RADModule

TINY_NET = {"feature_dim": 16, "num_filters": 8, "hidden_dim": 32}


def _batch(obs_shape, action_dim: int, size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randint(0, 256, (size, *obs_shape), dtype=torch.uint8, generator=g),
        "next_obs": torch.randint(0, 256, (size, *obs_shape), dtype=torch.uint8, generator=g),
        "action": torch.rand(size, action_dim, generator=g) * 2 - 1,
        "reward": torch.rand(size, generator=g),
        "terminated": torch.zeros(size),
    }


@pytest.mark.parametrize(
    ("augmentation", "side"), [("shift", 100), ("crop", 84), ("translate", 108)]
)
def test_networks_are_built_for_the_post_augmentation_size(augmentation, side):
    m = RADModule((9, 100, 100), 2, augmentation=augmentation, **TINY_NET)
    assert m.obs_shape == (9, 100, 100)
    assert m.network_obs_shape == m.encoder.obs_shape == (9, side, side)
    assert m.target_encoder.obs_shape == (9, side, side)


def test_crop_trains_under_fabric_and_acts_on_raw_100px_env_frames():
    torch.manual_seed(0)
    env = DMCEnv("cartpole", "swingup", image_size=100, max_episode_env_steps=40, seed=0)
    obs_shape = tuple(env.observation_space.shape)
    assert obs_shape == (9, 100, 100)
    action_dim = int(env.action_space.shape[0])
    m = RADModule(obs_shape, action_dim, augmentation="crop", crop_size=84, **TINY_NET)
    fabric = lightning.Fabric(accelerator="cpu", devices=1)
    module, *_ = fabric.setup(m, *m.configure_optimizers())
    metrics = module.training_step(_batch(obs_shape, action_dim))
    assert np.isfinite(list(metrics.values())).all() and m.update_step == 1

    obs, _ = env.reset(seed=0)
    action = m.act(obs, deterministic=True)  # the raw 100 px frame stack, straight from the env
    assert action.shape == (action_dim,) and np.abs(action).max() <= 1
    np.testing.assert_array_equal(action, m.act(obs, deterministic=True))
    # acting sees exactly the centre crop: the same action as the networks on that window
    with torch.no_grad():
        window = center_crop(torch.as_tensor(obs)[None], 84)
        expected = m.actor(m.encoder(window), deterministic=True)[0][0].numpy()
    np.testing.assert_allclose(action, expected, rtol=0, atol=1e-6)
    assert m.q_value(torch.as_tensor(obs)[None]).shape == (1,)
    with pytest.raises(ValueError, match="expected"):
        m.act(np.zeros((9, 84, 84), np.uint8))  # an already-cropped frame is not an env frame
    env.close()


def test_translate_trains_a_step():
    m = RADModule((9, 32, 32), 1, augmentation="translate", translate_size=36, **TINY_NET)
    assert np.isfinite(list(m.training_step(_batch((9, 32, 32), 1)).values())).all()
    assert m.act(np.zeros((9, 32, 32), np.uint8)).shape == (1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"augmentation": "crop", "crop_size": 120}, "crop_size 120"),
        ({"augmentation": "translate", "translate_size": 90}, "translate_size 90"),
        ({"augmentation": "flip"}, "unknown augmentation"),
        ({"augmentation": "shift", "shift_pad": -1}, "shift_pad"),
    ],
)
def test_sizes_that_do_not_fit_the_render_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RADModule((9, 100, 100), 1, **kwargs, **TINY_NET)
