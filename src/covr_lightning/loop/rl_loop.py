"""The training loop for the RL agent, on :class:`lightning.Fabric`.

One agent step: act (random during warm-up, then the policy), step the env (``action_repeat`` env
steps), store the transition, do one SAC update. With ``run.num_envs`` = N the loop steps N envs
at once (worker processes, :mod:`covr_lightning.envs.vector`): one batched ``act`` for N
observations, N transitions into N replay streams, N updates, and env steps summed over the envs.
Around it: evaluation of the deterministic policy, metrics to MLflow keyed by env step,
whole-state checkpoints at episode ends, and resume.

:class:`~covr_lightning.loop.covr_loop.COVRLoop` extends this class into COVR's two-phase loop:
:meth:`RLLoop.train_until` runs the RL phase up to an env step and the hooks below (e.g.
:meth:`RLLoop.transition_extras`, where the VLM prior joins each stored transition) carry the
guidance, so the rounds sit around the inner loop without rewriting it. The loop builds nothing
from the recipe: :func:`covr_lightning.build.build_loop` hands it what it needs (:class:`RLParts`).
Fabric facts designed around (see docs/architecture.md): ``fabric.call`` reaches only registered
callbacks, so the loop calls module methods itself; ``LightningModule.log`` carries no step under
Fabric, so the loop logs with the env step explicitly; each of SAC's three optimizers goes through
``fabric.setup``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import Namespace
from lightning import Fabric

from covr_lightning.config import RunConfig, config_to_dict, dump_config
from covr_lightning.data.replay import ReplayDataModule
from covr_lightning.envs.base import PixelEnv
from covr_lightning.envs.vector import EnvPool
from covr_lightning.errors import ConfigError, TrainingDivergedError
from covr_lightning.loop import checkpoint as ckpt
from covr_lightning.loop.episodes import EpisodeResults, evaluation_seed, run_episodes
from covr_lightning.loop.interrupt import deferred_interrupts, raise_if_stop_requested
from covr_lightning.policies.sac import SACPolicyModule
from covr_lightning.tracking.mlflow import MLflowTracker, flatten
from covr_lightning.tracking.progress import TrainingProgress


@dataclass
class RLParts:
    """What :func:`covr_lightning.build.build_rl_parts` builds for a loop.

    Attributes:
        fabric: The run's Fabric (global RNGs already seeded from ``run.seed``).
        eval_env: An in-process env: evaluation runs on it, and its spaces, frame shape, repeat,
            codec and task size everything else.
        envs: The ``run.num_envs`` training envs.
        policy: The policy module (not yet set up by Fabric).
        replay: The replay buffer (not yet allocated: the loop declares its extras first).
        tracker: The MLflow tracker.
    """

    fabric: Fabric
    eval_env: PixelEnv
    envs: EnvPool
    policy: SACPolicyModule
    replay: ReplayDataModule
    tracker: MLflowTracker


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


class RLLoop:
    """Plain off-policy RL (SAC and its subclasses): the loop a recipe without COVR runs.

    Build it with :func:`covr_lightning.build.build_loop`.

    Args:
        cfg: The resolved recipe (see :func:`covr_lightning.config.load_recipe`).
        parts: What the builder built from it.
        run_dir: The run directory (checked writable by the builder).
        resume_from: A checkpoint directory to continue from, or ``None`` for a fresh run.
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

    def __init__(
        self, cfg: Namespace, parts: RLParts, run_dir: Path, resume_from: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.run: RunConfig = RunConfig(**cfg.run.as_dict())
        self.run_dir = run_dir
        self.resume_from = resume_from
        self.fabric = parts.fabric
        self.eval_env = parts.eval_env
        # The in-process env whose attributes (spaces, frame shape, repeat, codec, task) size
        # everything; the training envs may live in other processes.
        self.env = self.eval_env
        self.envs = parts.envs
        self.num_envs = self.envs.num_envs
        self.episode_metric_keys = tuple(self.env.episode_metrics)
        obs_space, act_space = self.env.observation_space, self.env.action_space

        policy = parts.policy
        self.policy, *self.optimizers = self.fabric.setup(policy, *policy.configure_optimizers())
        self.module = self.policy.module  # the LightningModule itself, for its non-step methods

        self.replay = parts.replay
        self.declare_replay_extras()
        self.replay.allocate(
            frame_shape=tuple(self.env.frame_shape),
            frame_dtype=obs_space.dtype,
            frame_stack=int(self.env.frame_stack),
            action_shape=tuple(act_space.shape),
            num_streams=self.num_envs,
            device=self.fabric.device,
        )
        self.action_low, self.action_high = act_space.low, act_space.high
        self.action_repeat = int(self.env.action_repeat)
        self.eval_seed = evaluation_seed(self.run.seed)

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
        self.tracker = parts.tracker
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
        self.last_evaluation: EpisodeResults | None = None
        if self.resume_from is not None:
            self.load(self.resume_from)

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
        progress = TrainingProgress(self.run.total_env_steps, self.env_steps)
        with progress as self.progress, deferred_interrupts():
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
            raise_if_stop_requested()  # between agent steps: replay, lanes and counters agree
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
        batch = self.replay.sample()
        seen = self.inspect_batch(batch)
        metrics = self.policy.training_step(self.fabric.to_device(batch), self.updates)
        metrics.update(seen)
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

    def inspect_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of a replay batch before the update; may remove fields the policy never reads."""
        return {}

    def log_train_metrics(self) -> None:
        """Log the window's mean update metrics and throughput at the current env step."""
        metrics = {self.metric_name(key): value for key, value in self._means.pop().items()}
        metrics["perf/env_steps_per_s"] = self.progress.env_steps_per_second
        if self._updates_in_window:
            metrics["perf/update_ms"] = 1000 * self._update_seconds / self._updates_in_window
        self._update_seconds, self._updates_in_window = 0.0, 0
        self.tracker.log_metrics(metrics, step=self.env_steps)
        self.next_log_at = next_multiple(self.env_steps, self.run.log_every_env_steps)

    def metric_name(self, key: str) -> str:
        """MLflow name of an update metric (``rl/<key>``)."""
        return f"rl/{key}"

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, episodes: int) -> EpisodeResults:
        """``episodes`` episodes of the deterministic policy on the eval env.

        Seeded as ``covr-lightning evaluate`` seeds them (:mod:`covr_lightning.loop.episodes`),
        so evaluating a checkpoint reproduces the ``eval/return`` logged at its env step.
        """
        return run_episodes(
            self.eval_env,
            lambda obs: self.module.act(obs, deterministic=True),
            episodes,
            self.eval_seed,
        )

    def evaluate_and_log(self) -> dict[str, float]:
        """Evaluate now, log ``eval/return`` (+ std) and schedule the next evaluation."""
        result = self.evaluate(self.run.eval_episodes)
        self.last_evaluation = result
        self.last_eval_return = result.mean
        self.last_eval_env_step = self.env_steps
        self.progress.evaluation(self.env_steps, result.mean, result.std)
        metrics = {"eval/return": result.mean, "eval/return_std": result.std}
        metrics.update({f"eval/{key}": value for key, value in result.metric_means().items()})
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
            "policy_class": ckpt.class_path(self.module),
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
        fix = f"resume with the recipe and overrides the run started with ({self.run_dir / 'config.yaml'})"
        state = ckpt.read_state(
            checkpoint,
            fix=f"resume from an older checkpoint in {checkpoint.parent} with --resume PATH, "
            "or start a fresh run with run.name=NEW",
        )
        ckpt.require_policy_class(state, self.module, checkpoint, fix)
        self.check_state_kind(state, checkpoint)
        ckpt.load_policy_state(self.module, state, checkpoint, fix, self.optimizers)
        saved_envs = int(state["loop"]["num_envs"])
        if saved_envs != self.num_envs:  # before the replay streams, which refuse less clearly
            raise ConfigError(
                f"checkpoint {checkpoint} was written with run.num_envs={saved_envs}, the recipe "
                f"has {self.num_envs}",
                f"resume with run.num_envs={saved_envs}",
            )
        for folder, store in self.checkpoint_stores().items():
            store.load(checkpoint / folder)
        loop = state["loop"]
        for key in self.POSITION:
            setattr(self, key, loop[key])
        self.rng.bit_generator.state = loop["rng"]
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.load_extra_state(state, checkpoint)
        ckpt.restore_rng_state(state["rng"])

    def check_state_kind(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Refuse a COVR run's checkpoint: this loop would drop its VLM side silently."""
        if "covr" in state:
            raise ConfigError(
                f"checkpoint {checkpoint} was written by a COVR run (covr.enabled=true)",
                "resume with the recipe and overrides the run started with",
            )

    def load_extra_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Restore what a subclass added to :meth:`state_dict` (nothing here)."""
