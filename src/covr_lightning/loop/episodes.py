"""One episode runner, seeded one way, for the training loop's evaluation and ``evaluate``.

Episode ``i`` of an evaluation under seed ``S`` starts from ``reset(seed=episode_seed(S, i))``
(a NumPy ``SeedSequence`` of the pair), so identical seeds give identical returns and episode
``i`` does not depend on how many episodes are asked for. The training loop evaluates under
``run.seed + EVAL_SEED_OFFSET`` at every evaluation, which is also ``covr-lightning evaluate``'s
default seed: evaluating a checkpoint reproduces the ``eval/return`` the run logged at that env
step (same episodes, same deterministic policy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from covr_lightning.envs.base import PixelEnv

EVAL_SEED_OFFSET = 100_003
"""Evaluation seed = ``run.seed + EVAL_SEED_OFFSET``: far from the training episodes' seeds."""


def evaluation_seed(run_seed: int) -> int:
    """The evaluation seed of a run with ``run.seed = run_seed``."""
    return int(run_seed) + EVAL_SEED_OFFSET


def episode_seed(seed: int, index: int) -> int:
    """The reset seed of episode ``index`` under evaluation seed ``seed`` (fits in 32 bits)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclass
class EpisodeResults:
    """Returns of the evaluated episodes (and the recorded frames of the first one).

    Attributes:
        returns: Undiscounted return of each episode.
        agent_steps: Agent steps (policy calls) of each episode.
        seed: The evaluation seed.
        frames: ``(agent_steps[0] + 1)`` RGB frames of the first episode when recorded.
        episode_metrics: Per-episode values of the env's ``episode_metrics`` info keys (CARLA:
            ``driving_distance``, ``dbc_distance``), read from each episode's last step.
    """

    returns: list[float]
    agent_steps: list[int]
    seed: int
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    episode_metrics: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean return."""
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        """Standard deviation of the returns (population)."""
        return float(np.std(self.returns))

    def metric_means(self) -> dict[str, float]:
        """Mean of each env episode metric over the episodes."""
        return {key: float(np.mean(values)) for key, values in self.episode_metrics.items()}


Actor = Callable[[np.ndarray], np.ndarray]
"""Maps one observation to one action (e.g. ``lambda obs: policy.act(obs, deterministic=True)``)."""


@torch.no_grad()
def run_episodes(
    env: PixelEnv,
    act: Actor,
    episodes: int,
    seed: int,
    record: bool = False,
    video_size: int = 256,
    on_reset: Callable[[], None] | None = None,
) -> EpisodeResults:
    """Run ``episodes`` whole episodes of ``act`` on ``env``.

    Args:
        env: The env (any seed: every episode is reset with its own seed).
        act: One observation in, one action out.
        episodes: Number of episodes.
        seed: Episode ``i`` starts from ``reset(seed=episode_seed(seed, i))``.
        record: Keep ``env.render(video_size, video_size)`` frames of the first episode: after the
            reset and after every agent step.
        video_size: Side of the recorded frames.
        on_reset: Called after each episode's reset (an actor with memory, such as
            :class:`HeldVLMActor`, starts over).

    Returns:
        The returns, the episode lengths, the env's episode metrics and the frames.
    """
    keys = tuple(env.episode_metrics)
    result = EpisodeResults(returns=[], agent_steps=[], seed=int(seed))
    result.episode_metrics = {key: [] for key in keys}
    for index in range(episodes):
        keep = record and index == 0
        obs, info = env.reset(seed=episode_seed(seed, index))
        if on_reset is not None:
            on_reset()
        if keep:
            result.frames.append(env.render(video_size, video_size))
        done, total, steps = False, 0.0, 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(act(obs))
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


class HeldVLMActor:
    """The VLM as the policy: it answers every ``every`` frames and its action is held between.

    The same cadence as guidance (``covr.guide_every``), so ``vlm/eval_return`` measures the
    prior the agent is given, acted out alone. An unreadable answer still acts (the codec's
    decode is total: in-bounds, neutral where unread) and is counted in :attr:`invalid`.

    Args:
        env: The env whose current view the VLM reads (``env.render(size, size)``).
        guide: A :class:`~covr_lightning.vlm.guide.VLMGuide` (its ``act(frames)``).
        image_size: Side of the render the VLM reads (``covr.vlm_image_size``).
        every: Frames between queries.
    """

    def __init__(self, env: PixelEnv, guide, image_size: int, every: int) -> None:
        self.env, self.guide, self.image_size, self.every = env, guide, image_size, every
        self.queries = self.invalid = 0
        self.reset()

    def reset(self) -> None:
        """A new episode: the next frame is a query frame."""
        self.step = 0
        self.action: np.ndarray | None = None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.step % self.every == 0 or self.action is None:
            frame = self.env.render(self.image_size, self.image_size)
            actions, valid = self.guide.act(frame[None])
            self.action = actions[0]
            self.queries += 1
            self.invalid += int(not valid[0])
        self.step += 1
        return self.action


def run_vlm_episodes(
    env: PixelEnv,
    guide,
    episodes: int,
    seed: int,
    image_size: int,
    every: int,
    record: bool = False,
    video_size: int = 256,
) -> tuple[EpisodeResults, float]:
    """``episodes`` episodes of the VLM acting alone (:class:`HeldVLMActor`), seeded as
    :func:`run_episodes` seeds them.

    Returns:
        The results and the share of the VLM's answers that could not be read.
    """
    actor = HeldVLMActor(env, guide, image_size, every)
    result = run_episodes(
        env, actor, episodes, seed, record=record, video_size=video_size, on_reset=actor.reset
    )
    return result, actor.invalid / max(actor.queries, 1)
