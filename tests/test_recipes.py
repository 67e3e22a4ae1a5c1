"""Every shipped recipe loads, validates, documents itself and reaches an update on CPU."""

from __future__ import annotations

import pytest

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe, packaged_recipes_dir

RECIPES = sorted(
    p.relative_to(packaged_recipes_dir()).as_posix() for p in packaged_recipes_dir().rglob("*.yaml")
)

# Ablations are the quickstart with other sft keys (tests/test_ablation_recipes.py checks that);
# CARLA recipes need a server, so tests/envs/test_carla.py trains them against the fake client.
BASE_RECIPES = [name for name in RECIPES if not name.startswith(("ablations/", "carla_"))]


def test_recipes_are_found():
    assert "quickstart.yaml" in RECIPES and "dmc_cheetah.yaml" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_has_a_launch_header(name):
    cfg = load_recipe(name)
    assert cfg.run.total_env_steps > cfg.run.seed_env_steps
    header = (packaged_recipes_dir() / name).read_text().split("\n\n")[0]
    assert (
        header.startswith("#")
        and "covr-lightning fit --recipe" in (packaged_recipes_dir() / name).read_text()
    )


@pytest.mark.parametrize("name", BASE_RECIPES)
def test_recipe_smoke_run_reaches_an_update(name, workdir):
    cfg = load_recipe(name)
    repeat = cfg.env.init_args.action_repeat
    cfg = load_recipe(
        name,
        [
            f"run.seed_env_steps={2 * repeat}",
            f"run.total_env_steps={6 * repeat}",
            "run.eval_episodes=1",
            f"env.max_episode_env_steps={6 * repeat}",
            "replay.batch_size=4",
            "tracking.enabled=false",
            # Paper recipes name hub VLMs; the smoke run swaps in the tiny offline one.
            "vlm.backbone=tiny-qwen2.5-vl",
            "covr.vlm_image_size=56",
        ],
    )
    loop = build_loop(cfg)
    loop.fit()
    assert loop.updates >= 3
    assert loop.module.update_step == loop.updates
