"""The COVR loop: the RL agent and the VLM take turns on the progressive schedule.

For each round of :mod:`covr_lightning.loop.schedule`:

1. **RL phase** (:meth:`RLLoop.train_until` with this class's hooks). The policy acts; every
   ``guide_every`` frames the env renders the current step at ``vlm_image_size`` and, in a guided
   round, the recipe's guide (:mod:`covr_lightning.guides`) turns it into a prior a_v (+ valid
   flag) stored with the transition(s) it belongs to (``covr.prior_scope``; the bookkeeping,
   asynchronous answers included, is :class:`~covr_lightning.loop.guide_queries.GuideQueries`).
   Once the round is guided the policy's ``prior_weight`` is lambda, so its actor loss gains
   ``lambda * ||a_v - tanh(mu(s))||^2`` over the valid rows of each batch. The same render (and the action the policy took there) becomes a
   row of D_f (:class:`~covr_lightning.data.sft.SFTDataModule`); every step's reward feeds the
   return-to-go.
2. **VLM phase** (rounds followed by a fine-tune): close the open segment (bootstrapped with the
   critic's value), build the SFT set (EDDF -> RALW -> drop zero weights), fine-tune the LoRA
   adapter through ``VLMLoRAModule.training_step``, save the adapter as an artifact, clear D_f.

Checkpoints (whole state: both modules, their optimizers, the adapter, replay, D_f, round and
phase, the current prior, RNG) are written at episode ends as in :class:`RLLoop` and at both phase
boundaries, so ``--resume last`` continues from any of them; a run killed during a fine-tune
redoes that fine-tune from the checkpoint written just before it.

The VLM is driven with plain torch rather than through ``fabric.setup``: it may sit on another
device than the policy and keeps its own dtype (bf16 weights, or a 4-bit base with a device map),
which a Fabric precision plugin would otherwise cast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import Namespace

from covr_lightning.config import COVRConfig
from covr_lightning.data.sft import SFTDataModule
from covr_lightning.errors import ConfigError
from covr_lightning.guides.base import Guide
from covr_lightning.guides.worker import GuideWorker, auto_min_batch
from covr_lightning.loop.episodes import run_vlm_episodes
from covr_lightning.loop.fine_tune import (
    FineTuneJob,
    SFTBudget,
    fine_tune_across_devices,
    sft_steps,
)
from covr_lightning.loop.guide_queries import GuideQueries
from covr_lightning.loop.interrupt import raise_if_stop_requested
from covr_lightning.loop.rl_loop import RLLoop, RLParts
from covr_lightning.loop.rng import FINE_TUNE, VLM_EVAL, stream_seed, vlm_stream
from covr_lightning.loop.schedule import Round, plan_rounds, schedule_table
from covr_lightning.vlm.codecs import NumericCodec, PhraseCodec
from covr_lightning.vlm.guide import VLMGuide
from covr_lightning.vlm.module import VLMLoRAModule

SFT_DIR = "sft"
PHASES = ("rl", "vlm")


@dataclass
class COVRParts:
    """What :func:`covr_lightning.build.build_covr_parts` builds for the VLM side of a run.

    Attributes:
        vlm: The VLM with its LoRA adapter (eval mode).
        codec: The env's action codec (action <-> text).
        guide: The prior source (``guide`` recipe section; default the VLM guide).
        vlm_guide: The VLM as a guide, for ``vlm/eval_return`` (the same object as ``guide``
            when the VLM guides).
        sft: D_f: rows and rewards of the agent's experience, filtered and weighted per round.
        collate: Turns SFT examples into the VLM's token batches.
    """

    vlm: VLMLoRAModule
    codec: NumericCodec | PhraseCodec
    guide: Guide
    vlm_guide: VLMGuide
    sft: SFTDataModule
    collate: Callable


class COVRLoop(RLLoop):
    """COVR around any :class:`~covr_lightning.policies.sac.SACPolicyModule` subclass.

    Build it with :func:`covr_lightning.build.build_loop` (a recipe with ``covr.enabled: true``).

    Args:
        cfg: The resolved recipe (with ``covr``, ``vlm`` and ``sft`` sections).
        parts: The RL side the builder built.
        covr_parts: The VLM side the builder built.
        run_dir: The run directory.
        resume_from: A checkpoint directory to continue from, or ``None`` for a fresh run.
    """

    POSITION = (*RLLoop.POSITION, "round_index", "phase", "steps_since_query")

    def __init__(
        self,
        cfg: Namespace,
        parts: RLParts,
        covr_parts: COVRParts,
        run_dir: Path,
        resume_from: Path | None = None,
    ) -> None:
        self.covr = COVRConfig(**cfg.covr.as_dict())
        self.round_index = 0
        self.phase = "rl"
        self.vlm = covr_parts.vlm
        self.codec = covr_parts.codec
        self.guide = covr_parts.guide
        self.vlm_guide = covr_parts.vlm_guide
        self.sft = covr_parts.sft
        self.collate = covr_parts.collate
        total = int(cfg.run.total_env_steps)
        self.rounds = plan_rounds(
            total, self.covr.psi_0, self.covr.growth, self.covr.cold_start_rounds
        )
        n = parts.envs.num_envs
        action_dim = int(parts.eval_env.action_space.shape[0])
        self.action_dim = action_dim
        self.steps_since_query = [0] * n  # per env: frames since its last guide query
        self._vlm_frames: list[np.ndarray | None] = [None] * n  # this step's renders, if any
        max_batch = self.covr.guide_batch_size
        min_batch = self.covr.guide_min_batch or auto_min_batch(self.covr.guide_every, n, max_batch)
        worker = (
            GuideWorker(
                self.guide,
                min_batch=min(min_batch, max_batch),
                max_batch=max_batch,
                device=next(covr_parts.vlm.model.parameters()).device,
                threads=self.covr.guide_threads or None,
            )
            if self.covr.guide_async
            else None
        )
        self.queries = GuideQueries(self.guide, n, action_dim, self.covr.prior_scope, worker)
        self._agent_steps_at_log = 0
        self.phase_seconds = {"rl": 0.0, "vlm": 0.0}
        super().__init__(cfg, parts, run_dir, resume_from)

    # ------------------------------------------------------------------ building

    def declare_replay_extras(self) -> None:
        """a_v, its validity flag, and whether its answer is still on the way."""
        action_dim = int(self.env.action_space.shape[0])
        self.replay.declare_extra("prior", (action_dim,), np.float32, 0.0)
        self.replay.declare_extra("prior_mask", (), np.float32, 0.0)
        self.replay.declare_extra("prior_pending", (), np.float32, 0.0)

    # ------------------------------------------------------------------ rounds

    def run_training(self) -> None:
        """Rounds of RL (+ guidance) and VLM fine-tuning up to the budget."""
        self.progress.console.print(schedule_table(self.rounds, self.action_repeat))
        vlm = self.vlm
        self.progress.log(
            f"VLM {vlm.hparams.backbone}{' (tiny, untrained)' if vlm.is_tiny else ''}: LoRA "
            f"r={vlm.hparams.lora_rank} alpha={vlm.hparams.lora_alpha:g}, trainable "
            f"{vlm.trainable_parameters:,} of {vlm.total_parameters:,} parameters "
            f"({100 * vlm.trainable_share:.2f} %)"
        )
        self.tracker.log_metrics({"vlm/trainable_share": vlm.trainable_share}, step=self.env_steps)
        if self.env_steps == 0 and self.covr.vlm_eval_episodes:  # the VLM before any fine-tune
            self.progress.log(f"VLM alone before fine-tuning: {self._evaluate_vlm(-1)}")
        self._push_latest_adapter()
        while self.round_index < len(self.rounds):
            current = self.rounds[self.round_index]
            if self.phase == "rl":
                self._rl_phase(current)
                if not current.fine_tune:
                    self.round_index += 1
                    continue
                self.phase = "vlm"
                self.save()  # between the phases: D_f full, fine-tune pending
            self._vlm_phase(current)
            self.phase = "rl"
            self.round_index += 1
            self.save()  # after the fine-tune: D_f cleared, adapter updated
            raise_if_stop_requested()  # a stop during the fine-tune waits for it (and this save)

    def _adapter_name(self, round_index: int) -> str:
        """A name per run and round, so a server never serves one round's weights as another's."""
        return f"{self.run_dir.name}-round{round_index}"

    def _push_latest_adapter(self) -> None:
        """On resume, hand the guide the adapter of the last fine-tune before this round (the one
        the checkpoint holds); a fresh run has none."""
        saved = [
            index
            for index in range(self.round_index)
            if (self.run_dir / "adapters" / f"round_{index}").is_dir()
        ]
        if saved:
            folder = self.run_dir / "adapters" / f"round_{saved[-1]}"
            self.guide.adapter_saved(folder, self._adapter_name(saved[-1]))

    def _rl_phase(self, current: Round) -> None:
        guided = current.guided
        self.module.prior_weight = self.covr.prior_weight if guided else 0.0
        self.module.prior_filter = self.covr.prior_filter
        label = f"round {current.index} RL{' + guidance' if guided else ''}"
        self.progress.set_description(label)
        self.tracker.log_metrics(
            {"schedule/round": current.index, "schedule/guided": float(guided)},
            step=self.env_steps,
        )
        start = time.perf_counter()
        self.train_until(current.end)
        self.collect_answers(wait=True)  # every prior of the round lands before it ends
        elapsed = time.perf_counter() - start
        self.phase_seconds["rl"] += elapsed
        self.tracker.log_metrics({"time/rl_phase_s": elapsed}, step=self.env_steps)

    def _vlm_phase(self, current: Round) -> None:
        self.progress.set_description(f"round {current.index} VLM fine-tune")
        start = time.perf_counter()
        for lane in self.sft.open_streams:  # the episode goes on in the next round
            self.sft.end_segment(
                bootstrap=self._cut_value(self.lane_obs[lane]), truncated=True, stream=lane
            )
        metrics = self.sft.build(
            entropy=self.entropy_per_dimension(),
            encode_target=self.codec.encode,
            collate=self.collate,
            q_values=self._q_values_of_rows() if self.sft.return_signal == "q_value" else None,
        )
        vlm_line = "no fine-tune (no SFT example left)"
        if self.sft.num_examples > 0:
            with vlm_stream(self.run.seed, FINE_TUNE, current.index):  # not the agent's streams
                metrics.update(self.fine_tune())
            folder = self.vlm.save_adapter(self.run_dir / "adapters" / f"round_{current.index}")
            self.tracker.log_artifact(folder, artifact_path=f"adapters/round_{current.index}")
            self.guide.adapter_saved(folder, self._adapter_name(current.index))
            vlm_line = (
                f"{int(metrics['vlm/sft_steps'])} SFT steps, loss {metrics['vlm/sft_loss']:.3f}"
            )
            if self.covr.vlm_eval_episodes:
                vlm_line += f"; VLM alone: {self._evaluate_vlm(current.index)}"
        else:
            metrics["vlm/sft_steps"] = 0.0
        self.sft.clear()
        elapsed = time.perf_counter() - start
        self.phase_seconds["vlm"] += elapsed
        metrics["time/vlm_phase_s"] = elapsed
        self.tracker.log_metrics(metrics, step=self.env_steps)
        self.progress.log(
            f"round {current.index} VLM: D_f {int(metrics['sft/rows_in'])} rows -> EDDF kept "
            f"{int(metrics['sft/rows_kept'])} (tau {metrics['eddf/threshold']:.2f}, "
            f"s(H) {metrics['eddf/entropy_scale']:.2f}) -> RALW weighted "
            f"{int(metrics['sft/rows_out'])}; {vlm_line} ({elapsed:.1f} s)"
        )

    def _evaluate_vlm(self, round_index: int) -> str:
        """Log ``vlm/eval_return``: the VLM acting alone on the evaluation episodes."""
        with vlm_stream(self.run.seed, VLM_EVAL, round_index + 1):
            result, invalid = run_vlm_episodes(
                self.eval_env,
                self.vlm_guide,
                self.covr.vlm_eval_episodes,
                self.eval_seed,
                self.covr.vlm_image_size,
                self.covr.guide_every,
            )
        self.tracker.log_metrics(
            {
                "vlm/eval_return": result.mean,
                "vlm/eval_return_std": result.std,
                "vlm/eval_invalid_rate": invalid,
            },
            step=self.env_steps,
        )
        return f"return {result.mean:.1f} +- {result.std:.1f}, {100 * invalid:.0f} % unreadable"

    def fine_tune(self) -> dict[str, float]:
        """LoRA-fine-tune the VLM on the built SFT set; mean metrics of the round."""
        vlm, covr = self.vlm, self.covr
        budget = SFTBudget(
            covr.sft_epochs, covr.sft_min_steps, covr.sft_max_steps, covr.sft_grad_clip
        )
        if covr.sft_strategy != "single":
            return self._fine_tune_across_devices(budget)
        device = next(p for p in vlm.model.parameters() if p.requires_grad).device
        optimizer = vlm.configure_optimizers()
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        vlm.train()
        try:
            totals = sft_steps(
                vlm.training_step,
                lambda: vlm.last_metrics,
                optimizer,
                self.sft.train_dataloader,
                budget,
                device,
                clip=lambda max_norm: torch.nn.utils.clip_grad_norm_(trainable, max_norm),
                env_step=self.env_steps,
            )
        finally:
            vlm.eval()
            if covr.release_vlm_memory:
                del optimizer
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return totals.metrics()

    def _fine_tune_across_devices(self, budget: SFTBudget) -> dict[str, float]:
        """The fine-tune in ``covr.sft_devices`` spawned processes (``loop/fine_tune.py``)."""
        frames, targets, weights = self.sft.kept_examples()
        job = FineTuneJob(
            vlm_class=self.cfg.vlm.class_path,
            vlm_args=self.cfg.vlm.init_args.as_dict() if self.cfg.vlm.get("init_args") else {},
            adapter=self.vlm.adapter_state_dict(),
            prompt_text=self.vlm_guide.prompt_text,
            targets=targets,
            weights=weights,
            batch_size=self.sft.batch_size,
            bucket_by_length=self.sft.bucket_by_length,
            rng_state=self.sft.rng.bit_generator.state,
            budget=budget,
            seed=stream_seed(self.run.seed, FINE_TUNE, self.round_index),
            env_step=self.env_steps,
        )
        result = fine_tune_across_devices(
            job,
            frames,
            self.covr.sft_strategy,
            self.covr.sft_devices,
            self.run.accelerator,
            self.run_dir / ".fine_tune",
        )
        self.vlm.load_adapter_state_dict(result.adapter)
        self.sft.rng.bit_generator.state = result.rng_state  # as if the batches were drawn here
        return result.metrics

    # ------------------------------------------------------------------ per step

    def select_actions(self, obs: np.ndarray) -> np.ndarray:
        """Render for the VLM on schedule (guide query and/or D_f row), then act as the base does.

        Each env keeps its own schedule (its first frame of an episode is a query frame); the
        frames of all envs that query now go to the guide as one batch: answered before acting
        (``covr.guide_async: false``), or handed to the worker thread, whose earlier answers
        are collected here first.
        """
        self.collect_answers()
        n = len(obs)
        self._vlm_frames = [None] * n
        steps = np.asarray(self.steps_since_query)
        query = steps % self.covr.guide_every == 0
        needed = query | ((steps % self.covr.sft_every == 0) & self._feeds_sft())
        frames = None
        if needed.any():
            size = self.covr.vlm_image_size
            # One call renders every env (workers render in parallel); unneeded ones are
            # dropped. Envs share a schedule unless their episodes differ in length.
            frames = self.envs.render(size, size)
            for lane in np.flatnonzero(needed):
                self._vlm_frames[lane] = frames[lane]
        # In a guided round the query frames go to the guide.
        self.queries.ask(query & (self.module.prior_weight > 0), frames, obs, self.env_steps)
        actions = super().select_actions(obs)
        self.queries.took(actions)
        self.steps_since_query = [step + 1 for step in self.steps_since_query]
        return actions

    def collect_answers(self, wait: bool = False) -> None:
        """The guide worker's arrived answers into their transitions (all of them: ``wait``)."""
        self.queries.collect(self.replay, self.env_steps, wait)

    def transition_extras(self, lane: int) -> dict[str, Any]:
        """Env ``lane``'s prior, its mask, and whether its answer is still on the way."""
        return self.queries.extras(lane, guided=self.module.prior_weight > 0)

    def after_step(self, lane, action, reward, next_obs, terminated, truncated) -> None:
        """Feed D_f: every reward, a row where the VLM-sized frame was rendered.

        Nothing in a round that no fine-tune follows (the last): D_f would only be cleared.
        """
        self.queries.stored(lane, int(self.replay.last_transition_id))
        if not self._feeds_sft():
            return
        frame = self._vlm_frames[lane]
        if frame is not None and self._is_row_step(lane):
            self.sft.record_step(
                reward,
                frame=frame,
                action=np.asarray(action, np.float32),
                replay_index=int(self.replay.last_transition_id),
                entropy=self.entropy_per_dimension(),
                stream=lane,
            )
        else:
            self.sft.record_step(reward, stream=lane)
        if terminated:
            self.sft.end_segment(bootstrap=0.0, stream=lane)
        elif truncated:
            self.sft.end_segment(bootstrap=self._cut_value(next_obs), truncated=True, stream=lane)

    def _feeds_sft(self) -> bool:
        """Whether the current round's experience goes to D_f (a fine-tune follows it)."""
        return self.round_index < len(self.rounds) and self.rounds[self.round_index].fine_tune

    def _cut_value(self, obs: np.ndarray | None) -> float:
        """Bootstrap of a cut segment: the critic's value where the return signal uses it."""
        if self.sft.return_signal != "bootstrapped_return_to_go":
            return 0.0  # the discounted mean reward to go reads only the rewards it saw
        return self._state_value(obs)

    def entropy_per_dimension(self) -> float:
        """H_t of EDDF: the policy's entropy (mean -log pi) per action dimension, in nats.

        SAC's temperature holds the summed entropy near its target -|A|, so s(H) = sigmoid(-H)
        of the sum sits at ~1 for a 6-dimensional action the whole run; per dimension, the
        target is -1 for every task, where s(H) = sigmoid(1) = 0.73, and a policy still exploring
        gives less (0.35-0.58 over the quickstart's rounds; docs/method.md, Decision 3).
        """
        return self.module.policy_entropy / self.action_dim

    def _is_row_step(self, lane: int) -> bool:
        """Whether env ``lane``'s step just taken stores a D_f row (its counter moved on)."""
        return (self.steps_since_query[lane] - 1) % self.covr.sft_every == 0

    def start_episode(self, lane: int = 0) -> np.ndarray:
        """New episode in env ``lane``: its next frame is a query frame."""
        self.steps_since_query[lane] = 0
        return super().start_episode(lane)

    def log_train_metrics(self) -> None:
        """Base metrics plus the guide's invalid rate, prior distance and time per query."""
        metrics = self.queries.pop_metrics(self.agent_steps - self._agent_steps_at_log)
        self._agent_steps_at_log = self.agent_steps
        if metrics:
            self.tracker.log_metrics(metrics, step=self.env_steps)
        super().log_train_metrics()

    def inspect_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The share of the batch's rows whose prior is still on the way (not for the policy)."""
        pending = batch.pop("prior_pending")
        asynchronous = self.queries.worker is not None
        return {"prior_waiting_frac": float(pending.mean())} if asynchronous else {}

    def metric_name(self, key: str) -> str:
        """The prior's update metrics go with the guide's (``guide/critic_prefers_prior``, ...)."""
        if key.startswith("prior_") or key == "critic_prefers_prior":
            return f"guide/{key}"
        return super().metric_name(key)

    # ------------------------------------------------------------------ critic values

    def _state_value(self, obs: np.ndarray | None) -> float:
        """Critic value of ``obs`` (bootstrap of a cut segment); 0 before any update."""
        if obs is None or self.updates == 0:
            return 0.0
        value = self.module.q_value(torch.as_tensor(np.ascontiguousarray(obs))[None])
        return float(value.item())

    def _q_values_of_rows(self) -> np.ndarray:
        """Q(s_t, a_t) of each D_f row from the critic now; NaN where replay lost the row."""
        ids = self.sft.replay_indices
        out = np.full(len(ids), np.nan)
        for start in range(0, len(ids), 256):
            chunk = ids[start : start + 256]
            batch, present = self.replay.transitions_at(chunk)
            q = self.module.q_value(batch["obs"], batch["action"]).cpu().numpy()
            out[start : start + len(chunk)] = np.where(present, q, np.nan)
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Wait for the priors in flight first: a checkpoint holds no half-answered query."""
        self.collect_answers(wait=True)
        return super().save()

    def close(self) -> None:
        """Stop the guide worker, then the envs."""
        self.queries.close()
        self.guide.close()
        super().close()

    def checkpoint_stores(self) -> dict[str, Any]:
        """Replay and D_f."""
        return {**super().checkpoint_stores(), SFT_DIR: self.sft}

    def state_dict(self) -> dict[str, Any]:
        """Base state plus the adapter and the current prior."""
        state = super().state_dict()
        state["covr"] = {
            "adapter": self.vlm.adapter_state_dict(),
            **self.queries.state_dict(),
            "phase_seconds": dict(self.phase_seconds),
        }
        return state

    def check_state_kind(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Refuse a checkpoint of a run without COVR: it has no adapter, prior or D_f."""
        if "covr" not in state:
            raise ConfigError(
                f"checkpoint {checkpoint} was written with covr.enabled=false",
                "resume with the recipe and overrides the run started with",
            )

    def load_extra_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        """The adapter and the prior."""
        covr_state = state["covr"]
        try:
            self.vlm.load_adapter_state_dict(covr_state["adapter"])
        except ValueError as err:
            raise ConfigError(
                f"checkpoint {checkpoint}: {err}",
                "resume with the vlm settings the run started with",
            ) from err
        self.queries.load_state_dict(covr_state)
        self.phase_seconds = dict(covr_state["phase_seconds"])
        # Env state is not checkpointed: the resumed run starts new episodes, so the episode
        # segments that were open in D_f end here, bootstrapped from where they stood.
        saved_obs = state["loop"]["lane_obs"]
        for lane in self.sft.open_streams:
            obs = saved_obs[lane]
            value = self._cut_value(None if obs is None else obs.numpy())
            self.sft.end_segment(bootstrap=value, truncated=True, stream=lane)


__all__ = ["PHASES", "COVRLoop", "COVRParts"]
