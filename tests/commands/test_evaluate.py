"""`covr-lightning evaluate`: seeded returns, the run's own eval/return reproduced, MLflow logging,
video, no VLM, one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from tests.helpers import TINY

from covr_lightning.cli import main
from covr_lightning.commands.evaluate import (
    METRIC_MEAN,
    METRIC_STD,
    agent_fps,
    count_video_frames,
    evaluate_checkpoint,
)
from covr_lightning.errors import ConfigError
from covr_lightning.loop.checkpoint import STATE_FILE, latest_checkpoint

RUN = Path("runs") / "covr-quickstart" / "quickstart"


def train_tiny_run(base: Path, covr: bool = False) -> Path:
    """A 400-env-step quickstart run under ``base`` (trained once per test session).

    Returns:
        The folder holding ``runs/`` and ``mlflow.db`` (the run's working directory).
    """
    folder = base / ("covr-run" if covr else "plain-run")
    if (folder / RUN / "checkpoints" / "last").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    extra = ["covr.psi_0=200", "covr.sft_min_steps=5"] if covr else ["covr.enabled=false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        args = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=400", *extra]
        assert main(args) == 0
    return folder


def enter(folder: Path, monkeypatch) -> Path:
    """Work inside a trained run's folder with its MLflow store; returns the run directory."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    return folder / RUN


@pytest.fixture
def plain_run(tmp_path_factory, monkeypatch) -> Path:
    """The run directory of a tiny plain-SAC run, with cwd and MLflow pointed at it."""
    return enter(train_tiny_run(tmp_path_factory.getbasetemp()), monkeypatch)


def _training_run_id(run_dir: Path) -> str:
    state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)
    return state["mlflow_run_id"]


def test_same_seed_gives_identical_returns(plain_run):
    first = evaluate_checkpoint(plain_run, episodes=2, seed=7, log=False)
    second = evaluate_checkpoint(plain_run, episodes=2, seed=7, log=False)
    assert first.returns == second.returns
    assert len(first.returns) == 2
    # Episode i depends on (seed, i) only, not on how many episodes are asked for.
    assert evaluate_checkpoint(plain_run, episodes=1, seed=7, log=False).returns == [
        first.returns[0]
    ]


def test_evaluate_reproduces_the_eval_return_the_run_logged(plain_run):
    """Defaults (the run's seed and episode count) give exactly the run's last eval/return."""
    run_id = _training_run_id(plain_run)
    logged = mlflow.MlflowClient().get_metric_history(run_id, "eval/return")
    final = max(logged, key=lambda m: m.step)
    assert final.step == 400  # the final evaluation, at the step of the last checkpoint
    result = evaluate_checkpoint(plain_run, log=False)
    assert len(result.returns) == 1  # TINY's run.eval_episodes
    assert result.mean == final.value
    # Another seed gives other episodes: the match above is not a coincidence of the env.
    assert evaluate_checkpoint(plain_run, seed=5, log=False).mean != final.value


def test_evaluate_logs_to_the_training_run(plain_run, capsys):
    assert main(["evaluate", "--checkpoint", str(plain_run), "--episodes", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "return mean" in out and "episode" in out
    run_id = _training_run_id(plain_run)
    assert f"to run {run_id}" in out
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, METRIC_MEAN)
    assert [m.step for m in history] == [400]  # keyed by the checkpoint's env step
    assert client.get_metric_history(run_id, METRIC_STD)
    expected = evaluate_checkpoint(plain_run, episodes=2, seed=3, log=False)
    assert history[0].value == pytest.approx(expected.mean)


def test_evaluate_starts_a_new_run_when_the_training_run_is_missing(
    plain_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    result = evaluate_checkpoint(plain_run, episodes=1, seed=1)
    assert "logged to a new run" in capsys.readouterr().out
    client = mlflow.MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "covr-quickstart"
    assert run.data.metrics[METRIC_MEAN] == pytest.approx(result.mean)
    assert run.info.status == "FINISHED"


def test_video_is_valid_and_has_one_frame_per_agent_step_plus_reset(plain_run, capsys):
    assert main(["evaluate", "--checkpoint", str(plain_run), "--episodes", "1", "--video"]) == 0
    out = capsys.readouterr().out
    videos = list((plain_run / "evaluate").glob("*.mp4"))
    assert len(videos) == 1 and str(videos[0].name) in out.replace("\n", "")
    # TINY: 200 env steps per episode at action repeat 8 = 25 agent steps -> 26 frames.
    assert count_video_frames(videos[0]) == 26

    import imageio.v2 as imageio

    with imageio.get_reader(videos[0]) as reader:
        frame = reader.get_data(0)
    assert frame.shape == (256, 256, 3)
    artifacts = mlflow.MlflowClient().list_artifacts(_training_run_id(plain_run), "evaluate")
    assert [Path(a.path).name for a in artifacts] == [videos[0].name]


def test_checkpoint_dir_and_state_file_resolve_like_the_run_dir(plain_run):
    checkpoint = latest_checkpoint(plain_run)
    by_run = evaluate_checkpoint(plain_run, episodes=1, seed=2, log=False).returns
    assert evaluate_checkpoint(checkpoint, episodes=1, seed=2, log=False).returns == by_run
    by_file = evaluate_checkpoint(checkpoint / STATE_FILE, episodes=1, seed=2, log=False)
    assert by_file.returns == by_run


@pytest.mark.parametrize("problem", ["missing", "not-a-run", "corrupt", "no-config"])
def test_bad_checkpoint_is_one_line_and_exit_2(plain_run, tmp_path, capsys, problem):
    if problem == "missing":
        target = tmp_path / "nope"
    elif problem == "not-a-run":
        target = tmp_path
    else:
        copy = tmp_path / "copy" / "run"
        shutil.copytree(plain_run, copy, ignore=shutil.ignore_patterns("replay"))
        target = latest_checkpoint(copy)
        if problem == "corrupt":
            (target / STATE_FILE).write_bytes(b"not a checkpoint")
        else:
            (copy / "config.yaml").unlink()
    assert main(["evaluate", "--checkpoint", str(target), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covr-lightning: error: ") and err.count("\n") == 1
    assert "Fix:" in err


def test_covr_run_evaluates_without_building_the_vlm(tmp_path_factory, monkeypatch, capsys):
    run_dir = enter(train_tiny_run(tmp_path_factory.getbasetemp(), covr=True), monkeypatch)
    state = torch.load(latest_checkpoint(run_dir) / STATE_FILE, weights_only=True)
    assert "covr" in state  # the checkpoint does hold an adapter, which evaluate must ignore

    from covr_lightning.vlm.module import VLMLoRAModule

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate built the VLM")

    monkeypatch.setattr(VLMLoRAModule, "__init__", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", "--checkpoint", str(run_dir), "--episodes", "2"]) == 0
    assert "return mean" in capsys.readouterr().out


def test_evaluate_vlm_reproduces_the_vlm_eval_return_the_run_logged(tmp_path_factory, monkeypatch):
    """--vlm plays the checkpoint's adapter as training's vlm/eval_return did (same seeds)."""
    run_dir = enter(train_tiny_run(tmp_path_factory.getbasetemp(), covr=True), monkeypatch)
    run_id = _training_run_id(run_dir)
    logged = mlflow.MlflowClient().get_metric_history(run_id, "vlm/eval_return")
    assert [m.step for m in logged] == [0, 200]  # before any fine-tune, after round 0's
    result = evaluate_checkpoint(run_dir, episodes=2, vlm=True, log=False)
    assert result.actor == "vlm" and 0.0 <= result.invalid_rate <= 1.0
    assert result.mean == pytest.approx(logged[-1].value)
    # The round-0 adapter folder is the same adapter (no fine-tune after round 0 in this run).
    folder = run_dir / "adapters" / "round_0"
    assert evaluate_checkpoint(
        run_dir, episodes=2, vlm=True, adapter=folder, log=False
    ).returns == (result.returns)
    with pytest.raises(ConfigError, match="adapter_model.safetensors"):
        evaluate_checkpoint(run_dir, vlm=True, adapter=run_dir, log=False)


def test_evaluate_vlm_of_a_run_without_covr_is_one_line_and_exit_2(plain_run, capsys):
    assert main(["evaluate", "--checkpoint", str(plain_run), "--vlm"]) == 2
    err = capsys.readouterr().err
    assert "holds no VLM adapter" in err and "Traceback" not in err


def test_video_frame_rate_is_simulated_real_time():
    from covr_lightning.envs.car_racing import CarRacingEnv
    from covr_lightning.envs.dmc import DMCEnv

    cartpole = DMCEnv("cartpole", "swingup", image_size=32, action_repeat=8)
    assert agent_fps(cartpole) == pytest.approx(1 / (0.01 * 8))  # 10 ms control step
    racing = CarRacingEnv(action_repeat=4)
    assert agent_fps(racing) == pytest.approx(50 / 4)
