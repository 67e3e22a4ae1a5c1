"""``covr-lightning compare``: IQM and bootstrap CIs by hand, and a compare over real tiny fits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from tests.helpers import TINY

from covr_lightning.cli import main
from covr_lightning.policies.rad import RADModule
from covr_lightning.policies.sac import SACPolicyModule
from covr_lightning.tracking.compare import group_value
from covr_lightning.tracking.curves import RunCurve
from covr_lightning.tracking.reference import base_algorithm, paper_number
from covr_lightning.tracking.stats import bootstrap_ci, iqm


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    # sorted: -1000, 0, | 0, 10, 10, 10, | 10, 1000 -> (0 + 10 + 10 + 10) / 4
    assert iqm(np.array([0, 0, 10, 10, 10, 10, 1000, -1000])) == pytest.approx(7.5)
    assert iqm(np.array([7.0])) == pytest.approx(7.0)


def test_bootstrap_ci_contains_the_point_and_collapses_on_equal_values():
    values = np.arange(1, 9, dtype=float)
    point, low, high = bootstrap_ci(values, "iqm")
    assert point == pytest.approx(4.5)
    assert 1.0 <= low < point < high <= 8.0
    assert bootstrap_ci(values, "iqm") == (point, low, high)  # seeded: reproducible
    mean, mean_low, mean_high = bootstrap_ci(values, "mean")
    assert mean == pytest.approx(4.5) and mean_low < 4.5 < mean_high
    assert bootstrap_ci(np.full(5, 3.0), "iqm") == pytest.approx((3.0, 3.0, 3.0))
    assert bootstrap_ci(np.array([2.0]), "mean") == pytest.approx((2.0, 2.0, 2.0))


def test_value_at_env_step_is_the_last_logged_at_or_before():
    run = RunCurve("id", "n", {}, np.array([400.0, 800.0]), np.array([1.0, 2.0]))
    assert run.at(399) is None
    assert run.at(400) == 1.0 and run.at(799) == 1.0 and run.at(5000) == 2.0
    assert run.final() == 2.0
    assert run.auc() == pytest.approx(1.5)  # a straight line from 1 to 2
    assert RunCurve("id", "n", {}, np.array([0.0]), np.array([4.0])).auc() == 4.0


def test_grouping_and_paper_numbers():
    assert group_value({"run.name": "q-seed3"}, "run.name", "") == "q"
    assert group_value({"run.name": "cheetah_seed12"}, "run.name", "") == "cheetah"
    assert group_value({}, "covr.enabled", "") == "-"
    cheetah = {"env.domain": "cheetah", "env.task": "run"}
    rad = "covr_lightning.policies.rad.RADModule"
    assert paper_number({**cheetah, "policy.class_path": rad, "covr.enabled": "True"}).startswith(
        "504 (COVR on RAD"
    )
    assert paper_number({**cheetah, "policy.class_path": rad, "covr.enabled": "False"}).startswith(
        "364 (RAD"
    )
    sac = "covr_lightning.policies.sac.SACPolicyModule"
    assert paper_number({**cheetah, "policy.class_path": sac, "covr.enabled": "False"}).startswith(
        "118 (SAC"
    )
    assert (
        paper_number({"env.domain": "reacher", "env.task": "easy", "policy.class_path": sac}) == ""
    )


def _eval_histories(experiment: str) -> dict[str, list[tuple[int, float]]]:
    """``run name -> [(env step, eval/return)]`` read straight from MLflow."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    return {
        run.info.run_name: sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/return")
        )
        for run in client.search_runs([found.experiment_id])
    }


def test_compare_over_a_real_tiny_seed_sweep(workdir, capsys):
    for seed in (1, 2):
        fit = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=400"]
        assert main([*fit, "covr.enabled=false", f"run.seed={seed}", f"run.name=q-seed{seed}"]) == 0
    capsys.readouterr()
    argv = ["compare", "--experiment", "covr-quickstart", "--group-by", "run.name,covr.enabled"]
    assert main([*argv, "--at-env-steps", "200,400", "--out", "cmp"]) == 0
    printed = capsys.readouterr().out
    assert "covr-quickstart" in printed and "iqm" in printed

    out = workdir / "cmp"
    for name in ("comparison.md", "comparison.csv", "learning_curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["run.name"], r["covr.enabled"], r["at"]) for r in rows] == [
        ("q", "False", "final"),
        ("q", "False", "auc"),
        ("q", "False", "200"),
        ("q", "False", "400"),
    ]
    final, auc = rows[0], rows[1]
    rows = [final, *rows[2:]]
    histories = _eval_histories("covr-quickstart")
    assert set(histories) == {"q-seed1", "q-seed2"}
    assert int(final["n"]) == 2
    last = [history[-1][1] for history in histories.values()]
    assert float(final["mean"]) == pytest.approx(np.mean(last))
    assert float(final["iqm_ci_low"]) <= float(final["iqm"]) <= float(final["iqm_ci_high"])
    at_200 = [[v for step, v in h if step <= 200][-1] for h in histories.values()]
    assert int(rows[1]["n"]) == 2
    assert float(rows[1]["mean"]) == pytest.approx(np.mean(at_200))
    assert float(rows[2]["mean"]) == pytest.approx(float(final["mean"]))
    assert final["paper"].startswith("237 (SAC")  # cartpole swingup, pixel SAC alone
    areas = [
        np.trapezoid([v for _, v in h], [s for s, _ in h]) / (h[-1][0] - h[0][0])
        for h in histories.values()
    ]
    assert float(auc["mean"]) == pytest.approx(np.mean(areas))
    assert "| q | False | final |" in (out / "comparison.md").read_text()


def test_compare_unknown_experiment_is_one_line_and_exit_2(workdir, capsys):
    assert main(["compare", "--experiment", "no-such-experiment"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no-such-experiment" in err and "Fix:" in err


def test_carla_runs_get_the_scenario_numbers():
    assert paper_number({"env.scenario": "highway", "covr.enabled": "True"}).startswith(
        "248 reward / 259 distance (COVR, #HW)"
    )
    assert paper_number({"env.scenario": "highway", "covr.enabled": "False"}).startswith("69 ")
    assert paper_number({"env.scenario": "ghost_pedestrian", "covr.enabled": "True"}).startswith(
        "235 reward / 237 distance"
    )
    assert paper_number({"env.scenario": "ghost_pedestrian", "covr.enabled": "False"}) == ""


class GradientPenaltySAC(SACPolicyModule):
    """A user's SAC variant whose name contains neither "sac" alone nor the word RAD in a module."""


class MyAugmentedAgent(RADModule):
    """A user's RAD variant named without "rad"."""


def test_base_algorithm_comes_from_the_class_hierarchy():
    here = __name__
    assert base_algorithm(f"{here}.GradientPenaltySAC") == "SAC"
    assert base_algorithm(f"{here}.MyAugmentedAgent") == "RAD"
    assert base_algorithm("covr_lightning.policies.deepmdp.DeepMDPModule") == "DeepMDP"
    assert base_algorithm("covr_lightning.policies.sac.SACPolicyModule") == "SAC"
    assert base_algorithm("gone.module.RADThing") is None  # no longer importable: no crash
    assert base_algorithm("collections.OrderedDict") is None  # not a policy


def test_every_paper_number_names_its_table():
    from covr_lightning.tracking.reference import paper_numbers

    numbers = paper_numbers()
    assert len(numbers["dmc"]) == 15 and len(numbers["carla"]) == 3
    assert all(entry["table"] for entry in [*numbers["dmc"], *numbers["carla"]])
