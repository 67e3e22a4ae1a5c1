"""Recipes: find them, read and compose them, apply overrides, validate every value.

A recipe is a YAML mapping with the top-level sections of :data:`SECTIONS`, optionally naming a
``base`` recipe it changes (see :func:`read_recipe`). ``run``, ``covr`` and ``tracking`` are small
dataclasses; ``env``, ``policy``, ``replay``, ``guide``, ``vlm`` and ``sft`` are components written in
jsonargparse's ``class_path`` / ``init_args`` form, so a user's own subclass in their own module is
picked by its dotted path and its extra ``__init__`` arguments are validated like the package's
own. Values are validated by the typed signatures (``jsonargparse.typing``'s bounded types,
``Literal`` choices), and any file or value that is not a valid recipe ends in one
:class:`~covr_lightning.errors.ConfigError` line before anything is built.

This module builds nothing: :mod:`covr_lightning.build` turns a resolved recipe into objects and
passes the arguments that come from the run (``obs_shape``, ``action_dim``, ``seed``, ...).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
)

from covr_lightning.envs.base import PixelEnv
from covr_lightning.errors import ConfigError
from covr_lightning.recipe_files import (  # noqa: F401 - find/list are part of this API
    check_finite,
    find_recipe,
    list_recipes,
    packaged_recipes_dir,
    read_recipe,
)
from covr_lightning.types import VLMImageSize

SECTIONS = ("run", "env", "policy", "replay", "covr", "guide", "vlm", "sft", "tracking")
"""Top-level recipe sections."""


# Arguments the builder passes at the call site; never recipe keys.
_CALL_SITE_ARGS = {
    "env": {"seed"},
    "policy": {"obs_shape", "action_dim"},
    "replay": {"seed"},
    "sft": {"seed"},
    "guide": {"policy", "action_low", "action_high", "seed", "vlm", "prompt", "codec"}
    | {"max_new_tokens", "batch_size"},
}


@dataclass
class RunConfig:
    """Budget, cadence and hardware of one training run.

    Args:
        name: Run name; the run writes to ``<dir>/<tracking.experiment>/<name>/``.
        dir: Root folder of all runs.
        seed: Seed of everything (env, networks, replay sampler, random warm-up actions).
        total_env_steps: Training budget in env steps (agent steps x action repeat).
        seed_env_steps: Env steps of uniformly random actions before the first update.
        eval_every_env_steps: Evaluate the deterministic policy every this many env steps.
        eval_episodes: Episodes per evaluation.
        checkpoint_every_env_steps: Write a checkpoint at the first episode end after this many
            env steps since the last one (and always at the end of the run).
        keep_checkpoints: How many checkpoints to keep on disk (oldest are deleted).
        log_every_env_steps: Average the update metrics over this many env steps before logging.
        accelerator: Fabric accelerator: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        precision: Fabric precision, e.g. ``32-true`` or ``bf16-mixed``.
        num_envs: Training envs stepped together (worker processes when > 1); each agent step
            of each env counts, and the policy still gets one update per agent step.
    """

    name: str = "covr"
    dir: str = "runs"
    seed: NonNegativeInt = 1
    total_env_steps: PositiveInt = 100_000
    seed_env_steps: NonNegativeInt = 4_000
    eval_every_env_steps: PositiveInt = 10_000
    eval_episodes: PositiveInt = 10
    checkpoint_every_env_steps: PositiveInt = 10_000
    keep_checkpoints: PositiveInt = 2
    log_every_env_steps: PositiveInt = 1_000
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"] = (
        "32-true"
    )
    num_envs: PositiveInt = 1


@dataclass
class COVRConfig:
    """How the RL agent and the VLM train each other (docs/loop.md).

    Args:
        enabled: Run COVR; ``false`` runs the same loop as the plain base algorithm (no VLM is
            loaded, no prior, no fine-tuning).
        psi_0: Length of round 0 in env steps.
        growth: ``factorial`` (the paper's psi_{c+1} = psi_c + psi_c * c) or ``linear``.
        cold_start_rounds: Rounds without the lambda term at the start (DMC 4, CARLA 2).
        guide_every: Ask the guide every this many frames (agent steps).
        prior_scope: Which transitions carry the answer as their prior: ``query`` (default, only
            the transition of the frame the guide saw) or ``held`` (the paper's reading: every
            transition until the next query). docs/method.md, "One answer, one state".
        prior_filter: ``none`` (the paper) or ``q``: the prior term applies only to rows where the
            critic values a_v above the actor's own action (Nair et al. 2018's Q-filter).
        sft_every: Store a D_f row (VLM-sized render + the policy's action) every this many
            frames; rewards of every step feed the return-to-go either way. 1 (the paper) stores
            every frame.
        prior_weight: lambda of the actor's ``lambda * ||a_v - a_r||^2`` term (DMC 1, CARLA 2).
        vlm_image_size: Side of the render the VLM sees (larger than the policy's frames).
        task: Task prompt; empty takes the env's ``task_description``.
        codec: Action codec kind (``numeric``, ``carla``, ``car_racing``); empty takes the env's.
        max_new_tokens: Generation budget of a guide query; 0 sizes it from the codec.
        guide_batch_size: Frames per ``generate`` call.
        guide_async: Answer queries on a worker thread while the agent steps on (default); a
            transition gets its prior when the answer arrives and is masked until then.
            ``false`` waits for each answer (the synchronous path, for debugging).
        guide_min_batch: Frames the guide worker collects before it answers (asynchronous
            guidance): larger batches cost less per frame and arrive later. 0 sizes it from the
            cadence: the frames that queue in 32 agent steps (``guide_every`` 1 with one env:
            32; ``guide_every`` 10: 4), at most ``guide_batch_size``.
        guide_threads: CPU threads of the guide worker's kernels (0: torch's default). One
            leaves the other cores to the agent's update.
        sft_epochs: Passes over the filtered D_f per fine-tune.
        sft_min_steps: Floor on optimizer steps per fine-tune: passes over the SFT set repeat until
            it is reached, so a round with few kept rows still trains (0: no floor).
        sft_max_steps: Cap on optimizer steps per fine-tune (0: no cap).
        vlm_eval_episodes: Episodes of the VLM acting alone (``vlm/eval_return``) before the
            first fine-tune and after each one (0: off).
        sft_grad_clip: Gradient-norm clip of the adapter (0: off).
        sft_strategy: ``single`` (the fine-tune runs in the training process, on the VLM's
            device) or ``ddp`` / ``fsdp``: each fine-tune runs in ``sft_devices`` spawned
            processes through that Fabric strategy (CUDA devices 0..N-1, or CPU processes on
            gloo), while the policy stays where it is. ``sft.batch_size`` stays the global batch.
        sft_devices: Processes (devices) of a ``ddp`` / ``fsdp`` fine-tune.
        release_vlm_memory: After each fine-tune, free the VLM optimizer and the CUDA cache.
    """

    enabled: bool = True
    psi_0: PositiveInt = 5_000
    growth: Literal["factorial", "linear"] = "factorial"
    cold_start_rounds: NonNegativeInt = 4
    guide_every: PositiveInt = 10
    prior_scope: Literal["query", "held"] = "query"
    prior_filter: Literal["none", "q"] = "none"
    sft_every: PositiveInt = 1
    prior_weight: NonNegativeFloat = 1.0
    vlm_image_size: VLMImageSize = 224
    task: str = ""
    codec: Literal["", "numeric", "carla", "car_racing"] = ""
    max_new_tokens: NonNegativeInt = 0
    guide_batch_size: PositiveInt = 32
    guide_async: bool = True
    guide_min_batch: NonNegativeInt = 0
    guide_threads: NonNegativeInt = 1
    sft_epochs: PositiveInt = 1
    sft_min_steps: NonNegativeInt = 50
    sft_max_steps: NonNegativeInt = 0
    vlm_eval_episodes: NonNegativeInt = 2
    sft_grad_clip: NonNegativeFloat = 1.0
    sft_strategy: Literal["single", "ddp", "fsdp"] = "single"
    sft_devices: PositiveInt = 1
    release_vlm_memory: bool = True


@dataclass
class TrackingConfig:
    """Where metrics go.

    Args:
        experiment: MLflow experiment name; also the middle folder of the run directory.
        uri: MLflow tracking URI. Empty means ``$MLFLOW_TRACKING_URI`` if set, else
            ``sqlite:///mlflow.db`` in the working directory (what a plain ``mlflow ui`` reads).
        enabled: Log to MLflow at all (checkpoints and the progress bar work either way).
    """

    experiment: str = "covr-lightning"
    uri: str = ""
    enabled: bool = True


def run_directory(cfg: Namespace) -> Path:
    """``<run.dir>/<tracking.experiment>/<run.name>``: where a run writes everything."""
    return Path(cfg.run.dir) / cfg.tracking.experiment / cfg.run.name


def build_parser() -> ArgumentParser:
    """The jsonargparse parser that validates a whole recipe."""
    from covr_lightning.data.replay import ReplayDataModule
    from covr_lightning.data.sft import SFTDataModule
    from covr_lightning.guides.base import Guide
    from covr_lightning.policies.sac import SACPolicyModule
    from covr_lightning.vlm.module import VLMLoRAModule

    parser = ArgumentParser(exit_on_error=False, default_env=False)
    parser.add_class_arguments(RunConfig, "run")
    parser.add_subclass_arguments(PixelEnv, "env", skip=_CALL_SITE_ARGS["env"], required=True)
    parser.add_subclass_arguments(
        SACPolicyModule, "policy", skip=_CALL_SITE_ARGS["policy"], required=True
    )
    parser.add_subclass_arguments(
        ReplayDataModule, "replay", skip=_CALL_SITE_ARGS["replay"], required=True
    )
    parser.add_class_arguments(COVRConfig, "covr")
    parser.add_subclass_arguments(Guide, "guide", skip=_CALL_SITE_ARGS["guide"], required=False)
    parser.add_subclass_arguments(VLMLoRAModule, "vlm", required=False)
    parser.add_subclass_arguments(SFTDataModule, "sft", skip=_CALL_SITE_ARGS["sft"], required=False)
    parser.add_class_arguments(TrackingConfig, "tracking")
    return parser


# --------------------------------------------------------------------------- finding recipes


# --------------------------------------------------------------------------- parsing


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Namespace:
    """Read a recipe (merging its bases), apply ``dotted.key=value`` overrides, validate everything.

    Args:
        name_or_path: Packaged recipe name or path to a YAML file.
        overrides: ``section.key=value`` strings; values are read as YAML (``1e-3``, ``true``).

    Returns:
        The fully resolved configuration (bases merged, defaults filled in).

    Raises:
        ConfigError: Unknown recipe, a file that is not a recipe, a missing or circular base,
            an unknown key, a wrong type or value, a bad class path.
    """
    path = find_recipe(name_or_path)
    raw = read_recipe(path, find_recipe, _check_sections)

    args = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override '{item}' is not of the form dotted.key=value",
                "write it like policy.actor_lr=3e-4",
            )
        _check_sections([key.split(".")[0]], where="the command line")
        args.append(f"--{key}={value}")

    parser = build_parser()
    try:
        cfg = parser.parse_object(raw)
        if args:
            cfg = parser.parse_args(args, namespace=cfg)
    except Exception as err:  # jsonargparse raises ArgumentError/TypeError/ValueError variants
        raise summarise_parse_error(str(err), cfg_source=str(path)) from err
    check_finite(config_to_dict(cfg), str(path))
    return _plain_numbers(cfg)


def _plain_numbers(cfg: Namespace) -> Namespace:
    """Replace the typed numbers jsonargparse returns (``PositiveInt(3)``...) by plain ints and
    floats: they would otherwise reach optimizer states and checkpoints, which torch's
    ``weights_only`` loader refuses, and worker processes, which cannot unpickle them."""
    for key, value in list(cfg.items()):
        cfg[key] = _plain(value)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and type(value) is not int:
        return int(value)
    if isinstance(value, float) and type(value) is not float:
        return float(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def dump_config(cfg: Namespace) -> str:
    """The resolved config as YAML, the form written to ``config.yaml`` and shown by ``--dry-run``."""
    return build_parser().dump(cfg)


def config_to_dict(cfg: Namespace) -> dict[str, Any]:
    """The resolved config as plain nested dicts."""
    return yaml.safe_load(dump_config(cfg))


def _check_sections(keys, where: str) -> None:
    for key in keys:
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, SECTIONS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown recipe section '{key}' in {where}",
                f"{hint}valid sections are {', '.join(SECTIONS)}",
            )


_TYPE_WORDS = {
    "PositiveInt": "an integer > 0",
    "NonNegativeInt": "an integer >= 0",
    "PositiveFloat": "a number > 0",
    "NonNegativeFloat": "a number >= 0",
    "ClosedUnitInterval": "a number in [0, 1]",
    "OpenUnitInterval": "a number in (0, 1)",
    "VLMImageSize": "an integer >= 28",
    "OpenClosedUnitInterval": "a number in (0, 1]",
    "UnitFraction": "a number in [0, 1)",
}
"""How the typed signatures' types read in an error line."""


def summarise_parse_error(message: str, cfg_source: str = "the recipe") -> ConfigError:
    """Turn one of jsonargparse's multi-line messages into a one-line :class:`ConfigError`.

    The patterns below read jsonargparse 4.x's wording (pyproject.toml bounds it below 5); any
    message they do not recognise still ends as one line, with the first line of the message.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    key = ".".join(keys)
    dry = "`--dry-run` prints every valid key with its value"

    if m := re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message):
        class_path, reason = m[1], m[2].strip()
        if "not accepted" not in reason and "Parser key" not in reason:
            return ConfigError(
                f"cannot use class_path '{class_path}' for '{key}': {reason}",
                "check the dotted path and that its module is importable (installed or on PYTHONPATH)",
            )
    if m := re.search(r"Import path (\S+) does not correspond to a subclass of (\w+)", message):
        return ConfigError(
            f"class_path '{m[1]}' for '{key}' is not a subclass of {m[2]}",
            f"point {key}.class_path at a subclass of {m[2]}",
        )
    if m := re.search(r"Option '([^']+)' is not accepted", message):
        owner = re.search(r"Problem with given class_path '([^']+)'", message)
        return _unknown_key(f"{keys[0]}.{m[1]}" if keys else m[1], dry, owner[1] if owner else None)
    if m := re.search(r"Group '([^']+)' does not accept option '([^']+)'", message):
        return _unknown_key(f"{m[1]}.{m[2]}", dry)
    if m := re.search(r"unrecognized arguments: --([^=\s]+)", message):
        return _unknown_key(m[1], dry)
    if m := re.search(r"Not of type (\w+): (.*?) does not conform to restriction (.+)", message):
        return ConfigError(
            f"recipe key '{key}' is {m[2].strip()}, but it must be {_TYPE_WORDS.get(m[1], m[1])} "
            f"({m[3].strip()})",
            f"give {key} such a value in {cfg_source} or as the override {key}=VALUE",
        )
    if m := re.search(r"Not of type (\w+): (.*)", message):
        return ConfigError(
            f"recipe key '{key}' expects {_TYPE_WORDS.get(m[1], m[1])} ({m[2].strip()})",
            f"give {key} a value of that type in {cfg_source} or as the override {key}=VALUE",
        )
    if m := re.search(r"Expected a (.+?)\. Got value: (.*)", message):
        expected = re.sub(r"<class '([\w.]+)'>", r"\1", m[1])
        return ConfigError(
            f"recipe key '{key}' expects {expected}, got {m[2].strip()!r}",
            f"give {key} a value of that type in {cfg_source} or as the override {key}=VALUE",
        )
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), message)
    return ConfigError(f"invalid recipe ({first})", dry)


def _unknown_key(dotted: str, dry: str, class_path: str | None = None) -> ConfigError:
    section, _, name = dotted.rpartition(".")
    valid = _valid_keys(section, class_path)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{section}.{close[0]}'? " if close else ""
    return ConfigError(f"unknown recipe key '{dotted}'", f"{hint}{dry}")


def _valid_keys(section: str, class_path: str | None = None) -> list[str]:
    """Recipe keys of a section: dataclass fields, or a component's ``__init__`` parameters."""
    if section == "run":
        return list(inspect.signature(RunConfig).parameters)
    if section == "tracking":
        return list(inspect.signature(TrackingConfig).parameters)
    if class_path is None:
        return []
    try:
        cls = import_class(class_path)
    except ConfigError:
        return []
    names: list[str] = []
    for klass in cls.__mro__:  # subclasses forward **kwargs to their parents
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.append(param.name)
    return names


# --------------------------------------------------------------------------- building


def import_class(class_path: str) -> type:
    """Import ``pkg.module.Class``.

    Raises:
        ConfigError: The module or the class does not exist.
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"cannot import '{class_path}' ({err})",
            "check the dotted path and that its module is importable",
        ) from err
