"""GPU paths of the SAC update (skipped where no CUDA device exists, e.g. CI)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Fabric

from covr_lightning.policies.sac import SACPolicyModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_update_under_fabric_on_cuda(precision):
    fabric = Fabric(accelerator="cuda", devices=1, precision=precision)
    module = SACPolicyModule((9, 64, 64), 2, hidden_dim=64)
    module, *_ = fabric.setup(module, *module.configure_optimizers())
    batch = {
        "obs": torch.randint(0, 256, (16, 9, 64, 64), dtype=torch.uint8),
        "next_obs": torch.randint(0, 256, (16, 9, 64, 64), dtype=torch.uint8),
        "action": torch.rand(16, 2) * 2 - 1,
        "reward": torch.rand(16),
        "terminated": torch.zeros(16),
    }
    metrics = module.training_step(fabric.to_device(batch), 0)
    assert all(math.isfinite(v) for v in metrics.values())
    action = module.module.act(batch["obs"][0].numpy(), deterministic=True)
    assert action.shape == (2,) and abs(action).max() <= 1


@pytest.mark.parametrize(
    ("class_path", "kwargs", "side"),
    [
        ("covr_lightning.policies.rad.RADModule", {"augmentation": "crop", "crop_size": 84}, 100),
        ("covr_lightning.policies.rad.RADModule", {"augmentation": "translate"}, 100),
        ("covr_lightning.policies.deepmdp.DeepMDPModule", {}, 84),
    ],
)
def test_rad_and_deepmdp_update_and_act_on_cuda_in_bf16(class_path, kwargs, side):
    from covr_lightning.config import import_class

    fabric = Fabric(accelerator="cuda", devices=1, precision="bf16-mixed")
    module = import_class(class_path)((9, side, side), 2, hidden_dim=64, **kwargs)
    module, *_ = fabric.setup(module, *module.configure_optimizers())
    batch = {
        "obs": torch.randint(0, 256, (16, 9, side, side), dtype=torch.uint8),
        "next_obs": torch.randint(0, 256, (16, 9, side, side), dtype=torch.uint8),
        "action": torch.rand(16, 2) * 2 - 1,
        "reward": torch.rand(16),
        "terminated": torch.zeros(16),
    }
    metrics = module.training_step(fabric.to_device(batch), 0)
    assert all(math.isfinite(v) for v in metrics.values())
    action = module.module.act(batch["obs"][0].numpy(), deterministic=True)  # raw env size
    assert action.shape == (2,) and abs(action).max() <= 1
