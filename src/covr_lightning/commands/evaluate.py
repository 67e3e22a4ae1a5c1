"""``covr-lightning evaluate``: the deterministic policy of a checkpoint, or (``--vlm``) its VLM.

Only the policy's weights are read from ``state.pt`` (memory-mapped); the VLM, its adapter, the
replay buffer and the optimizers are never built. The run's own ``config.yaml`` (two levels above
the checkpoint directory) rebuilds the env and the policy class through
:mod:`covr_lightning.build`.

Episodes run through the same runner and seeding as the training loop's evaluation
(:mod:`covr_lightning.loop.episodes`); the default seed is the run's evaluation seed, so
evaluating a checkpoint with the run's ``run.eval_episodes`` reproduces the ``eval/return`` the run
logged at that checkpoint's env step.

Video: ``--video`` records the first episode at ``video_size`` px: one frame after ``reset`` and
one after every agent step, so a video has ``agent steps + 1`` frames, played in simulated real
time (``1 / (control timestep x action repeat)`` frames per second).

``--vlm`` plays the checkpoint's VLM (the run's backbone with the LoRA adapter saved in the
checkpoint) as the policy instead, as the training loop's ``vlm/eval_return`` does: greedy,
queried every ``covr.guide_every`` frames at ``covr.vlm_image_size``, its action held in between.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from covr_lightning.build import (
    SavedRun,
    build_env,
    build_trained_policy,
    build_trained_vlm_guide,
    load_saved_run,
)
from covr_lightning.config import COVRConfig, TrackingConfig
from covr_lightning.envs.base import PixelEnv
from covr_lightning.errors import ConfigError
from covr_lightning.loop.episodes import (
    EpisodeResults,
    evaluation_seed,
    run_episodes,
    run_vlm_episodes,
)
from covr_lightning.tracking.mlflow import log_evaluation, resolve_tracking_uri

METRIC_MEAN = "evaluate/return_mean"
METRIC_STD = "evaluate/return_std"


@dataclass
class EvaluationResult(EpisodeResults):
    """The episodes of an evaluation, plus what ``evaluate`` wrote.

    Attributes:
        video: Path of the written video, if any.
        mlflow_run_id: The MLflow run the metrics went to (``None``: not logged).
        actor: ``policy`` or ``vlm``.
        invalid_rate: With ``vlm``: the share of the VLM's answers that could not be read.
    """

    video: Path | None = None
    mlflow_run_id: str | None = None
    actor: str = "policy"
    invalid_rate: float | None = None


# --------------------------------------------------------------------------- video


def _import_imageio():
    try:
        import imageio.v2 as imageio
    except ImportError as err:
        raise ConfigError(
            "--video needs the imageio package, which is not installed",
            "pip install 'imageio>=2.31' 'imageio-ffmpeg>=0.5'",
        ) from err
    return imageio


def _has_ffmpeg() -> bool:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or no binary for this platform
        return False
    return True


def agent_fps(env: PixelEnv) -> float:
    """Agent steps per second of simulated time, so that a video plays in real time."""
    return 1.0 / (float(env.control_timestep) * int(env.action_repeat))


def write_video(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    """Write ``frames`` as an MP4 (H.264 through imageio-ffmpeg), or a GIF without ffmpeg.

    Args:
        frames: ``(H, W, 3)`` uint8 frames (sides divisible by 16 avoid ffmpeg resizing).
        path: Target path; its suffix is replaced by ``.mp4`` or ``.gif``.
        fps: Frames per second.

    Returns:
        The written file. A GIF may hold fewer frames than given: Pillow merges identical
        consecutive frames into one longer frame.

    Raises:
        ConfigError: imageio is not installed.
    """
    imageio = _import_imageio()
    path.parent.mkdir(parents=True, exist_ok=True)
    if _has_ffmpeg():
        path = path.with_suffix(".mp4")
        writer = imageio.get_writer(
            path, fps=fps, codec="libx264", quality=8, macro_block_size=16, format="FFMPEG"
        )
        with writer:
            for frame in frames:
                writer.append_data(frame)
        return path
    path = path.with_suffix(".gif")
    imageio.mimsave(path, frames, format="GIF", duration=1000.0 / fps, loop=0)
    return path


def count_video_frames(path: Path) -> int:
    """Number of frames imageio decodes from a video file."""
    imageio = _import_imageio()
    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader)


# --------------------------------------------------------------------------- MLflow


def log_result(saved: SavedRun, result: EvaluationResult, say=print) -> str | None:
    """Log the metrics (and the video) to the training run, or to a new run of its experiment.

    Returns:
        The run id logged to, or ``None`` when the run's config has tracking off.
    """
    tracking = TrackingConfig(**saved.cfg.tracking.as_dict())
    if not tracking.enabled:
        say("MLflow: tracking.enabled is false in the run's config; nothing logged")
        return None
    prefix = "evaluate/vlm_" if result.actor == "vlm" else "evaluate/"
    metrics = {f"{prefix}return_mean": result.mean, f"{prefix}return_std": result.std}
    metrics.update({f"{prefix}{key}_mean": v for key, v in result.metric_means().items()})
    if result.invalid_rate is not None:
        metrics[f"{prefix}invalid_rate"] = result.invalid_rate
    video = result.video
    return log_evaluation(
        uri=resolve_tracking_uri(tracking.uri),
        experiment=tracking.experiment,
        run_id=saved.mlflow_run_id,
        metrics=metrics,
        step=saved.env_steps,
        artifacts=[(video, "evaluate")] if video is not None else [],
        new_run_name=f"{saved.cfg.run.name}-evaluate",
        tags={
            "run_dir": str(saved.run_dir.resolve()),
            "checkpoint": str(saved.checkpoint.resolve()),
            "evaluates_run_id": saved.mlflow_run_id or "",
        },
        say=say,
    )


# --------------------------------------------------------------------------- entry points


def evaluate_checkpoint(
    path: str | Path,
    episodes: int | None = None,
    seed: int | None = None,
    video: bool = False,
    video_size: int = 256,
    device: str = "cpu",
    log: bool = True,
    say=print,
    vlm: bool = False,
    adapter: str | Path | None = None,
) -> EvaluationResult:
    """Evaluate a checkpoint's deterministic policy, or its VLM (the Python API behind the CLI).

    Args:
        path: Run directory, checkpoint directory or ``state.pt``.
        episodes: Number of episodes; ``None`` takes the run's ``run.eval_episodes``.
        seed: Evaluation seed; ``None`` takes the run's evaluation seed (as training evaluates).
        video: Record the first episode and write ``<run_dir>/evaluate/<checkpoint>-seed<S>.mp4``.
        video_size: Side of the video frames.
        device: Torch device of the policy.
        log: Log to MLflow.
        say: Where progress lines go.
        vlm: Play the checkpoint's VLM (with its saved adapter) instead of the policy.
        adapter: With ``vlm``: a saved adapter folder to play instead of the checkpoint's.

    Returns:
        The evaluation result.

    Raises:
        ConfigError: On a bad checkpoint, a bad argument, or an unreachable MLflow store.
    """
    if episodes is not None and episodes < 1:
        raise ConfigError(f"--episodes {episodes} must be >= 1", "pass --episodes 10")
    if video:
        _import_imageio()  # fail before the episodes run, not after
    saved = load_saved_run(path)
    episodes = int(saved.cfg.run.eval_episodes) if episodes is None else int(episodes)
    seed = evaluation_seed(saved.cfg.run.seed) if seed is None else int(seed)
    env = build_env(saved.cfg, evaluation_seed(saved.cfg.run.seed))
    try:
        invalid_rate = None
        if vlm:
            covr = COVRConfig(**saved.cfg.covr.as_dict())
            guide = build_trained_vlm_guide(saved, env, device, adapter)
            episodes_run, invalid_rate = run_vlm_episodes(
                env, guide, episodes, seed, covr.vlm_image_size, covr.guide_every,
                record=video, video_size=video_size,
            )  # fmt: skip
        else:
            policy = build_trained_policy(saved, env, device)
            episodes_run = run_episodes(
                env,
                lambda obs: policy.act(obs, deterministic=True),
                episodes,
                seed,
                record=video,
                video_size=video_size,
            )
        result = EvaluationResult(
            **vars(episodes_run), actor="vlm" if vlm else "policy", invalid_rate=invalid_rate
        )
        if video:
            name = f"{saved.checkpoint.name}{'-vlm' if vlm else ''}-seed{seed}.mp4"
            target = saved.run_dir / "evaluate" / name
            result.video = write_video(result.frames, target, agent_fps(env))
    finally:
        env.close()
    if log:
        result.mlflow_run_id = log_result(saved, result, say=say)
    return result


def print_result(loaded_path: str, result: EvaluationResult) -> None:
    """A rich table of the episodes, then mean and std."""
    console = Console()
    who = "the VLM of " if result.actor == "vlm" else ""
    console.print(f"evaluate {who}{loaded_path} (seed {result.seed})", soft_wrap=True)
    table = Table()
    table.add_column("episode", justify="right")
    table.add_column("agent steps", justify="right")
    table.add_column("return", justify="right")
    for key in result.episode_metrics:
        table.add_column(key.replace("_", " "), justify="right")
    for index, (ret, steps) in enumerate(zip(result.returns, result.agent_steps, strict=True)):
        extra = [f"{values[index]:.1f}" for values in result.episode_metrics.values()]
        table.add_row(str(index), str(steps), f"{ret:.2f}", *extra)
    console.print(table)
    console.print(
        f"return mean {result.mean:.2f}  std {result.std:.2f}  over {len(result.returns)} episodes"
    )
    if result.invalid_rate is not None:
        console.print(f"unreadable VLM answers {100 * result.invalid_rate:.0f} %")
    for key, values in result.episode_metrics.items():
        console.print(f"{key} mean {np.mean(values):.1f}  std {np.std(values):.1f}")
    if result.video is not None:
        console.print(f"video {result.video} ({len(result.frames)} frames)")


def run(args: argparse.Namespace) -> int:
    """``covr-lightning evaluate``."""
    result = evaluate_checkpoint(
        args.checkpoint,
        episodes=args.episodes,
        seed=args.seed,
        video=args.video,
        video_size=args.video_size,
        device=args.device,
        log=not args.no_log,
        say=lambda line: print(line),
        vlm=args.vlm or args.adapter is not None,
        adapter=args.adapter,
    )
    print_result(args.checkpoint, result)
    return 0
