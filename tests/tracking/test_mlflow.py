"""The MLflow tracker against a real SQLite store."""

from __future__ import annotations

import mlflow

from covr_lightning.tracking.mlflow import (
    DEFAULT_TRACKING_URI,
    PARENT_RUN_TAG,
    MLflowTracker,
    flatten,
    resolve_tracking_uri,
)


def test_flatten_drops_init_args_level():
    tree = {"policy": {"class_path": "a.B", "init_args": {"lr": 0.001}}, "run": {"seed": 1}}
    assert flatten(tree) == {"policy.class_path": "a.B", "policy.lr": "0.001", "run.seed": "1"}


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///explicit.db") == "sqlite:///explicit.db"


def test_run_logs_params_metrics_artifact_and_resumes(workdir):
    config_file = workdir / "config.yaml"
    config_file.write_text("run:\n  seed: 1\n")
    tracker = MLflowTracker("exp")
    run_id = tracker.start("r", {"run": {"seed": 1}}, config_file)
    tracker.log_metrics({"eval/return": 10.0}, step=4000)
    tracker.finish("KILLED")

    again = MLflowTracker("exp")
    assert again.start("r", {}, config_file, run_id=run_id) == run_id
    again.log_metrics({"eval/return": 20.0}, step=8000)
    again.finish()

    client = mlflow.MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(run_id)
    assert run.data.params["run.seed"] == "1"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "eval/return")
    assert [(m.step, m.value) for m in history] == [(4000, 10.0), (8000, 20.0)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_disabled_tracker_is_silent(workdir):
    tracker = MLflowTracker("exp", enabled=False)
    assert tracker.start("r", {}, workdir / "missing.yaml") is None
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.finish()
    assert not (workdir / "mlflow.db").exists()


def test_child_run_is_tagged_with_its_parent_and_tags_can_be_removed(workdir):
    config_file = workdir / "config.yaml"
    config_file.write_text("run:\n  seed: 1\n")
    parent = MLflowTracker("exp")
    parent_id = parent.start("sweep", {"run": {"seed": "1,2"}}, None, tags={"covr.sweep": "true"})
    parent.set_tags({"covr.failed_seeds": "2"})
    parent.delete_tags(["covr.failed_seeds", "never.set"])
    child = MLflowTracker("exp", parent_run_id=parent_id)
    child_id = child.start("sweep-seed1", {"run": {"seed": 1}}, config_file)

    client = mlflow.MlflowClient(tracking_uri=parent.uri)
    assert client.get_run(child_id).data.tags[PARENT_RUN_TAG] == parent_id
    tags = client.get_run(parent_id).data.tags
    assert PARENT_RUN_TAG not in tags and "covr.failed_seeds" not in tags
    assert tags["covr.sweep"] == "true"
    assert client.list_artifacts(parent_id) == []  # no config file given: no artifact
