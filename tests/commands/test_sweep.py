"""``fit --seeds``: parsing, the parent's aggregate by hand, and real tiny sweeps read from MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from tests.helpers import TINY

from covr_lightning.cli import main
from covr_lightning.commands.sweep import aggregate_metrics, parse_seeds
from covr_lightning.errors import ConfigError
from covr_lightning.tracking.curves import RunCurve
from covr_lightning.tracking.stats import iqm

SWEEP = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=200", "covr.enabled=false"]
"""A tiny plain-SAC fit: 200 env steps, evaluated at env steps 8 and 200."""


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("1,2,3") == [1, 2, 3]
    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("0, 3-4,10") == [0, 3, 4, 10]
    assert parse_seeds("7") == [7]
    for bad in ("1,x", "", "1,,2", "3-1", "-1", "1,1-2", "1.5"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_aggregate_is_across_seeds_at_each_env_step():
    a = RunCurve("a", "q-seed1", {}, np.array([0.0, 100.0, 200.0]), np.array([1.0, 3.0, 5.0]))
    b = RunCurve("b", "q-seed2", {}, np.array([0.0, 100.0, 200.0]), np.array([2.0, 5.0, 9.0]))
    c = RunCurve("c", "q-seed3", {}, np.array([0.0, 150.0]), np.array([0.0, 4.0]))  # shorter
    points = aggregate_metrics([a, b, c])
    assert sorted(points) == [0, 100, 150, 200]
    assert points[0]["sweep/eval/return_mean"] == pytest.approx(1.0)
    assert points[0]["sweep/eval/return_std"] == pytest.approx(1.0)  # ddof=1 of 1, 2, 0
    # At 150 a and b hold their step-100 values, c its own; at 200 c has ended (no extrapolation).
    assert points[150]["sweep/eval/return_mean"] == pytest.approx(4.0)
    assert points[150]["sweep/eval/return_median"] == pytest.approx(4.0)
    assert points[200]["sweep/eval/return_n"] == 2
    assert points[200]["sweep/eval/return_mean"] == pytest.approx(7.0)
    assert points[200]["sweep/eval/return_iqm"] == pytest.approx(iqm(np.array([5.0, 9.0])))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "1,x"], "'x' is not a seed"),
        (["--seeds", "1-2", "--parallel", "0"], "--parallel 0"),
        (["--seeds", "1,2", "run.seed=3"], "run.seed= override"),
        (["--parallel", "2"], "--parallel without --seeds"),
        (["--seeds", "1,2", "--resume", "last"], "no sweep to resume"),
        (["--seeds", "1,2", "--resume", "runs/x"], "a sweep resumes all its seeds"),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2(args, message, workdir, capsys):
    assert main(["fit", "--recipe", "quickstart", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Fix:" in err[0], err


def test_dry_run_prints_the_plan_with_the_seeds_and_runs_nothing(workdir, capsys):
    assert (
        main(["fit", "--recipe", "quickstart", "--seeds", "1-3", "--parallel", "2", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "name: quickstart" in out and "1, 2, 3 (2 at a time)" in out
    assert "quickstart-seed<S>" in out
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()


def _runs(experiment: str = "covr-quickstart") -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])  # newest first
    return {r.info.run_name: r for r in reversed(runs)}  # a re-run name keeps its newest run


def _final_eval_return(run_id: str) -> float:
    history = mlflow.MlflowClient().get_metric_history(run_id, "eval/return")
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def _check_sweep(name: str, seeds: list[int]) -> mlflow.entities.Run:
    """The parent and its children in MLflow; returns the parent."""
    runs = _runs()
    parent = runs[name]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["covr.sweep"] == "true"
    assert parent.data.params["run.seed"] == ",".join(map(str, seeds))
    children = [runs[f"{name}-seed{s}"] for s in seeds]
    for seed, child in zip(seeds, children, strict=True):
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["run.seed"] == str(seed)
    finals = [_final_eval_return(c.info.run_id) for c in children]
    metrics = parent.data.metrics
    assert metrics["sweep/final/eval/return_n"] == len(seeds)
    assert metrics["sweep/final/eval/return_mean"] == pytest.approx(np.mean(finals))
    assert metrics["sweep/final/eval/return_std"] == pytest.approx(np.std(finals, ddof=1))
    assert metrics["sweep/eval/return_mean"] == pytest.approx(np.mean(finals))  # last step
    artifacts = mlflow.MlflowClient().list_artifacts(parent.info.run_id, "comparison")
    assert {a.path for a in artifacts} == {
        "comparison/comparison.md",
        "comparison/comparison.csv",
        "comparison/learning_curves.png",
    }
    return parent


def test_sequential_and_parallel_sweeps_log_children_and_the_aggregate(workdir, capsys):
    assert main([*SWEEP, "run.name=q", "--seeds", "1,2"]) == 0
    assert main([*SWEEP, "run.name=p", "--seeds", "3-4", "--parallel", "2"]) == 0
    out, err = capsys.readouterr()
    assert "seed 3 | done: 200 env steps" in err and "seed 4 | done: 200 env steps" in err
    assert "database is locked" not in err

    _check_sweep("q", [1, 2])
    _check_sweep("p", [3, 4])
    root = workdir / "runs" / "covr-quickstart"
    for seed in (3, 4):  # a parallel child's whole output is in its fit.log
        assert "done: 200 env steps" in (root / f"p-seed{seed}" / "fit.log").read_text()
    record = json.loads((root / "p" / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["FINISHED", "FINISHED"]
    assert record["parent_run_id"] == _runs()["p"].info.run_id

    # compare: each sweep is one group of its 2 seeds; the parents are not runs of their own.
    assert main(["compare", "--experiment", "covr-quickstart", "--out", "cmp"]) == 0
    lines = (workdir / "cmp" / "comparison.csv").read_text().splitlines()
    assert [line.split(",")[:4] for line in lines[1:]] == [
        ["p", "final", "200", "2"],
        ["p", "auc", "200", "2"],
        ["q", "final", "200", "2"],
        ["q", "auc", "200", "2"],
    ]
    capsys.readouterr()
    argv = ["compare", "--experiment", "covr-quickstart", "--metric", "sweep/eval/return_mean"]
    assert main(argv) == 2  # only the parents log it, and they are left out
    assert "was never logged" in capsys.readouterr().err

    # A fresh sweep under a taken name is refused before anything runs.
    assert main([*SWEEP, "run.name=q", "--seeds", "1,2"]) == 2
    assert "already holds a sweep" in capsys.readouterr().err


FLAKY_ENV = """
from pathlib import Path
from covr_lightning.envs.dmc import DMCEnv

class FlakyDMC(DMCEnv):
    def reset(self, *, seed=None, options=None):
        if seed == 2 * 1_000_003 and Path("break-seed-2").exists():  # seed 2's first episode
            raise RuntimeError("seed 2 broke")
        return super().reset(seed=seed, options=options)
"""


def test_a_failed_seed_fails_the_parent_and_resume_finishes_the_sweep(workdir, capsys, monkeypatch):
    (workdir / "flaky.py").write_text(FLAKY_ENV)
    (workdir / "break-seed-2").write_text("")
    monkeypatch.syspath_prepend(str(workdir))
    argv = [*SWEEP, "env.class_path=flaky.FlakyDMC", "run.name=f", "--seeds", "2,1"]
    assert main(argv) == 1  # a crash, not a user error
    err = capsys.readouterr().err
    assert "RuntimeError: seed 2 broke" in err  # the crash is shown ...
    assert "seed 1: finished" in err  # ... and the next seed still ran
    assert "seed 2 of sweep f did not finish" in err.strip().splitlines()[-1]
    runs = _runs()
    parent = runs["f"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["covr.failed_seeds"] == "2"
    assert runs["f-seed2"].info.status == "FAILED"
    assert parent.data.metrics["sweep/final/eval/return_n"] == 1  # seed 1 only

    (workdir / "break-seed-2").unlink()
    assert main([*argv, "--resume", "last"]) == 0
    err = capsys.readouterr().err
    assert "seed 1 (" not in err  # finished seeds are kept, not run again
    parent = _check_sweep("f", [2, 1])
    assert parent.info.run_id == runs["f"].info.run_id  # the same parent run, reopened
    assert "covr.failed_seeds" not in parent.data.tags
