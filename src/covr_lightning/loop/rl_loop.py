"""The training loop for the RL agent, on :class:`lightning.Fabric`.

One agent step: act (random during warm-up, then the policy), step the env (``action_repeat`` env
steps), store the transition, do one SAC update. With ``run.num_envs`` = N the loop steps N envs
at once (worker processes, :mod:`covr_lightning.envs.vector`): one batched ``act`` for N
observations, N transitions into N replay streams, N updates, and env steps summed over the envs.
Around it: evaluation of the deterministic policy, metrics to MLflow keyed by env step,
whole-state checkpoints at episode ends, and resume.

The COVR issue extends this class into the two-phase loop: :meth:`RLLoop.train_until` runs the RL
phase up to an env step and :meth:`RLLoop.transition_extras` is where the VLM prior joins each
stored transition, so the round structure can be added around it without rewriting the inner loop.
Fabric facts designed around (see docs/architecture.md): ``fabric.call`` reaches only registered
callbacks, so the loop calls module methods itself; ``LightningModule.log`` carries no step under
Fabric, so the loop logs with the env step explicitly; each of SAC's three optimizers goes through
``fabric.setup``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import Namespace
from lightning import Fabric

from covr_lightning.config import (
    RunConfig,
    TrackingConfig,
    config_to_dict,
    dump_config,
    import_class,
    instantiate,
)
from covr_lightning.envs.vector import EnvPool, env_factories
from covr_lightning.errors import ConfigError, TrainingDivergedError
from covr_lightning.loop import checkpoint as ckpt
from covr_lightning.tracking.mlflow import MLflowTracker, flatten
from covr_lightning.tracking.progress import TrainingProgress


class RunningMeans:
    """Averages of update metrics over a logging window."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, float]) -> None:
        """Add one update's metrics to the window."""
        for key, value in metrics.items():
            self._sums[key] += value
            self._counts[key] += 1

    def pop(self) -> dict[str, float]:
        """The window's means; empties the window."""
        means = {key: self._sums[key] / self._counts[key] for key in self._sums}
        self._sums.clear()
        self._counts.clear()
        return means


def next_multiple(value: int, every: int) -> int:
    """The first multiple of ``every`` strictly above ``value`` (the next cadence point)."""
    return (value // every + 1) * every


def run_directory(cfg: Namespace) -> Path:
    """``<run.dir>/<tracking.experiment>/<run.name>``."""
    return Path(cfg.run.dir) / cfg.tracking.experiment / cfg.run.name


class RLLoop:
    """Plain off-policy RL (SAC and its subclasses) from a validated recipe.

    Args:
        cfg: The resolved recipe (see :func:`covr_lightning.config.load_recipe`).
        resume: ``None`` for a fresh run, ``"last"`` or a checkpoint/run path to continue one.
    """

    POSITION = (
        "env_steps",
        "agent_steps",
        "episodes",
        "episodes_started",
        "updates",
        "next_eval_at",
        "next_checkpoint_at",
        "next_log_at",
        "last_episode_return",
        "last_eval_return",
    )
    """Counters that place the run in time; checkpointed and restored as a group."""

    def __init__(self, cfg: Namespace, resume: str | None = None) -> None:
        self.cfg = cfg
        self.run: RunConfig = RunConfig(**cfg.run.as_dict())
        self.tracking = TrackingConfig(**cfg.tracking.as_dict())
        self.run_dir = run_directory(cfg)
        self.resume_from = self._prepare_run_dir(resume)

        self.fabric = Fabric(
            accelerator=self.run.accelerator, devices=1, precision=self.run.precision
        )
        self.fabric.seed_everything(self.run.seed, verbose=False)

        env_class = import_class(cfg.env.class_path)
        most = getattr(env_class, "max_num_envs", None)
        if not 1 <= self.run.num_envs <= (most or self.run.num_envs):
            raise ConfigError(
                f"run.num_envs={self.run.num_envs}, but {env_class.__name__} runs 1 to "
                f"{most or 'any number of'} training env(s) per run",
                f"set run.num_envs={most or 1}",
            )
        self.eval_env = instantiate(cfg.env, seed=self.run.seed + 100_003)
        self._check_env(self.eval_env)
        # An in-process env of the recipe whose attributes (spaces, frame shape, repeat, codec,
        # task) size everything; the training envs below may live in other processes.
        self.env = self.eval_env
        self.num_envs = self.run.num_envs
        # Info keys the env reports per episode (CARLA: driving distance), logged at episode end.
        self.episode_metric_keys = tuple(getattr(self.env, "episode_metrics", ()))
        init_args = cfg.env.init_args.as_dict() if cfg.env.get("init_args") else {}
        seeds = [self.run.seed + i for i in range(self.num_envs)]
        self.envs = EnvPool(env_factories(cfg.env.class_path, init_args, seeds))
        obs_space, act_space = self.env.observation_space, self.env.action_space

        policy = instantiate(
            cfg.policy, obs_shape=tuple(obs_space.shape), action_dim=int(act_space.shape[0])
        )
        self.policy, *self.optimizers = self.fabric.setup(policy, *policy.configure_optimizers())
        self.module = self.policy.module  # the LightningModule itself, for its non-step methods

        self.replay = instantiate(cfg.replay, seed=self.run.seed)
        self.declare_replay_extras()
        self.replay.allocate(
            frame_shape=tuple(self.env.frame_shape),
            frame_dtype=obs_space.dtype,
            frame_stack=int(self.env.frame_stack),
            action_shape=tuple(act_space.shape),
            num_streams=self.num_envs,
        )
        self.action_low, self.action_high = act_space.low, act_space.high
        self.action_repeat = int(self.env.action_repeat)

        self.rng = np.random.default_rng(self.run.seed)
        self.env_steps = 0
        self.agent_steps = 0
        self.episodes = 0
        self.episodes_started = 0
        self.updates = 0
        self.next_eval_at = 0
        self.next_checkpoint_at = self.run.checkpoint_every_env_steps
        self.next_log_at = self.run.log_every_env_steps
        self.last_episode_return = math.nan
        self.last_eval_return = math.nan
        self.mlflow_run_id: str | None = None
        self.tracker = MLflowTracker(
            self.tracking.experiment, self.tracking.uri, enabled=self.tracking.enabled
        )
        self._means = RunningMeans()
        self._update_seconds = 0.0
        self._updates_in_window = 0
        self.last_eval_env_step = -1
        self.last_checkpoint_env_step = -1
        # Per env: the observation of its episode in progress (None: none open), the running
        # return and the env step its episode began at.
        self.lane_obs: list[np.ndarray | None] = [None] * self.num_envs
        self.lane_return = np.zeros(self.num_envs)
        self.lane_start_env_step = np.zeros(self.num_envs, dtype=np.int64)
        self.lane_info: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        self.last_eval_metrics: dict[str, list[float]] = {}  # per-episode env metrics of the eval
        self.build_extras()
        if self.resume_from is not None:
            self.load(self.resume_from)

    # ------------------------------------------------------------------ setup helpers

    def _prepare_run_dir(self, resume: str | None) -> Path | None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"cannot write the run directory {self.run_dir} ({err.strerror or err})",
                "set run.dir to a writable folder",
            ) from err
        if resume is not None:
            return ckpt.resolve_resume(resume, self.run_dir)
        if ckpt.latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(
                f"{self.run_dir} already holds a run with checkpoints",
                "continue it with --resume last, or start a new one with run.name=NEW",
            )
        return None

    @staticmethod
    def _check_env(env) -> None:
        missing = [
            a for a in ("frame_shape", "frame_stack", "action_repeat") if not hasattr(env, a)
        ]
        if missing:
            raise ConfigError(
                f"env {type(env).__name__} lacks {', '.join(missing)}",
                "envs used for training must expose frame_shape, frame_stack and action_repeat "
                "(see covr_lightning.envs.DMCEnv)",
            )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train until ``run.total_env_steps``; returns the final evaluation."""
        config_file = self.run_dir / "config.yaml"
        changed = self._changed_settings(config_file) if self.resume_from is not None else []
        config_file.write_text(dump_config(self.cfg))
        self.mlflow_run_id = self.tracker.start(
            run_name=self.run.name,
            config=config_to_dict(self.cfg),
            config_file=config_file,
            run_id=self.mlflow_run_id,
            tags={"run_dir": str(self.run_dir.resolve())},
        )
        status = "FAILED"
        with TrainingProgress(self.run.total_env_steps, self.env_steps) as self.progress:
            self._announce()
            for line in changed:
                self.progress.log(line)
            try:
                self.run_training()
                result = self.finish()
                status = "FINISHED"
                return result
            except KeyboardInterrupt:
                self.progress.log("interrupted: writing a checkpoint before exiting")
                self.save()
                status = "KILLED"
                raise
            finally:
                self.tracker.finish(status)

    def _changed_settings(self, config_file: Path) -> list[str]:
        """Lines naming the settings a resumed run changes relative to its saved config."""
        if not config_file.is_file():
            return []
        before = flatten(yaml.safe_load(config_file.read_text()) or {})
        after = flatten(config_to_dict(self.cfg))
        return [
            f"resumed with a changed setting: {key} {before.get(key, '(unset)')} -> {value}"
            for key, value in after.items()
            if before.get(key) != value
        ]

    def _announce(self) -> None:
        if self.resume_from is not None:
            self.progress.log(
                f"resumed from {self.resume_from} at env step {self.env_steps:,} "
                f"({len(self.replay):,} transitions in replay)"
            )
        tracking = self.tracker.uri if self.tracker.enabled else "off"
        self.progress.log(f"run {self.run_dir}  device {self.fabric.device}  MLflow {tracking}")

    def train_until(self, env_step_target: int) -> None:
        """Run agent steps (act, store, update) until ``env_steps >= env_step_target``.

        Each iteration steps every env once. An episode still open when the target is reached
        stays open: the next call (the next COVR round) continues it rather than cutting it short.
        """
        for lane in range(self.num_envs):
            if self.lane_obs[lane] is None:
                self.lane_obs[lane] = self.start_episode(lane)
        while self.env_steps < env_step_target:
            obs = np.stack(self.lane_obs)
            actions = self.select_actions(obs)
            next_obs, rewards, terminated, truncated, infos = self.envs.step(actions)
            ended = []
            for lane in range(self.num_envs):
                self.replay.add(
                    actions[lane],
                    rewards[lane],
                    next_obs[lane],
                    terminated[lane],
                    stream=lane,
                    **self.transition_extras(lane),
                )
                self.env_steps += int(infos[lane].get("env_steps", self.action_repeat))
                self.agent_steps += 1
                self.lane_return[lane] += float(rewards[lane])
                self.after_step(
                    lane,
                    actions[lane],
                    float(rewards[lane]),
                    next_obs[lane],
                    bool(terminated[lane]),
                    bool(truncated[lane]),
                )
                self.lane_obs[lane] = next_obs[lane]
                self.lane_info[lane] = infos[lane]
                if terminated[lane] or truncated[lane]:
                    ended.append(lane)

            if self.env_steps >= self.run.seed_env_steps and len(self.replay) > 0:
                for _ in range(self.num_envs):  # one update per agent step, as with one env
                    self._means.add(self.update())
            if self.env_steps >= self.next_log_at:
                self.log_train_metrics()
            if self.env_steps >= self.next_eval_at:
                self.evaluate_and_log()
            self.progress.update(self.env_steps)

            for lane in ended:
                self.end_episode(lane)
                self.lane_obs[lane] = None
            if ended:
                # At the target the caller checkpoints (phase boundary, or finish()): not twice.
                if self.next_checkpoint_at <= self.env_steps < env_step_target:
                    self.save()
                if self.env_steps < env_step_target:
                    for lane in ended:
                        self.lane_obs[lane] = self.start_episode(lane)

    def start_episode(self, lane: int = 0) -> np.ndarray:
        """Reset training env ``lane`` and open a new episode in its replay stream."""
        # Reseed per episode from (seed, episodes started): a resumed run meets the same episodes.
        seed = self.run.seed * 1_000_003 + self.episodes_started
        self.episodes_started += 1
        obs = self.envs.reset(lane, seed)
        self.replay.start_episode(obs, stream=lane)
        self.lane_return[lane] = 0.0
        self.lane_start_env_step[lane] = self.env_steps
        return obs

    def end_episode(self, lane: int = 0) -> None:
        """Count env ``lane``'s finished episode and log its return at the current env step."""
        self.episodes += 1
        episode_return = float(self.lane_return[lane])
        self.last_episode_return = episode_return
        self.progress.episode(episode_return)
        metrics = {
            "rl/episode_return": episode_return,
            "rl/episode_env_steps": int(self.env_steps - self.lane_start_env_step[lane]),
            "rl/episodes": self.episodes,
        }
        for key in self.episode_metric_keys:
            if key in self.lane_info[lane]:
                metrics[f"rl/{key}"] = float(self.lane_info[lane][key])
        self.tracker.log_metrics(metrics, step=self.env_steps)

    def select_actions(self, obs: np.ndarray) -> np.ndarray:
        """``(N, A)`` actions for the ``(N, ...)`` observations of the envs.

        Uniform random during warm-up, then samples from the policy (one batched forward pass).
        """
        if self.env_steps < self.run.seed_env_steps:
            shape = (len(obs), *self.action_low.shape)
            return self.rng.uniform(self.action_low, self.action_high, shape).astype(np.float32)
        return self.module.act(obs, deterministic=False)

    def transition_extras(self, lane: int) -> dict[str, Any]:
        """Per-transition fields stored beside env ``lane``'s transition (COVR adds the prior)."""
        return {}

    # ------------------------------------------------------------------ hooks for subclasses

    def declare_replay_extras(self) -> None:
        """Declare per-transition replay fields before the buffer is allocated (none here)."""

    def build_extras(self) -> None:
        """Build what a subclass adds (VLM, D_f, schedule) before a checkpoint is loaded."""

    def run_training(self) -> None:
        """The body of :meth:`fit`: here plain RL up to the budget; COVR runs its rounds."""
        self.train_until(self.run.total_env_steps)

    def after_step(
        self,
        lane: int,
        action: np.ndarray,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
    ) -> None:
        """Called after env ``lane``'s transition is stored, before an ended episode is closed."""

    def checkpoint_stores(self) -> dict[str, Any]:
        """Objects with ``save(dir)`` / ``load(dir)`` written beside ``state.pt``, by subfolder."""
        return {ckpt.REPLAY_DIR: self.replay}

    def update(self) -> dict[str, float]:
        """One gradient update of the policy on a replay batch."""
        start = time.perf_counter()
        batch = self.fabric.to_device(self.replay.sample())
        metrics = self.policy.training_step(batch, self.updates)
        self.updates += 1
        self._update_seconds += time.perf_counter() - start
        self._updates_in_window += 1
        diverged = [key for key, value in metrics.items() if not math.isfinite(value)]
        if diverged:
            raise TrainingDivergedError(
                f"training diverged: {diverged[0]} is {metrics[diverged[0]]} at env step "
                f"{self.env_steps:,} (no checkpoint written after it)",
                "lower the learning rates (policy.critic_lr, policy.actor_lr), or continue from "
                "the last good checkpoint with --resume last",
            )
        return metrics

    def log_train_metrics(self) -> None:
        """Log the window's mean update metrics and throughput at the current env step."""
        metrics = {f"rl/{key}": value for key, value in self._means.pop().items()}
        metrics["perf/env_steps_per_s"] = self.progress.env_steps_per_second
        if self._updates_in_window:
            metrics["perf/update_ms"] = 1000 * self._update_seconds / self._updates_in_window
        self._update_seconds, self._updates_in_window = 0.0, 0
        self.tracker.log_metrics(metrics, step=self.env_steps)
        self.next_log_at = next_multiple(self.env_steps, self.run.log_every_env_steps)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, episodes: int) -> list[float]:
        """Returns of ``episodes`` episodes of the deterministic policy on the eval env."""
        returns = []
        self.last_eval_metrics = {key: [] for key in self.episode_metric_keys}
        for _ in range(episodes):
            obs, _ = self.eval_env.reset()
            done, total = False, 0.0
            while not done:
                obs, reward, terminated, truncated, info = self.eval_env.step(
                    self.module.act(obs, deterministic=True)
                )
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
            for key in self.episode_metric_keys:
                self.last_eval_metrics[key].append(float(info.get(key, math.nan)))
        return returns

    def evaluate_and_log(self) -> dict[str, float]:
        """Evaluate now, log ``eval/return`` (+ std) and schedule the next evaluation."""
        returns = self.evaluate(self.run.eval_episodes)
        mean, std = float(np.mean(returns)), float(np.std(returns))
        self.last_eval_return = mean
        self.last_eval_env_step = self.env_steps
        self.progress.evaluation(self.env_steps, mean, std)
        metrics = {"eval/return": mean, "eval/return_std": std}
        metrics.update(
            {f"eval/{key}": float(np.mean(v)) for key, v in self.last_eval_metrics.items()}
        )
        self.tracker.log_metrics(metrics, step=self.env_steps)
        self.next_eval_at = next_multiple(self.env_steps, self.run.eval_every_env_steps)
        return metrics

    def finish(self) -> dict[str, float]:
        """Final evaluation (unless one just ran) and the final checkpoint."""
        if self.last_eval_env_step != self.env_steps:
            result = self.evaluate_and_log()
        else:
            result = {"eval/return": self.last_eval_return}
        if self.last_checkpoint_env_step != self.env_steps:
            self.save()
        self.close()
        self.progress.log(
            f"done: {self.env_steps:,} env steps, {self.episodes} episodes, "
            f"final eval return {result['eval/return']:.1f}"
        )
        return result

    def close(self) -> None:
        """Close the training envs (stopping their workers) and the evaluation env.

        CARLA needs this: its envs hold actors and the synchronous mode of a shared server.
        """
        self.envs.close()
        self.eval_env.close()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything but the replay buffer's arrays (those stream to their own files)."""
        return {
            "policy_class": type(self.module).__module__ + "." + type(self.module).__qualname__,
            "policy": self.module.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "loop": {
                **{key: getattr(self, key) for key in self.POSITION},
                "rng": self.rng.bit_generator.state,
                "num_envs": self.num_envs,
                # Where each env's episode stood: a resumed run starts new episodes (env state is
                # not saved), and COVR bootstraps the cut segments of D_f from these.
                "lane_obs": [
                    None if obs is None else torch.from_numpy(np.array(obs))
                    for obs in self.lane_obs
                ],
            },
            "mlflow_run_id": self.mlflow_run_id,
            "rng": ckpt.capture_rng_state(),
        }

    def save(self) -> Path:
        """Write a whole-state checkpoint now."""
        self.next_checkpoint_at = next_multiple(self.env_steps, self.run.checkpoint_every_env_steps)
        path = ckpt.save_checkpoint(
            self.fabric,
            self.run_dir,
            self.env_steps,
            self.state_dict(),
            self.checkpoint_stores(),
            keep=self.run.keep_checkpoints,
        )
        self.last_checkpoint_env_step = self.env_steps
        self.progress.log(f"env step {self.env_steps:>9,}  checkpoint {path}")
        return path

    def load(self, checkpoint: Path) -> None:
        """Restore everything from a checkpoint directory (strict)."""
        state = ckpt.load_checkpoint(self.fabric, checkpoint)
        expected = type(self.module).__module__ + "." + type(self.module).__qualname__
        fix = f"resume with the recipe and overrides the run started with ({self.run_dir / 'config.yaml'})"
        if state.get("policy_class") != expected:
            raise ConfigError(
                f"checkpoint {checkpoint} holds a {state.get('policy_class')}, the recipe builds {expected}",
                fix,
            )
        try:
            self.module.load_state_dict(state["policy"], strict=True)
            if len(state["optimizers"]) != len(self.optimizers):
                raise ValueError("number of optimizers differs")
            for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"checkpoint {checkpoint} does not match the recipe's policy "
                f"({str(err).splitlines()[0][:160]})",
                fix,
            ) from err
        saved_envs = int(state["loop"].get("num_envs", 1))
        if (
            saved_envs != self.num_envs
        ):  # checked first: the replay streams would refuse less clearly
            raise ConfigError(
                f"checkpoint {checkpoint} was written with run.num_envs={saved_envs}, the recipe "
                f"has {self.num_envs}",
                f"resume with run.num_envs={saved_envs}",
            )
        for folder, store in self.checkpoint_stores().items():
            store.load(checkpoint / folder)
        loop = state["loop"]
        loop.setdefault("episodes_started", loop["episodes"])  # checkpoints before num_envs
        for key in self.POSITION:
            setattr(self, key, loop[key])
        self.rng.bit_generator.state = loop["rng"]
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.load_extra_state(state, checkpoint)
        ckpt.restore_rng_state(state["rng"])

    def load_extra_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Restore what a subclass added to :meth:`state_dict` (nothing here)."""
