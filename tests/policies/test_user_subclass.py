"""A policy subclass from the user's own module (outside the package) runs through the COVR loop.

The module is written into a temporary folder and put on ``sys.path``, as a user's ``my_pkg``
would be; the recipe picks the class with ``policy.class_path`` and its own ``__init__`` argument
becomes a validated recipe key.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from tests.helpers import TINY

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe
from covr_lightning.errors import ConfigError
from covr_lightning.loop.checkpoint import latest_checkpoint, read_state

MODULE = "covr_user_policy"
CLASS_PATH = f"{MODULE}.BrightnessSAC"
SOURCE = '''
"""A user's policy: SAC with a random brightness change per sample, and a prior counter."""

import torch

from covr_lightning.policies.sac import SACPolicyModule


class BrightnessSAC(SACPolicyModule):
    def __init__(self, obs_shape, action_dim, *, max_change: float = 0.2, **sac_kwargs):
        super().__init__(obs_shape, action_dim, **sac_kwargs)
        self.max_change = max_change
        self.prior_calls = 0  # actor updates that received the VLM prior

    def augment(self, obs):
        scale = 1 + (torch.rand(obs.shape[0], 1, 1, 1, device=obs.device) * 2 - 1) * self.max_change
        return (obs.float() * scale).clamp(0, 255)

    def actor_loss(self, batch, prior=None):
        if prior is not None:
            self.prior_calls += 1
        return super().actor_loss(batch, prior)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write the user's module outside the package and make it importable."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(MODULE)
    monkeypatch.setitem(sys.modules, MODULE, module)  # removed again after the test
    return module


def _cfg(*overrides: str):
    return load_recipe(
        "quickstart",
        [*TINY, f"policy.class_path={CLASS_PATH}", "tracking.enabled=false", *overrides],
    )


def test_user_subclass_fits_and_resumes_through_class_path(user_module, workdir):
    base = ["covr.enabled=false", "policy.max_change=0.3", "run.name=user"]
    loop = build_loop(_cfg(*base, "run.total_env_steps=120"))  # updates from env step 80
    assert type(loop.module) is user_module.BrightnessSAC
    assert loop.module.max_change == 0.3  # the subclass's own key, from the recipe
    loop.fit()
    assert loop.updates > 0 and loop.module.update_step == loop.updates
    checkpoint = latest_checkpoint(loop.run_dir)
    assert read_state(checkpoint, fix="")["policy_class"] == CLASS_PATH

    # --resume last with a larger budget: the subclass comes back with its weights and counters.
    resumed = build_loop(_cfg(*base, "run.total_env_steps=200"), resume="last")
    assert type(resumed.module) is user_module.BrightnessSAC
    assert resumed.module.update_step == loop.module.update_step
    for a, b in zip(
        resumed.module.state_dict().values(), loop.module.state_dict().values(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    resumed.fit()
    assert resumed.env_steps >= 200 and resumed.updates > loop.updates


def test_unknown_key_of_a_user_subclass_is_a_config_error(user_module):
    with pytest.raises(ConfigError, match="unknown recipe key 'policy.max_chang'") as err:
        _cfg("policy.max_chang=0.3")
    assert "max_change" in err.value.fix


def test_user_subclass_gets_the_vlm_prior_in_guided_rounds(user_module, workdir):
    loop = build_loop(
        _cfg(
            "run.total_env_steps=160",
            "covr.psi_0=80",  # rounds 0-80 and 80-160 (updates from 80), one fine-tune between
            "covr.cold_start_rounds=0",  # guided from the start
            "covr.vlm_image_size=56",
            "vlm.init_args.lora_rank=4",
            "vlm.init_args.lora_alpha=8",
            "sft.init_args.eddf_mode=top_k",
            "sft.init_args.eddf_quantile=0.5",
            "run.name=user-covr",
        )
    )
    loop.fit()
    assert loop.module.prior_calls > 0  # actor_loss received batch["prior"] / ["prior_mask"]
    assert (loop.run_dir / "adapters" / "round_0").is_dir()  # and the VLM was fine-tuned
