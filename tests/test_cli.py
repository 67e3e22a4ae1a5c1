"""`covr-lightning` end to end: dry run, training, resume after a kill, one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

import covr_lightning
from covr_lightning.cli import main
from covr_lightning.loop.checkpoint import STATE_FILE, latest_checkpoint
from tests.helpers import TINY


def _env() -> dict[str, str]:
    """The test's environment, with this checkout's package importable from any folder."""
    package_root = str(Path(covr_lightning.__file__).resolve().parents[1])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covr_lightning", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )


def test_recipes_lists_packaged_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart.yaml" in out and "dmc_cheetah.yaml" in out


def test_dry_run_prints_config_and_plan(capsys, workdir):
    assert main(["fit", "--recipe", "dmc_cheetah", "--dry-run", "run.seed=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "class_path: covr_lightning.policies.rad.RADModule" in out
    assert "100,000 env steps (25,000 agent steps, action repeat 4)" in out
    assert "COVR rounds" in out and "50,000 - 100,000" in out  # the schedule table
    assert not (workdir / "runs").exists()


def test_overrides_may_sit_between_flags_in_order(capsys, workdir):
    argv = ["fit", "--recipe", "quickstart", "run.seed=5", "--dry-run", "run.seed=7", "run.name=x"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and "name: x" in out  # the later override of a key wins


def test_an_unknown_flag_between_overrides_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--recipe", "quickstart", "run.seed=5", "--dryrun", "run.name=x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --dryrun" in err and "run.name=x" not in err


def test_dry_run_plan_uses_the_per_task_action_repeat(capsys, workdir):
    assert main(["fit", "--recipe", "quickstart", "--dry-run", "env.action_repeat=null"]) == 0
    assert "(2,500 agent steps, action repeat 8)" in capsys.readouterr().out  # cartpole: 8


def test_fit_trains_logs_and_checkpoints(capsys, workdir):
    assert main(["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=400"]) == 0
    run_dir = workdir / "runs" / "covr-quickstart" / "quickstart"
    assert latest_checkpoint(run_dir).name == "env_step_000000400"
    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("covr-quickstart").experiment_id]
    )
    assert [r.info.status for r in runs] == ["FINISHED"]
    err = capsys.readouterr().err
    assert "eval return" in err and "done: 400 env steps" in err


def test_fresh_run_refuses_to_overwrite_a_run(capsys, workdir):
    args = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=200"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_killed_run_resumes_and_reaches_the_budget(workdir):
    args = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=1600"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "covr_lightning", *args], stderr=subprocess.DEVNULL, env=_env()
    )
    run_dir = workdir / "runs" / "covr-quickstart" / "quickstart"
    deadline = time.time() + 240
    while latest_checkpoint(run_dir) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(run_dir).name.split("_")[-1])
    assert 0 < killed_at < 1600

    done = _cli(*args, "--resume", "last")
    assert done.returncode == 0, done.stderr
    assert f"resumed from {latest_checkpoint(run_dir).parent}" not in done.stderr  # sanity
    assert f"at env step {killed_at:,}" in done.stderr
    assert latest_checkpoint(run_dir).name == "env_step_000001600"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "nope"], "no recipe 'nope'"),
        (["--recipe", "quickstart", "policy.actor_lr=fast"], "expects a number > 0"),
        (["--recipe", "quickstart", "policy.typo=1"], "unknown recipe key 'policy.typo'"),
        (["--recipe", "quickstart", "run.dir=/proc/forbidden"], "cannot write the run directory"),
        (["--recipe", "quickstart", "--resume", "last"], "no checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, workdir):
    result = _cli("fit", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_exits_2_and_keeps_files(workdir):
    args = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=200"]
    assert main(args) == 0
    checkpoint = latest_checkpoint(workdir / "runs" / "covr-quickstart" / "quickstart")
    (checkpoint / STATE_FILE).write_bytes(b"\x00garbage")
    result = _cli(*args, "--resume", "last")
    assert result.returncode == 2
    assert "corrupt or unreadable" in result.stderr and "Traceback" not in result.stderr
    assert (checkpoint / STATE_FILE).read_bytes() == b"\x00garbage"  # nothing deleted


def test_debug_shows_the_traceback(workdir):
    result = _cli("fit", "--recipe", "nope", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_bug_in_a_command_keeps_its_traceback(monkeypatch, capsys):
    """Errors by kind: only ConfigError becomes one line; our own bugs propagate."""
    import covr_lightning.commands.recipes as recipes_command

    def broken(args):
        raise RuntimeError("a bug in the package")

    monkeypatch.setattr(recipes_command, "run", broken)
    with pytest.raises(RuntimeError, match="a bug in the package"):
        main(["recipes"])
    assert "error:" not in capsys.readouterr().err


def test_diverged_training_exits_2_and_keeps_the_last_good_checkpoint(capsys, workdir, monkeypatch):
    (workdir / "exploding.py").write_text(
        "from covr_lightning.policies.sac import SACPolicyModule\n"
        "class ExplodingSAC(SACPolicyModule):\n"
        "    def critic_loss(self, batch):\n"
        "        loss, metrics = super().critic_loss(batch)\n"
        "        if self.update_step >= 20:\n"
        "            loss = loss * float('nan')\n"
        "            metrics['critic_loss'] = loss.detach()\n"
        "        return loss, metrics\n"
    )
    monkeypatch.syspath_prepend(str(workdir))
    args = [
        "fit",
        "--recipe",
        "quickstart",
        *TINY,
        "run.total_env_steps=800",
        "policy.class_path=exploding.ExplodingSAC",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "training diverged: critic_loss is nan" in err[-1] and "Fix:" in err[-1]
    checkpoint = latest_checkpoint(workdir / "runs" / "covr-quickstart" / "quickstart")
    assert checkpoint.name == "env_step_000000200"  # written before the NaN, left intact
    assert (checkpoint / STATE_FILE).is_file()


def test_sigterm_writes_a_checkpoint_then_resume_finishes(workdir):
    args = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=2000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "covr_lightning", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    run_dir = workdir / "runs" / "covr-quickstart" / "quickstart"
    deadline = time.time() + 240
    while latest_checkpoint(run_dir) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    first = latest_checkpoint(run_dir).name
    time.sleep(1.0)  # mid-episode, between periodic checkpoints
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: writing a checkpoint" in err
    stopped_at = int(latest_checkpoint(run_dir).name.split("_")[-1])
    assert stopped_at > int(first.split("_")[-1])

    done = _cli(*args, "--resume", "last")
    assert done.returncode == 0, done.stderr
    assert f"at env step {stopped_at:,}" in done.stderr
    assert latest_checkpoint(run_dir).name == "env_step_000002000"
