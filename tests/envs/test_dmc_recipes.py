"""The nine DMC recipes of the paper carry its protocol; every packaged recipe dry-runs.

The expected values are written out by hand from the paper summary and ``docs/method.md`` (budget,
per-task action repeat, COVR on RAD's number), not read back from ``PAPER_ACTION_REPEAT``, so a
recipe and the env defaults drifting together still fail here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

from covr_lightning.build import build_env
from covr_lightning.cli import main
from covr_lightning.config import load_recipe, packaged_recipes_dir
from covr_lightning.envs.dmc import DMCEnv, default_action_repeat


class PaperTask(NamedTuple):
    domain: str
    task: str
    action_repeat: int
    total_env_steps: int
    covr: int  # COVR on RAD, paper mean
    base: int | None  # RAD alone (cross-baseline table), where the paper has it


PAPER_TASKS: dict[str, PaperTask] = {
    "dmc_cartpole_swingup": PaperTask("cartpole", "swingup", 8, 100_000, 872, 694),
    "dmc_reacher_easy": PaperTask("reacher", "easy", 4, 100_000, 969, None),
    "dmc_cheetah": PaperTask("cheetah", "run", 4, 100_000, 504, 364),
    "dmc_walker_walk": PaperTask("walker", "walk", 2, 100_000, 802, 552),
    "dmc_finger_spin": PaperTask("finger", "spin", 2, 100_000, 976, None),
    "dmc_ball_in_cup_catch": PaperTask("ball_in_cup", "catch", 4, 100_000, 960, None),
    "dmc_hopper_hop": PaperTask("hopper", "hop", 2, 500_000, 188, None),
    "dmc_walker_run": PaperTask("walker", "run", 2, 500_000, 485, None),
    "dmc_pendulum_swingup": PaperTask("pendulum", "swingup", 2, 500_000, 792, None),
}

ALL_RECIPES = sorted(
    p.relative_to(packaged_recipes_dir()).as_posix() for p in packaged_recipes_dir().rglob("*.yaml")
)
RECIPES_DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def test_the_nine_paper_tasks_have_one_recipe_each():
    assert {f"{name}.yaml" for name in PAPER_TASKS} <= set(ALL_RECIPES)
    assert len({(t.domain, t.task) for t in PAPER_TASKS.values()}) == 9


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_paper_recipe_has_the_paper_protocol(name):
    paper = PAPER_TASKS[name]
    cfg = load_recipe(name)
    run, env = cfg.run, cfg.env.init_args
    assert (env.domain, env.task) == (paper.domain, paper.task)
    assert run.name == f"dmc-{paper.domain.replace('_', '-')}-{paper.task}"
    assert cfg.tracking.experiment == "covr-dmc"
    assert run.total_env_steps == paper.total_env_steps
    assert (run.eval_every_env_steps, run.eval_episodes) == (10_000, 10)
    assert run.checkpoint_every_env_steps == 10_000
    assert env.action_repeat == paper.action_repeat
    assert run.seed_env_steps == 1000 * paper.action_repeat  # RAD: 1000 random agent steps

    # RAD: render 100, random 84 crops, batch 512, lr 2e-4 for cheetah and 1e-3 elsewhere.
    policy = cfg.policy.init_args
    assert cfg.policy.class_path == "covr_lightning.policies.rad.RADModule"
    assert (env.obs, env.image_size, env.frame_stack) == ("pixels", 100, 3)
    assert (policy.augmentation, policy.crop_size) == ("crop", 84)
    lr = 2e-4 if paper.domain == "cheetah" else 1e-3
    assert (policy.actor_lr, policy.critic_lr) == (lr, lr)
    assert cfg.replay.init_args.batch_size == 512
    assert cfg.replay.init_args.capacity >= run.total_env_steps // paper.action_repeat

    # COVR and its VLM as the paper's DMC runs.
    covr, vlm = cfg.covr, cfg.vlm.init_args
    assert covr.enabled and covr.prior_weight == 1.0 and covr.cold_start_rounds == 4
    assert (covr.psi_0, covr.growth) == (5000, "factorial")
    assert cfg.vlm.class_path == "covr_lightning.vlm.module.VLMLoRAModule"
    assert (vlm.backbone, vlm.lora_rank, vlm.lora_alpha) == ("qwen2.5-vl-3b", 128, 16)


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_paper_recipe_header_names_the_paper_number(name):
    first_line = (packaged_recipes_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert f"{PAPER_TASKS[name].total_env_steps // 1000}k env steps" in first_line
    assert re.search(rf"\bpaper: [^)]*\b{PAPER_TASKS[name].covr}\)", first_line), first_line


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_paper_recipe_env_has_the_task_action_space_and_repeat(name):
    # Imported here, after covr_lightning.envs: that picks dm_control's headless GL backend.
    from dm_control import suite

    paper = PAPER_TASKS[name]
    spec_env = suite.load(paper.domain, paper.task)
    try:
        spec = spec_env.action_spec()
    finally:
        spec_env.close()
    env = build_env(load_recipe(name), seed=0)
    try:
        assert isinstance(env, DMCEnv)
        assert env.action_space.shape == spec.shape
        assert env.observation_space.shape == (9, 100, 100)
        assert env.action_repeat == paper.action_repeat == default_action_repeat(paper.domain)
        env.reset(seed=0)
        _, _, _, _, info = env.step(env.action_space.sample())
        assert info["env_steps"] == env.env_steps == paper.action_repeat
    finally:
        env.close()


def test_docs_list_every_paper_task_with_its_numbers():
    if not RECIPES_DOC.is_file():
        pytest.skip("docs/ is not next to tests/ (installed package)")
    section = RECIPES_DOC.read_text().split("## DMC paper tasks", 1)[1].split("\n## ", 1)[0]
    rows = {
        line.split("|")[1].strip(" `"): line for line in section.splitlines() if "`dmc_" in line
    }
    assert set(rows) == set(PAPER_TASKS)
    for name, paper in PAPER_TASKS.items():
        cells = [cell.strip() for cell in rows[name].split("|")[1:-1]]
        assert cells[1] == f"{paper.domain} / {paper.task}"
        assert cells[2:4] == [str(paper.action_repeat), f"{paper.total_env_steps // 1000}k"]
        assert cells[6].startswith(f"{paper.covr} ")
        assert cells[7] == ("none" if paper.base is None else str(paper.base))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_dry_run_prints_the_recipe_and_its_env(name, capsys, workdir):
    cfg = load_recipe(name)
    assert main(["fit", "--recipe", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"class_path: {cfg.env.class_path}" in out
    assert "training plan" in out and f"{cfg.run.total_env_steps:,} env steps" in out
    assert not (workdir / "runs").exists()
