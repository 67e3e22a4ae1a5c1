"""``covr-lightning evaluate``: the deterministic policy of a checkpoint, without the VLM.

Only the policy's weights are read from ``state.pt`` (key ``policy``); the VLM, its adapter, the
replay buffer and the optimizers are never built. The run's own ``config.yaml`` (two levels above
the checkpoint directory) rebuilds the env and the policy class.

Seeding: the env is built with ``seed`` and episode ``i`` starts from ``reset(seed=
episode_seed(seed, i))`` (a NumPy ``SeedSequence`` of the pair), so identical seeds give identical returns and episode ``i`` does not depend on
how many episodes are asked for. The default seed is the run's ``run.seed + 100_003`` (the seed
of the training loop's eval env), which differs from the training episodes' seeds.

Video: ``--video`` records the first episode at ``video_size`` px: one frame after ``reset`` and
one after every agent step, so a video has ``agent steps + 1`` frames, played at the agent's
control rate when the env exposes it (dm_control: ``1 / (control timestep x action repeat)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import Namespace

from covr_lightning.errors import ConfigError
from covr_lightning.loop import checkpoint as ckpt

SEED_OFFSET = 100_003
"""Default evaluation seed = ``run.seed + SEED_OFFSET`` (as the training loop's eval env)."""
METRIC_MEAN = "evaluate/return_mean"
METRIC_STD = "evaluate/return_std"


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedCheckpoint:
    """What ``evaluate`` and ``export`` need from a checkpoint: config and policy weights only.

    Attributes:
        checkpoint: The checkpoint directory (``<run_dir>/checkpoints/env_step_*``).
        run_dir: The run directory holding ``config.yaml``.
        cfg: The run's resolved recipe.
        policy_state: The policy's ``state_dict``.
        policy_class: Dotted class path stored in the checkpoint.
        env_steps: Env steps done when the checkpoint was written.
        mlflow_run_id: The training run's MLflow run id, if it logged to MLflow.
    """

    checkpoint: Path
    run_dir: Path
    cfg: Namespace
    policy_state: dict[str, Any]
    policy_class: str | None
    env_steps: int
    mlflow_run_id: str | None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, its ``state.pt`` or a run directory (its latest) -> checkpoint dir.

    Raises:
        ConfigError: The path does not exist or holds no checkpoint.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise ConfigError(
            f"--checkpoint {path}: no such file or directory",
            f"pass a run directory, a checkpoint directory or its {ckpt.STATE_FILE}",
        )
    try:
        return ckpt.resolve_resume(str(given), given)
    except ConfigError as err:
        raise ConfigError(
            f"--checkpoint {path}: not a checkpoint or run directory",
            f"pass a run directory, a checkpoint directory or its {ckpt.STATE_FILE}",
        ) from err


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Resolve ``path``, read the run's ``config.yaml`` and the policy weights (nothing else built).

    Raises:
        ConfigError: Missing/corrupt checkpoint, missing or invalid ``config.yaml``.
    """
    from covr_lightning.config import load_recipe

    checkpoint = resolve_checkpoint(path)
    run_dir = checkpoint.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"no config.yaml in {run_dir} (expected <run_dir>/checkpoints/{checkpoint.name})",
            "pass a checkpoint inside a run directory written by `covr-lightning fit`",
        )
    cfg = load_recipe(str(config_file))
    state_file = checkpoint / ckpt.STATE_FILE
    try:
        # mmap: only the tensors actually touched (the policy's) are read from disk.
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/OSError
        raise ConfigError(
            f"checkpoint {checkpoint} is corrupt or unreadable ({type(err).__name__})",
            f"pass another checkpoint of the run (ls {checkpoint.parent})",
        ) from err
    if (
        not isinstance(state, dict)
        or state.get("format_version") != ckpt.FORMAT_VERSION
        or not isinstance(state.get("policy"), dict)
    ):
        raise ConfigError(
            f"checkpoint {checkpoint} has an unknown format (no policy weights)",
            "pass a checkpoint written by `covr-lightning fit`",
        )
    loop = state.get("loop") or {}
    return LoadedCheckpoint(
        checkpoint=checkpoint,
        run_dir=run_dir,
        cfg=cfg,
        policy_state=state["policy"],
        policy_class=state.get("policy_class"),
        env_steps=int(loop.get("env_steps", 0)),
        mlflow_run_id=state.get("mlflow_run_id"),
    )


def build_env(cfg: Namespace, seed: int):
    """The run's env, seeded."""
    from covr_lightning.config import instantiate

    return instantiate(cfg.env, seed=seed)


def build_policy(loaded: LoadedCheckpoint, env, device: str = "cpu"):
    """The run's policy class with the checkpoint's weights, in eval mode on ``device``.

    Raises:
        ConfigError: The weights do not fit the policy the run's config builds.
    """
    from covr_lightning.config import instantiate

    policy = instantiate(
        loaded.cfg.policy,
        obs_shape=tuple(env.observation_space.shape),
        action_dim=int(env.action_space.shape[0]),
    )
    built = type(policy).__module__ + "." + type(policy).__qualname__
    if loaded.policy_class is not None and loaded.policy_class != built:
        raise ConfigError(
            f"checkpoint {loaded.checkpoint} holds a {loaded.policy_class}, "
            f"its config.yaml builds {built}",
            f"restore {loaded.run_dir / 'config.yaml'} as the run wrote it",
        )
    try:
        policy.load_state_dict(loaded.policy_state, strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {loaded.checkpoint} does not match the policy of its config.yaml "
            f"({str(err).splitlines()[0][:160]})",
            f"restore {loaded.run_dir / 'config.yaml'} as the run wrote it",
        ) from err
    return policy.to(device).eval()


# --------------------------------------------------------------------------- episodes


def episode_seed(seed: int, index: int) -> int:
    """The reset seed of episode ``index`` under evaluation seed ``seed`` (fits in 32 bits)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclass
class EvaluationResult:
    """Returns of the evaluated episodes (and the recorded frames of the first one).

    Attributes:
        returns: Undiscounted return of each episode.
        agent_steps: Agent steps (policy calls) of each episode.
        seed: The evaluation seed.
        frames: ``(agent_steps[0] + 1)`` RGB frames of the first episode when recorded.
        episode_metrics: Per-episode values of the env's ``episode_metrics`` info keys (CARLA:
            ``driving_distance``, ``dbc_distance``), read from each episode's last step.
        video: Path of the written video, if any.
        mlflow_run_id: The MLflow run the metrics went to (``None``: not logged).
    """

    returns: list[float]
    agent_steps: list[int]
    seed: int
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    episode_metrics: dict[str, list[float]] = field(default_factory=dict)
    video: Path | None = None
    mlflow_run_id: str | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))


@torch.no_grad()
def run_episodes(
    env, policy, episodes: int, seed: int, record: bool = False, video_size: int = 256
) -> EvaluationResult:
    """``episodes`` episodes of ``policy.act(obs, deterministic=True)``.

    Args:
        env: A gymnasium env (built with ``seed``).
        policy: A module with ``act(obs, deterministic=True)``.
        episodes: Number of episodes.
        seed: Episode ``i`` starts from ``reset(seed=episode_seed(seed, i))``.
        record: Keep ``env.render(video_size, video_size)`` frames of the first episode: after the
            reset and after every agent step.
        video_size: Side of the recorded frames.

    Returns:
        The returns, the episode lengths and the frames.
    """
    result = EvaluationResult(returns=[], agent_steps=[], seed=seed)
    keys = tuple(getattr(env, "episode_metrics", ()))
    result.episode_metrics = {key: [] for key in keys}
    for index in range(episodes):
        keep = record and index == 0
        obs, _ = env.reset(seed=episode_seed(seed, index))
        if keep:
            result.frames.append(env.render(video_size, video_size))
        done, total, steps = False, 0.0, 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy.act(obs, deterministic=True))
            total += float(reward)
            steps += 1
            done = terminated or truncated
            if keep:
                result.frames.append(env.render(video_size, video_size))
        for key in keys:
            result.episode_metrics[key].append(float(info.get(key, np.nan)))
        result.returns.append(total)
        result.agent_steps.append(steps)
    return result


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


def agent_fps(env, default: float = 25.0) -> float:
    """Agent steps per second of simulated time, so that a video plays in real time.

    Read from the env's ``control_timestep`` (simulated seconds per env step; DMC, CARLA and
    CarRacing declare it) and ``action_repeat``; ``default`` for an env without it.
    """
    try:
        return 1.0 / (float(env.control_timestep) * int(env.action_repeat))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return default


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


def log_to_mlflow(
    loaded: LoadedCheckpoint,
    result: EvaluationResult,
    say=print,
) -> str | None:
    """Log the metrics (and the video) to the training run, or to a new run of its experiment.

    Returns:
        The run id logged to, or ``None`` when the run's config has tracking off.
    """
    from covr_lightning.config import TrackingConfig
    from covr_lightning.tracking.mlflow import resolve_tracking_uri

    tracking = TrackingConfig(**loaded.cfg.tracking.as_dict())
    if not tracking.enabled:
        say("MLflow: tracking.enabled is false in the run's config; nothing logged")
        return None
    import logging

    import mlflow
    from mlflow.entities import Metric

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(tracking.uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        run_id = None
        if loaded.mlflow_run_id:
            try:
                run = client.get_run(loaded.mlflow_run_id)
                if run.info.lifecycle_stage == "active":
                    run_id = run.info.run_id
            except Exception:  # MlflowException: not in this store
                run_id = None
        created = run_id is None
        if created:
            experiment = client.get_experiment_by_name(tracking.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(tracking.experiment)
            )
            run_id = client.create_run(
                experiment_id,
                run_name=f"{loaded.cfg.run.name}-evaluate",
                tags={
                    "run_dir": str(loaded.run_dir.resolve()),
                    "checkpoint": str(loaded.checkpoint.resolve()),
                    "evaluates_run_id": loaded.mlflow_run_id or "",
                },
            ).info.run_id
            say(
                f"MLflow: the training run {loaded.mlflow_run_id or '(none recorded)'} is not in "
                f"{uri}; logged to a new run {run_id} of experiment '{tracking.experiment}'"
            )
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(METRIC_MEAN, result.mean, now, loaded.env_steps),
                Metric(METRIC_STD, result.std, now, loaded.env_steps),
                *(
                    Metric(f"evaluate/{key}_mean", float(np.mean(values)), now, loaded.env_steps)
                    for key, values in result.episode_metrics.items()
                ),
            ],
        )
        if result.video is not None:
            client.log_artifact(run_id, str(result.video), "evaluate")
        if created:
            client.set_terminated(run_id, status="FINISHED")
    except ConfigError:
        raise
    except Exception as err:  # MLflow raises MlflowException, sqlalchemy and OS errors
        raise ConfigError(
            f"cannot log to the MLflow store {uri} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''})",
            "set MLFLOW_TRACKING_URI to the store the run used, or pass --no-log",
        ) from err
    if not created:
        say(f"MLflow: logged {METRIC_MEAN} and {METRIC_STD} to run {run_id} ({uri})")
    return run_id


# --------------------------------------------------------------------------- entry points


def evaluate_checkpoint(
    path: str | Path,
    episodes: int = 10,
    seed: int | None = None,
    video: bool = False,
    video_size: int = 256,
    device: str = "cpu",
    log: bool = True,
    say=print,
) -> EvaluationResult:
    """Evaluate a checkpoint's deterministic policy (the Python API behind the CLI).

    Args:
        path: Run directory, checkpoint directory or ``state.pt``.
        episodes: Number of episodes.
        seed: Evaluation seed; ``None`` takes ``run.seed + 100_003``.
        video: Record the first episode and write ``<run_dir>/evaluate/<checkpoint>-seed<S>.mp4``.
        video_size: Side of the video frames.
        device: Torch device of the policy.
        log: Log to MLflow.
        say: Where progress lines go.

    Returns:
        The evaluation result.

    Raises:
        ConfigError: On a bad checkpoint, a bad argument, or an unreachable MLflow store.
    """
    if episodes < 1:
        raise ConfigError(f"--episodes {episodes} must be >= 1", "pass --episodes 10")
    if video:
        _import_imageio()  # fail before the episodes run, not after
    loaded = load_checkpoint(path)
    seed = int(loaded.cfg.run.seed) + SEED_OFFSET if seed is None else int(seed)
    env = build_env(loaded.cfg, seed)
    try:
        policy = build_policy(loaded, env, device)
        result = run_episodes(env, policy, episodes, seed, record=video, video_size=video_size)
        if video:
            target = loaded.run_dir / "evaluate" / f"{loaded.checkpoint.name}-seed{seed}.mp4"
            result.video = write_video(result.frames, target, agent_fps(env))
    finally:
        env.close()
    if log:
        result.mlflow_run_id = log_to_mlflow(loaded, result, say=say)
    return result


def print_result(loaded_path: str, result: EvaluationResult) -> None:
    """A rich table of the episodes, then mean and std."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"evaluate {loaded_path} (seed {result.seed})", soft_wrap=True)
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
    for key, values in result.episode_metrics.items():
        console.print(f"{key} mean {np.mean(values):.1f}  std {np.std(values):.1f}")
    if result.video is not None:
        console.print(f"video {result.video} ({len(result.frames)} frames)")


def cmd_evaluate(args) -> int:
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
    )
    print_result(args.checkpoint, result)
    return 0
