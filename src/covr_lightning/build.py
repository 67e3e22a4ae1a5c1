"""Where a recipe meets the run: every object a run needs is built here, and only here.

The recipe (``config.load_recipe``) says *which* classes and their settings; the arguments that
come from the run itself are passed in this module, in one visible place:

=================  =====================================================================
call-site argument where it comes from
=================  =====================================================================
``seed``           ``run.seed`` (env ``i`` of the pool: ``run.seed + i``; the evaluation env:
                   :func:`covr_lightning.loop.episodes.evaluation_seed`)
``obs_shape``      the env's observation space
``action_dim``     the env's action space
``gamma``          D_f's return-to-go discounts like the critic: ``policy.gamma`` unless the
                   recipe sets ``sft.gamma``
``device``         the VLM sits beside the policy (Fabric's device) unless ``vlm.device`` is set
=================  =====================================================================

The training loops, ``evaluate``, ``export`` and the seed sweep all build through here.
:func:`build_loop` picks the loop class: :class:`~covr_lightning.loop.rl_loop.RLLoop` when
``covr.enabled`` is false, :class:`~covr_lightning.loop.covr_loop.COVRLoop` when it is true.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning import Fabric

from covr_lightning.config import (
    COVRConfig,
    RunConfig,
    TrackingConfig,
    import_class,
    load_recipe,
    run_directory,
)
from covr_lightning.data.replay import ReplayDataModule
from covr_lightning.data.sft import SFTDataModule
from covr_lightning.envs.base import PixelEnv
from covr_lightning.envs.vector import EnvPool, env_factories
from covr_lightning.errors import ConfigError
from covr_lightning.guides.base import Guide, GuideContext
from covr_lightning.loop import checkpoint as ckpt
from covr_lightning.loop.covr_loop import COVRLoop, COVRParts
from covr_lightning.loop.episodes import evaluation_seed
from covr_lightning.loop.fine_tune import check_devices
from covr_lightning.loop.rl_loop import RLLoop, RLParts
from covr_lightning.loop.rng import GUIDE, VLM_BUILD, stream_seed, vlm_stream
from covr_lightning.policies.sac import SACPolicyModule
from covr_lightning.tracking.mlflow import MLflowTracker
from covr_lightning.vlm.codecs import make_codec
from covr_lightning.vlm.guide import VLMGuide
from covr_lightning.vlm.module import VLMLoRAModule
from covr_lightning.vlm.prompting import ActionPrompt, encode_sft_batch


def init_args(component: Namespace) -> dict[str, Any]:
    """A ``class_path`` / ``init_args`` component's arguments as a plain dict."""
    return component.init_args.as_dict() if component.get("init_args") else {}


def instantiate(component: Namespace, **call_site: Any) -> Any:
    """Build a ``class_path`` / ``init_args`` component, adding the call-site arguments."""
    return import_class(component.class_path)(**init_args(component), **call_site)


# --------------------------------------------------------------------------- envs


def env_class(cfg: Namespace) -> type[PixelEnv]:
    """The recipe's env class, checked against the loop's protocol and ``run.num_envs``.

    Raises:
        ConfigError: Not a :class:`PixelEnv`, or more training envs than the class allows.
    """
    cls = import_class(cfg.env.class_path)
    if not (isinstance(cls, type) and issubclass(cls, PixelEnv)):
        raise ConfigError(
            f"env.class_path {cfg.env.class_path} is not a subclass of "
            "covr_lightning.envs.base.PixelEnv",
            "subclass PixelEnv (it states what the loop relies on; see docs/architecture.md)",
        )
    wanted, most = int(cfg.run.num_envs), cls.max_num_envs
    if most is not None and wanted > most:
        raise ConfigError(
            f"run.num_envs={wanted}, but {cls.__name__} runs 1 to {most} training env(s) per run",
            f"set run.num_envs={most}",
        )
    return cls


def build_env(cfg: Namespace, seed: int) -> PixelEnv:
    """One env of the recipe in this process."""
    return env_class(cfg)(**init_args(cfg.env), seed=int(seed))


def build_env_pool(cfg: Namespace) -> EnvPool:
    """The ``run.num_envs`` training envs; env ``i`` is seeded ``run.seed + i``."""
    seeds = [int(cfg.run.seed) + i for i in range(int(cfg.run.num_envs))]
    return EnvPool(env_factories(env_class(cfg), init_args(cfg.env), seeds))


# --------------------------------------------------------------------------- policy and replay


def build_policy(cfg: Namespace, env: PixelEnv) -> SACPolicyModule:
    """The recipe's policy, sized from ``env``'s spaces."""
    policy = instantiate(
        cfg.policy,
        obs_shape=tuple(env.observation_space.shape),
        action_dim=int(env.action_space.shape[0]),
    )
    if not isinstance(policy, SACPolicyModule):  # the parser checks recipes; this, the API
        raise ConfigError(
            f"policy.class_path {cfg.policy.class_path} is not a SACPolicyModule",
            "subclass covr_lightning.policies.sac.SACPolicyModule (docs/subclassing.md)",
        )
    return policy


def build_replay(cfg: Namespace) -> ReplayDataModule:
    """The recipe's replay buffer (allocated by the loop, which knows the extras it stores)."""
    return instantiate(cfg.replay, seed=int(cfg.run.seed))


def build_fabric(run: RunConfig) -> Fabric:
    """The run's Fabric, with every global RNG seeded from ``run.seed``."""
    fabric = Fabric(accelerator=run.accelerator, devices=1, precision=run.precision)
    fabric.seed_everything(run.seed, verbose=False)
    return fabric


def build_tracker(cfg: Namespace, parent_run_id: str | None = None) -> MLflowTracker:
    """The run's MLflow tracker (a no-op when ``tracking.enabled`` is false)."""
    tracking = TrackingConfig(**cfg.tracking.as_dict())
    return MLflowTracker(
        tracking.experiment, tracking.uri, enabled=tracking.enabled, parent_run_id=parent_run_id
    )


def build_rl_parts(cfg: Namespace, parent_run_id: str | None = None) -> RLParts:
    """Fabric, envs, policy, replay and tracker, in the order that fixes a seed's streams."""
    run = RunConfig(**cfg.run.as_dict())
    fabric = build_fabric(run)  # seeds torch before the networks are initialised
    eval_env = build_env(cfg, evaluation_seed(run.seed))
    envs = build_env_pool(cfg)
    policy = build_policy(cfg, eval_env)
    return RLParts(
        fabric=fabric,
        eval_env=eval_env,
        envs=envs,
        policy=policy,
        replay=build_replay(cfg),
        tracker=build_tracker(cfg, parent_run_id),
    )


# --------------------------------------------------------------------------- COVR's VLM side


def build_vlm(cfg: Namespace, device: str) -> VLMLoRAModule:
    """The recipe's VLM with its LoRA adapter, in eval mode, on ``vlm.device`` or ``device``."""
    args = init_args(cfg.vlm)
    if not args.get("device"):
        args["device"] = device  # beside the policy unless told
    vlm = import_class(cfg.vlm.class_path)(**args)
    vlm.eval()
    return vlm


def build_covr_parts(cfg: Namespace, env: PixelEnv, policy: SACPolicyModule, device: str):
    """VLM, action codec, guide, SFT collate function and D_f for a COVR run.

    Raises:
        ConfigError: The recipe lacks a ``vlm`` or ``sft`` section, or the env has no task text.
    """
    for section in ("vlm", "sft"):
        if cfg.get(section) is None:
            raise ConfigError(
                f"covr.enabled is true but the recipe has no {section} section",
                f"add a {section} section (see the dmc_cheetah recipe) or set covr.enabled=false",
            )
    covr = COVRConfig(**cfg.covr.as_dict())
    with vlm_stream(cfg.run.seed, VLM_BUILD):  # the agent's random streams stay its own
        vlm = build_vlm(cfg, device)
    space = env.action_space
    codec, prompt = build_codec_and_prompt(covr, env)
    context = GuideContext(
        action_low=space.low,
        action_high=space.high,
        seed=stream_seed(cfg.run.seed, GUIDE),
        vlm=vlm,
        prompt=prompt,
        codec=codec,
        max_new_tokens=covr.max_new_tokens,
        batch_size=covr.guide_batch_size,
        load_policy=partial(_load_guide_policy, env=env, device=device),
    )
    with vlm_stream(cfg.run.seed, GUIDE):  # a policy guide's weight init draws from torch
        guide = build_guide(cfg, context)
    vlm_guide = guide if isinstance(guide, VLMGuide) else VLMGuide.build(context)
    sft_args = init_args(cfg.sft)
    if sft_args.get("gamma") is None:  # the return-to-go discounts like the critic
        sft_args["gamma"] = float(policy.gamma)
    sft = import_class(cfg.sft.class_path)(**sft_args, seed=int(cfg.run.seed))
    if not isinstance(sft, SFTDataModule):
        raise ConfigError(
            f"sft.class_path {cfg.sft.class_path} is not an SFTDataModule",
            "subclass covr_lightning.data.sft.SFTDataModule",
        )
    return COVRParts(
        vlm=vlm,
        codec=codec,
        guide=guide,
        vlm_guide=vlm_guide,
        sft=sft,
        collate=partial(encode_sft_batch, vlm.processor, vlm_guide.prompt_text),
    )


def build_codec_and_prompt(covr: COVRConfig, env: PixelEnv) -> tuple[Any, ActionPrompt]:
    """The env's action codec (or ``covr.codec``) and the task prompt (``covr.task`` or the env's).

    Raises:
        ConfigError: The env has no task description and ``covr.task`` is empty.
    """
    space = env.action_space
    codec = make_codec(covr.codec or env.codec_kind, space.low, space.high)
    task = covr.task or env.task_description
    if not task:
        raise ConfigError(
            f"env {type(env).__name__} has no task_description for the VLM prompt",
            "set covr.task to a sentence describing the task",
        )
    return codec, ActionPrompt(task, codec.describe())


def build_guide(cfg: Namespace, context: GuideContext) -> Guide:
    """The recipe's ``guide`` (default: the VLM guide), made with the run's context.

    Raises:
        ConfigError: ``guide.class_path`` is not a :class:`~covr_lightning.guides.base.Guide`.
    """
    if cfg.get("guide") is None:
        return VLMGuide.build(context)
    cls = import_class(cfg.guide.class_path)
    if not (isinstance(cls, type) and issubclass(cls, Guide)):
        raise ConfigError(
            f"guide.class_path {cfg.guide.class_path} is not a covr_lightning.guides.base.Guide",
            "subclass Guide, or use covr_lightning.vlm.guide.VLMGuide",
        )
    return cls.build(context, **init_args(cfg.guide))


def _load_guide_policy(path: str, env: PixelEnv, device: str) -> SACPolicyModule:
    """A trained policy for a policy guide; its observations must match this run's env."""
    return build_trained_policy(load_saved_run(path), env, device)


# --------------------------------------------------------------------------- loops


def prepare_run_dir(cfg: Namespace, resume: str | None) -> tuple[Path, Path | None]:
    """Check the run directory is writable; find the checkpoint to resume from, if any.

    Returns:
        ``(run directory, checkpoint to resume from or None)``.

    Raises:
        ConfigError: Unwritable directory, nothing to resume, or a fresh run over checkpoints.
    """
    run_dir = run_directory(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory {run_dir} ({err.strerror or err})",
            "set run.dir to a writable folder",
        ) from err
    if resume is not None:
        return run_dir, ckpt.resolve_resume(resume, run_dir)
    if ckpt.latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints",
            "continue it with --resume last, or start a new one with run.name=NEW",
        )
    return run_dir, None


def build_loop(
    cfg: Namespace, resume: str | None = None, parent_run_id: str | None = None
) -> RLLoop:
    """The training loop of a recipe: ``RLLoop`` without COVR, ``COVRLoop`` with it.

    Args:
        cfg: The resolved recipe.
        resume: ``None`` for a fresh run, ``"last"`` or a checkpoint/run path to continue one.
        parent_run_id: MLflow run id of a seed sweep's parent (this run becomes its child).

    Raises:
        ConfigError: Any recipe value the build or the checkpoint refuses.
    """
    if cfg.covr.enabled:  # before the run directory exists: a refused run leaves nothing
        check_devices(cfg.covr.sft_strategy, cfg.covr.sft_devices, cfg.run.accelerator)
    run_dir, resume_from = prepare_run_dir(cfg, resume)
    parts = build_rl_parts(cfg, parent_run_id)
    if not cfg.covr.enabled:
        return RLLoop(cfg, parts, run_dir, resume_from)
    covr_parts = build_covr_parts(cfg, parts.eval_env, parts.policy, str(parts.fabric.device))
    return COVRLoop(cfg, parts, covr_parts, run_dir, resume_from)


# --------------------------------------------------------------------------- trained policies


@dataclass
class SavedRun:
    """What ``evaluate`` and ``export`` read from a checkpoint: the run's config and policy weights.

    Attributes:
        checkpoint: The checkpoint directory (``<run_dir>/checkpoints/env_step_*``).
        run_dir: The run directory holding ``config.yaml``.
        cfg: The run's resolved recipe.
        state: The checkpoint's state (memory-mapped: only the tensors touched are read).
        env_steps: Env steps done when the checkpoint was written.
        mlflow_run_id: The training run's MLflow run id, if it logged to MLflow.
    """

    checkpoint: Path
    run_dir: Path
    cfg: Namespace
    state: dict[str, Any]
    env_steps: int
    mlflow_run_id: str | None

    @property
    def policy_class(self) -> str | None:
        """Dotted class path of the policy stored in the checkpoint."""
        return self.state.get("policy_class")


def load_saved_run(path: str | Path) -> SavedRun:
    """Resolve a run dir / checkpoint dir / ``state.pt`` and read its config and state.

    Raises:
        ConfigError: Missing or corrupt checkpoint, missing or invalid ``config.yaml``.
    """
    given = Path(path).expanduser()
    usage = f"pass a run directory, a checkpoint directory or its {ckpt.STATE_FILE}"
    if not given.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or directory", usage)
    try:
        checkpoint = ckpt.resolve_resume(str(given), given)
    except ConfigError as err:
        raise ConfigError(f"--checkpoint {path}: not a checkpoint or run directory", usage) from err
    run_dir = checkpoint.parent.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"no config.yaml in {run_dir} (expected <run_dir>/checkpoints/{checkpoint.name})",
            "pass a checkpoint inside a run directory written by `covr-lightning fit`",
        )
    cfg = load_recipe(str(config_file))
    fix = f"pass another checkpoint of the run (ls {checkpoint.parent})"
    state = ckpt.read_state(checkpoint, fix=fix, mmap=True)
    if not isinstance(state.get("policy"), dict):
        raise ConfigError(f"checkpoint {checkpoint} has an unknown format (no policy weights)", fix)
    return SavedRun(
        checkpoint=checkpoint,
        run_dir=run_dir,
        cfg=cfg,
        state=state,
        env_steps=int((state.get("loop") or {}).get("env_steps", 0)),
        mlflow_run_id=state.get("mlflow_run_id"),
    )


def build_trained_policy(saved: SavedRun, env: PixelEnv, device: str = "cpu") -> SACPolicyModule:
    """The run's policy class with the checkpoint's weights, in eval mode on ``device``.

    Raises:
        ConfigError: The weights do not fit the policy the run's config builds.
    """
    policy = build_policy(saved.cfg, env)
    fix = f"restore {saved.run_dir / 'config.yaml'} as the run wrote it"
    ckpt.load_policy_state(policy, saved.state, saved.checkpoint, fix)
    return policy.to(device).eval()


def build_trained_vlm_guide(
    saved: SavedRun, env: PixelEnv, device: str = "cpu", adapter_dir: str | Path | None = None
) -> VLMGuide:
    """The run's VLM with the checkpoint's LoRA adapter, as a guide (``evaluate --vlm``).

    Args:
        saved: The run and checkpoint.
        env: An env of the run (action bounds, task text).
        device: Torch device of the VLM.
        adapter_dir: A saved adapter folder (``<run>/adapters/round_<c>``) to play instead of
            the checkpoint's.

    Raises:
        ConfigError: The checkpoint is of a run without COVR, or the adapter does not fit the
            VLM the run's config builds.
    """
    adapter = (saved.state.get("covr") or {}).get("adapter")
    if adapter_dir is not None:
        from safetensors.torch import load_file

        path = Path(adapter_dir) / "adapter_model.safetensors"
        if not path.is_file():
            raise ConfigError(
                f"--adapter {adapter_dir}: no adapter_model.safetensors there",
                f"pass a folder of {saved.run_dir / 'adapters'}",
            )
        adapter = load_file(path)
    if adapter is None:
        raise ConfigError(
            f"checkpoint {saved.checkpoint} holds no VLM adapter (covr.enabled was false)",
            "pass a checkpoint of a COVR run, or drop --vlm",
        )
    covr = COVRConfig(**saved.cfg.covr.as_dict())
    with vlm_stream(saved.cfg.run.seed, VLM_BUILD):
        vlm = build_vlm(saved.cfg, device)
    try:
        vlm.load_adapter_state_dict(adapter)
    except ValueError as err:
        raise ConfigError(
            f"checkpoint {saved.checkpoint}: {err}",
            f"restore {saved.run_dir / 'config.yaml'} as the run wrote it",
        ) from err
    codec, prompt = build_codec_and_prompt(covr, env)
    return VLMGuide(vlm, prompt, codec, covr.max_new_tokens or None, covr.guide_batch_size)
