"""``fit --seeds --launcher``: seeds as submitit jobs, through submitit's real local executor.

No mock of submitit: the jobs are submitit-local processes (its controller and job process, which
runs the seed's fit as a subprocess), and pre-emption is the signal submitit's own executor
sends a job at time-out, sent on cue instead of on a timer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from tests.commands.test_sweep import _check_sweep, _runs
from tests.helpers import TINY

from covr_lightning.cli import main
from covr_lightning.commands.cluster import JobPool, parse_launcher

JOBS = [
    "fit",
    "--recipe",
    "quickstart",
    *TINY,
    "covr.enabled=false",
    "--launcher",
    "submitit-local",
]
"""A tiny plain-SAC fit per seed, each a submitit-local job."""
ROOT = Path("runs") / "covr-quickstart"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--seeds", "1,2", "--launcher", "slurm"],
            "--launcher slurm needs SLURM's sbatch on PATH",
        ),
        (["--seeds", "1", "--slurm", "partition=gpu"], "--slurm partition=gpu without a cluster"),
        (["--launcher", "slurm"], "--launcher slurm without --seeds"),
        (["--seeds", "1", "--launcher", "submitit-local", "--slurm", "partiton=gpu"], "no such"),
        (["--seeds", "1", "--launcher", "slurm", "--slurm", "timeout_min=4h"], "takes an integer"),
        (["--seeds", "1", "--launcher", "slurm", "--slurm", "gpu"], "is not KEY=VALUE"),
        (["--seeds", "1", "--launcher", "slurm", "--slurm", "tasks_per_node=2"], "one process"),
    ],
)
def test_cluster_mistakes_are_one_line_and_exit_2_and_write_nothing(
    args, message, workdir, capsys, monkeypatch
):
    monkeypatch.setenv("PATH", str(workdir))  # no sbatch here, wherever the tests run
    assert main(["fit", "--recipe", "quickstart", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Fix:" in err[0], err
    if "sbatch" in message:
        assert "--launcher submitit-local" in err[0]  # the way to test the same path here
    assert sorted(p.name for p in workdir.iterdir()) == []  # no runs/, no MLflow store


def test_without_submitit_the_line_names_the_extra(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # what an uninstalled package imports as
    assert main(["fit", "--recipe", "quickstart", "--seeds", "1", "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'covr-lightning[cluster]'" in err[0], err


def test_dry_run_shows_the_launcher_and_its_parameters(workdir, capsys):
    argv = ["fit", "--recipe", "quickstart", "--seeds", "1-3", "--dry-run"]
    argv += ["--launcher", "slurm", "--slurm", "partition=gpu", "--slurm", "timeout_min=240"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table may wrap long cells
    assert "1, 2, 3 (all at once, one slurm job each)" in out
    assert "partition=gpu" in out and "timeout_min=240" in out
    assert "submitit" in out and not (workdir / "runs").exists()


def _record(name: str) -> dict:
    return json.loads((ROOT / name / "sweep.json").read_text())


@pytest.mark.timeout(300)  # a job that never ends must not hang the suite
def test_two_seeds_as_jobs_finish_under_one_parent(workdir, capsys):
    argv = [*JOBS, "run.total_env_steps=400", "run.name=j", "--seeds", "1,2"]
    assert main([*argv, "--slurm", "partition=gpu", "--slurm", "timeout_min=30"]) == 0
    err = capsys.readouterr().err

    _check_sweep("j", [1, 2])  # both children FINISHED under one parent with the aggregate
    record = _record("j")
    assert record["launcher"] == "submitit-local" and record["status"] == "FINISHED"
    for run in record["runs"]:
        job_id = run["job_id"]
        assert run["status"] == "FINISHED" and job_id
        assert err.count(f"job {job_id} RUNNING") == 1  # one line per state change, no flood
        job_log = (ROOT / "j" / "submitit" / f"{job_id}_0_log.out").read_text()
        assert f"--parent-run-id {record['parent_run_id']}" in job_log  # a --parallel child's
        assert "the fit exited with code 0" in job_log
        assert "done: 400 env steps" in (Path(run["run_dir"]) / "fit.log").read_text()
    assert "seed 1 |" not in err  # the fits' output stays in their fit.log


def _job_process(controller_pid: int) -> int:
    """The process submitit-local's controller runs the job in (the one it signals at time-out)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == controller_pid:
            return int(stat.parent.name)
    raise AssertionError(f"no process under submitit's controller {controller_pid}")


def _cue(steps: list[tuple[Callable[[], bool], Callable[[], None]]]) -> threading.Thread:
    """A thread that runs each action once its condition holds, in order (each within 120 s)."""

    def follow() -> None:
        for condition, action in steps:
            deadline = time.monotonic() + 120
            while not condition():
                if time.monotonic() > deadline:
                    return  # the test's assertions report what did not happen
                time.sleep(0.1)
            action()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job process in /proc")
def test_a_preempted_job_resumes_and_ctrl_c_stops_then_resume_finishes(workdir, capsys):
    argv = [*JOBS, "run.total_env_steps=2000", "run.name=p", "--seeds", "1"]
    fit_log = ROOT / "p-seed1" / "fit.log"

    def log_has(text: str) -> Callable[[], bool]:
        return lambda: fit_log.is_file() and text in fit_log.read_text()

    def preempt() -> None:  # what the controller does at time-out, and SLURM at its --signal
        controller = int(_record("p")["runs"][0]["job_id"])
        os.kill(_job_process(controller), signal.SIGUSR2)

    cue = _cue(
        [
            (log_has("checkpoints/env_step_000000200"), preempt),  # a fit in its loop
            (log_has("resumed from"), lambda: os.kill(os.getpid(), signal.SIGTERM)),  # Ctrl-C
        ]
    )
    assert main(argv) == 130  # stopped by the second cue, after the requeued job resumed
    cue.join(timeout=5)
    err = capsys.readouterr().err
    assert "asking the jobs to checkpoint and stop" in err

    text = fit_log.read_text()
    resumed = re.findall(r"resumed from \S+ at env step ([\d,]+)", text)
    assert len(resumed) == 1 and 200 <= int(resumed[0].replace(",", "")) < 2000, text
    assert text.count("interrupted: writing a checkpoint") == 2  # pre-emption, then Ctrl-C
    record = _record("p")
    assert record["status"] == "KILLED" and record["runs"][0]["status"] == "KILLED"
    job_log = (ROOT / "p" / "submitit" / f"{record['runs'][0]['job_id']}_0_log.out").read_text()
    assert "the requeued job resumes from the last checkpoint" in job_log
    assert "Requeued job" in job_log  # submitit's own requeue of the same job, not a new job
    assert "the sweep asked its jobs to stop" in job_log
    assert _runs()["p"].info.status == "KILLED"

    assert main([*argv, "--resume", "last"]) == 0
    text = fit_log.read_text()
    assert len(re.findall("resumed from", text)) == 2 and "done: 2,000 env steps" in text
    runs = _runs()
    parent, child = runs["p"], runs["p-seed1"]
    assert parent.info.run_id == record["parent_run_id"]  # the same parent, reopened
    assert parent.info.status == child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["sweep/final/eval/return_n"] == 1
    experiment = mlflow.get_experiment_by_name("covr-quickstart").experiment_id
    children = mlflow.search_runs([experiment], "attributes.run_name = 'p-seed1'")
    assert len(children) == 1  # every attempt continued the seed's one MLflow run


def _fake_slurm(folder: Path, sbatch: str) -> None:
    """``srun`` and ``sbatch`` stand-ins on ``PATH`` (submitit's SLURM executor calls them)."""
    folder.mkdir()
    for tool, body in (("srun", "exit 0"), ("sbatch", sbatch)):
        (folder / tool).write_text(f"#!/bin/sh\n{body}\n")
        (folder / tool).chmod(0o755)


def test_slurm_parameters_reach_the_sbatch_script(workdir, monkeypatch):
    _fake_slurm(workdir / "bin", 'echo "Submitted batch job 4242"')
    monkeypatch.setenv("PATH", f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}")
    items = ["partition=gpu", "gpus_per_node=1", "cpus-per-task=8", "mem_gb=64", "account=rl"]
    launcher = parse_launcher("slurm", [*items, "timeout_min=240", "signal_delay_s=120"])
    launcher.check_reachable()
    pool = JobPool(launcher, workdir / "submitit", print)
    job = pool.executor.submit(pool.job(1, ["python", "-V"], "runs/x/q-seed1", resume=False))
    assert job.job_id == "4242"
    script = job.paths.submission_file.read_text()
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--account=rl",
        "--time=240",
        "--signal=USR2@120",  # the job's checkpoint() waits up to 110 s of these 120
    ):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert launcher.stop_wait_s == 110


def test_a_job_the_scheduler_refuses_is_a_failed_seed(workdir, monkeypatch):
    refuse = 'echo "sbatch: error: invalid partition specified: gpux" >&2; exit 1'
    _fake_slurm(workdir / "bin", refuse)
    monkeypatch.setenv("PATH", f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}")
    lines, ended = [], []
    pool = JobPool(parse_launcher("slurm", ["partition=gpux"]), workdir / "submitit", lines.append)
    job = pool.job(3, ["python", "-V"], "runs/x/q-seed3", resume=False)
    pool.run([job], 1, submitted=lambda seed, job_id: None, ended=lambda *a: ended.append(a))
    assert ended == [(3, 2)]  # a user error, as a fit's exit 2
    assert lines == [
        "seed 3: the job was refused: sbatch: error: invalid partition specified: gpux"
    ]


def test_importing_submitit_leaves_the_processs_log_handlers_open(tmp_path):
    # submitit's import-time dictConfig closes every existing handler; absl's (dm_control's)
    # closes its stream with it, which once closed pytest's captured stderr mid-suite.
    script = (
        "import logging, sys\n"
        f"handler = logging.FileHandler({str(tmp_path / 'a.log')!r})\n"
        "logging.getLogger('user').addHandler(handler)\n"
        "from covr_lightning.commands.cluster import _import_submitit\n"
        "_import_submitit('slurm')\n"
        "sys.exit(0 if handler.stream is not None else 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
