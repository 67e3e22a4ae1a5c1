"""Ctrl-C and SIGTERM during training stop at a safe point, never inside a library's write."""

from __future__ import annotations

import os
import signal

import mlflow
import pytest
from tests.helpers import TINY

from covr_lightning.cli import EXIT_INTERRUPTED, main
from covr_lightning.loop.checkpoint import latest_checkpoint
from covr_lightning.loop.interrupt import (
    deferred_interrupts,
    raise_if_stop_requested,
    stop_requested,
)
from covr_lightning.tracking.mlflow import MLflowTracker


def test_the_first_signal_is_a_request_the_second_stops_at_once():
    with deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)  # handled before kill() returns to Python code
        assert stop_requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_request_is_honoured_once_and_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with deferred_interrupts():
        raise_if_stop_requested()  # nothing requested: no effect
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            raise_if_stop_requested()
        raise_if_stop_requested()  # honoured once
        assert not stop_requested()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigterm_inside_an_mlflow_write_lets_the_write_finish(workdir, monkeypatch, capsys):
    """The signal lands as ``log_metrics`` starts; the write completes, the loop checkpoints at
    the next agent step and the run is marked KILLED. (Raised inside SQLite's transaction, the
    interrupt used to leave the database locked, so that even the status could not be written.)"""
    original = MLflowTracker.log_metrics
    signalled_at = []

    def signal_then_log(self, metrics, step):
        if step >= 200 and "rl/critic_loss" in metrics and not signalled_at:
            signalled_at.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, metrics, step)

    monkeypatch.setattr(MLflowTracker, "log_metrics", signal_then_log)
    argv = ["fit", "--recipe", "quickstart", *TINY, "covr.enabled=false", "run.name=stopped"]
    assert main([*argv, "run.total_env_steps=2000"]) == EXIT_INTERRUPTED
    assert "interrupted: writing a checkpoint" in capsys.readouterr().err
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(client.get_experiment_by_name("covr-quickstart").experiment_id)
    assert run.info.status == "KILLED"
    history = client.get_metric_history(run.info.run_id, "rl/critic_loss")
    assert signalled_at[0] in [m.step for m in history]  # the write the signal met went through
    run_dir = workdir / "runs" / "covr-quickstart" / "stopped"
    stopped_at = int(latest_checkpoint(run_dir).name.split("_")[-1])
    assert signalled_at[0] <= stopped_at < 2000
