"""One MLflow run per fit: resolved config as params and artifact, metrics keyed by env step.

The default store is ``sqlite:///mlflow.db`` in the working directory (MLflow's own default since
3.7, so a plain ``mlflow ui`` there shows the runs); ``MLFLOW_TRACKING_URI`` or ``tracking.uri``
override it. A resumed fit continues the MLflow run it started. A fit that is one seed of a sweep
(``fit --seeds``) is a child run: ``parent_run_id`` adds MLflow's ``mlflow.parentRunId`` tag, so the
MLflow UI nests it under the sweep's parent run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from covr_lightning.errors import ConfigError
from covr_lightning.tracking.curves import RunCurve

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
_MAX_PARAM_LENGTH = 6000  # MLflow 3 param value limit
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a child under its parent


def resolve_tracking_uri(uri: str = "") -> str:
    """``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"policy": {"init_args": {"lr": 1e-3}}}`` -> ``{"policy.lr": "0.001"}``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if key == "init_args":
            flat.update(flatten(value, prefix))
            continue
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value)[:_MAX_PARAM_LENGTH]
    return flat


class MLflowTracker:
    """Logs one fit to one MLflow run through :class:`mlflow.MlflowClient`.

    Args:
        experiment: Experiment name (created if missing).
        uri: Tracking URI (see :func:`resolve_tracking_uri`).
        enabled: When ``False`` every method is a no-op, so the loop never branches on tracking.
        parent_run_id: Run id of a seed sweep's parent; a new run becomes its child.
    """

    def __init__(
        self,
        experiment: str,
        uri: str = "",
        enabled: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.run_id: str | None = None
        self._client = None

    def start(
        self,
        run_name: str,
        config: dict[str, Any],
        config_file: Path | None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Open a new run (or reopen ``run_id`` when resuming) and log the config once.

        Args:
            run_name: MLflow run name.
            config: Nested config, logged as flattened dotted params.
            config_file: Logged as an artifact (``None``: none).
            run_id: Reopen this run instead of creating one (resume); nothing is logged again.
            tags: Tags of a new run (plus ``mlflow.parentRunId`` when ``parent_run_id`` is set).

        Raises:
            ConfigError: The tracking store cannot be opened or written.
        """
        if not self.enabled:
            return None
        import mlflow
        from mlflow.entities import Param

        # Store creation logs schema migrations at INFO; the run's own lines say what matters.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        try:
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            experiment = self._client.get_experiment_by_name(self.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self._client.create_experiment(self.experiment)
            )
            tags = dict(tags or {})
            if self.parent_run_id:
                tags[PARENT_RUN_TAG] = self.parent_run_id
            run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        except Exception as err:  # MLflow raises MlflowException, sqlalchemy and OS errors
            raise ConfigError(
                f"cannot open the MLflow store {self.uri} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]})",
                "set tracking.uri or MLFLOW_TRACKING_URI to a writable store, "
                "or tracking.enabled=false",
            ) from err
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(config).items()]
        for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(
                self.run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH]
            )
        if config_file is not None:
            self._client.log_artifact(self.run_id, str(config_file))
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` (always env steps)."""
        if not self.enabled or self.run_id is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        if self.enabled and self.run_id is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) tags of the run."""
        if self.enabled and self.run_id is not None:
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, value)

    def delete_tags(self, keys: list[str]) -> None:
        """Remove tags of the run that are set (MLflow refuses to delete a missing tag)."""
        if self.enabled and self.run_id is not None:
            present = self._client.get_run(self.run_id).data.tags
            for key in keys:
                if key in present:
                    self._client.delete_tag(self.run_id, key)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run with ``FINISHED``, ``KILLED`` or ``FAILED``."""
        if self.enabled and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)


def log_evaluation(
    uri: str,
    experiment: str,
    run_id: str | None,
    metrics: dict[str, float],
    step: int,
    artifacts: list[tuple[Path, str]] = (),
    new_run_name: str = "",
    tags: dict[str, str] | None = None,
    say=print,
) -> str:
    """Log an evaluation to the training run, or to a new run of its experiment.

    Args:
        uri: Tracking URI of the store.
        experiment: The training run's experiment (where a new run goes).
        run_id: The training run; used when it is in the store and active.
        metrics: Scalars to log at ``step``.
        step: The evaluated checkpoint's env step.
        artifacts: ``(local file, artifact folder)`` pairs.
        new_run_name: Name of the run created when ``run_id`` is not usable.
        tags: Tags of a created run.
        say: Where the line naming the run goes.

    Returns:
        The id of the run logged to.

    Raises:
        ConfigError: The store cannot be opened or written.
    """
    import mlflow
    from mlflow.entities import Metric

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        target = None
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    target = run.info.run_id
            except Exception:  # MlflowException: not in this store
                target = None
        created = target is None
        if created:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            target = client.create_run(
                experiment_id, run_name=new_run_name, tags=dict(tags or {})
            ).info.run_id
            say(
                f"MLflow: the training run {run_id or '(none recorded)'} is not in {uri}; "
                f"logged to a new run {target} of experiment '{experiment}'"
            )
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        client.log_batch(target, metrics=batch)
        for path, folder in artifacts:
            client.log_artifact(target, str(path), folder)
        if created:
            client.set_terminated(target, status="FINISHED")
    except Exception as err:  # MLflow raises MlflowException, sqlalchemy and OS errors
        raise ConfigError(
            f"cannot log to the MLflow store {uri} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''})",
            "set MLFLOW_TRACKING_URI to the store the run used, or pass --no-log",
        ) from err
    if not created:
        say(f"MLflow: logged {', '.join(metrics)} to run {target} ({uri})")
    return target


# --------------------------------------------------------------------------- reading runs back

SWEEP_TAG = "covr.sweep"
"""Tag of a seed sweep's parent run (``fit --seeds``): it holds aggregates, not a seed's curve."""


def is_sweep_parent(tags: dict[str, str]) -> bool:
    """Whether a run is the parent of a seed sweep (never compared as a run of its own)."""
    return str(tags.get(SWEEP_TAG)).strip().lower() in ("true", "1", "yes")


def read_curve(client, run, metric: str) -> RunCurve | None:
    """One run's history of ``metric`` from MLflow; ``None`` when it never logged it."""
    if metric not in run.data.metrics:
        return None
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run.info.run_id, metric):
        # A resumed run may log a step twice: the later value wins.
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    steps = np.array(sorted(by_step), dtype=float)
    values = np.array([by_step[int(s)][1] for s in steps], dtype=float)
    return RunCurve(run.info.run_id, run.info.run_name or "", dict(run.data.params), steps, values)


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every run of an experiment matching ``filter_string`` (MLflow pages by 1000)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_runs(
    experiment: str, metric: str, include_unfinished: bool = False, uri: str = ""
) -> list[RunCurve]:
    """Read the metric history of every (finished) run of ``experiment``.

    Parents of seed sweeps (tag ``covr.sweep``) are left out: they hold the sweep's aggregates,
    and their children (``<name>-seedS``) are the runs.

    Raises:
        ConfigError: Unknown experiment, no finished runs, or the metric was never logged.
    """
    uri = resolve_tracking_uri(uri)
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise ConfigError(
            f"no MLflow experiment {experiment!r} in {uri} (experiments: "
            f"{', '.join(known) or 'none'})",
            "pass --experiment with one of those names (tracking.experiment of the recipe), "
            "or point MLFLOW_TRACKING_URI at the store the runs were logged to",
        )
    runs = [
        r for r in search_all_runs(client, found.experiment_id) if not is_sweep_parent(r.data.tags)
    ]
    statuses = [r.info.status for r in runs]
    if not include_unfinished:
        runs = [r for r in runs if r.info.status == "FINISHED"]
    if not runs:
        raise ConfigError(
            f"experiment {experiment!r} has no finished runs ({len(statuses)} runs: "
            f"{', '.join(sorted(set(statuses))) or 'none'})",
            "let a fit finish, or pass --include-unfinished",
        )
    curves, seen_metrics = [], set()
    for run in runs:
        seen_metrics.update(run.data.metrics)
        if (curve := read_curve(client, run, metric)) is not None:
            curves.append(curve)
    if not curves:
        raise ConfigError(
            f"metric {metric!r} was never logged by the runs of {experiment!r} (logged: "
            f"{', '.join(sorted(seen_metrics)[:12]) or 'nothing'})",
            "pass --metric with a logged key (see docs/metrics.md), e.g. --metric eval/return",
        )
    return curves


def finished_child_curves(
    uri: str, experiment: str, parent_run_id: str, names: list[str], metric: str
) -> list[RunCurve]:
    """The latest finished child run of ``parent_run_id`` per run name in ``names``, as curves."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    children = search_all_runs(
        client,
        found.experiment_id,
        f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
    )
    latest: dict[str, Any] = {}
    for child in children:
        name = child.info.run_name
        if name not in latest or child.info.start_time > latest[name].info.start_time:
            latest[name] = child
    curves = [read_curve(client, latest[n], metric) for n in names if n in latest]
    return [c for c in curves if c is not None]


def _client(uri: str):
    """An MLflow client of ``uri``, with the store's schema-migration logging quieted."""
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow.MlflowClient(tracking_uri=uri)
