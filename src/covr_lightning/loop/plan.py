"""The training plan a run prints before it starts (and ``--dry-run`` prints instead of training)."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import Namespace
from rich.table import Table

from covr_lightning.config import import_class
from covr_lightning.tracking.mlflow import resolve_tracking_uri


def resolved_action_repeat(cfg: Namespace) -> int:
    """The env's action repeat: the recipe's, or the env class's default for its task."""
    init_args = cfg.env.init_args.as_dict() if cfg.env.get("init_args") else {}
    return int(import_class(cfg.env.class_path).resolved_action_repeat(init_args))


def plan_table(cfg: Namespace, run_dir: Path) -> Table:
    """A two-column table: budget in env and agent steps, cadence, batch, where things go."""
    run, repeat = cfg.run, resolved_action_repeat(cfg)
    table = Table(title="training plan", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    agent = f"{run.total_env_steps // repeat:,} agent steps"
    table.add_row("budget", f"{run.total_env_steps:,} env steps ({agent}, action repeat {repeat})")
    warmup = f"{run.seed_env_steps:,} env steps of random actions"
    table.add_row("warm-up", warmup)
    envs = run.num_envs
    table.add_row("envs", f"{envs} ({'worker processes' if envs > 1 else 'in this process'})")
    updates = max(run.total_env_steps - run.seed_env_steps, 0) // repeat
    table.add_row("updates", f"{updates:,} (one per agent step after warm-up)")
    table.add_row("batch", str(cfg.replay.init_args.get("batch_size")))
    table.add_row("replay capacity", f"{cfg.replay.init_args.get('capacity'):,} transitions")
    table.add_row(
        "evaluation", f"every {run.eval_every_env_steps:,} env steps, {run.eval_episodes} episodes"
    )
    table.add_row(
        "checkpoints",
        f"every {run.checkpoint_every_env_steps:,} env steps (at episode ends), keep "
        f"{run.keep_checkpoints}",
    )
    table.add_row("policy", cfg.policy.class_path)
    table.add_row("env", f"{cfg.env.class_path} {dict(cfg.env.init_args.as_dict())}")
    table.add_row("device", f"{run.accelerator}, precision {run.precision}")
    covr = cfg.covr
    if covr.enabled:
        where = (
            "in this process, on the VLM's device"
            if covr.sft_strategy == "single"
            else f"{covr.sft_strategy} across {covr.sft_devices} spawned processes"
        )
        table.add_row("VLM fine-tune", where)
    table.add_row("run directory", str(run_dir))
    tracking = resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else "off"
    table.add_row("MLflow", f"{tracking} (experiment {cfg.tracking.experiment})")
    return table


def schedule_of(cfg: Namespace) -> Table | None:
    """COVR's round table for the recipe (None when ``covr.enabled`` is false)."""
    from covr_lightning.loop.schedule import plan_rounds, schedule_table

    covr = cfg.covr
    if not covr.enabled:
        return None
    rounds = plan_rounds(cfg.run.total_env_steps, covr.psi_0, covr.growth, covr.cold_start_rounds)
    return schedule_table(rounds, resolved_action_repeat(cfg))
