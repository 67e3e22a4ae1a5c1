"""The Fabric training loop: whole-state resume is exact, metrics reach MLflow by env step."""

from __future__ import annotations

import math

import mlflow
import torch
from tests.helpers import TINY

from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe
from covr_lightning.loop.checkpoint import latest_checkpoint
from covr_lightning.loop.rl_loop import RLLoop
from covr_lightning.tracking.progress import TrainingProgress


def _fit(total: int, name: str, resume=None) -> RLLoop:
    cfg = load_recipe(
        "quickstart",
        [*TINY, "covr.enabled=false", f"run.total_env_steps={total}", f"run.name={name}"],
    )
    loop = build_loop(cfg, resume=resume)
    assert type(loop) is RLLoop
    loop.fit()
    return loop


def test_resumed_run_matches_an_uninterrupted_one(workdir, capsys):
    straight = _fit(800, "straight")
    _fit(400, "split")  # stops at an episode end, like a run killed after its checkpoint
    resumed = _fit(800, "split", resume="last")
    err = capsys.readouterr().err
    assert "resumed with a changed setting: run.total_env_steps 400 -> 800" in err
    assert "at env step 400" in err  # it continued from the checkpoint, not from scratch
    assert resumed.env_steps == straight.env_steps == 800
    assert resumed.updates == straight.updates
    assert len(resumed.replay) == len(straight.replay)
    for name, value in straight.module.state_dict().items():
        other = resumed.module.state_dict()[name]
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.equal(value, other), name


def test_metrics_are_logged_against_env_steps(workdir):
    loop = _fit(400, "metrics")
    client = mlflow.MlflowClient()
    run = client.get_run(loop.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["env.domain"] == "cartpole"
    episode_steps = [
        m.step for m in client.get_metric_history(loop.mlflow_run_id, "rl/episode_return")
    ]
    assert episode_steps == [200, 400]
    eval_steps = [m.step for m in client.get_metric_history(loop.mlflow_run_id, "eval/return")]
    assert eval_steps[0] == 8 and eval_steps[-1] == 400  # first agent step, then the end
    critic = client.get_metric_history(loop.mlflow_run_id, "rl/critic_loss")
    assert critic and all(math.isfinite(m.value) for m in critic)
    assert latest_checkpoint(loop.run_dir).name == "env_step_000000400"
    assert (loop.run_dir / "config.yaml").is_file()


def test_training_in_rounds_equals_one_call(workdir):
    """COVR calls train_until once per round; rounds ending mid-episode must not cut episodes."""

    def trained(targets: list[int], name: str) -> RLLoop:
        cfg = load_recipe(
            "quickstart",
            [*TINY, "covr.enabled=false", "tracking.enabled=false", f"run.name={name}"],
        )
        loop = build_loop(cfg)
        with TrainingProgress(targets[-1]) as loop.progress:
            for target in targets:
                loop.train_until(target)
        return loop

    once = trained([400], "once")
    rounds = trained([120, 280, 400], "rounds")  # 120 and 280 fall mid-episode (episodes: 200)
    assert (rounds.episodes, rounds.env_steps) == (once.episodes, once.env_steps) == (2, 400)
    for name, value in once.module.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.equal(value, rounds.module.state_dict()[name]), name
