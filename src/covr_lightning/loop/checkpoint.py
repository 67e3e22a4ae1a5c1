"""Whole-state checkpoints, written atomically.

Layout of one checkpoint (a directory, so the replay buffer can stream to its own files)::

    runs/<experiment>/<name>/checkpoints/
        env_step_000012000/
            state.pt        modules, optimizers, loop position, RNG states (Fabric checkpoint I/O)
            replay/         the replay buffer, one .npy per array + meta.json
        last                text file naming the newest complete checkpoint directory

A checkpoint is first written to a hidden temporary directory and then renamed into place, and
``last`` is replaced atomically after that, so a run killed mid-write leaves the previous
checkpoint intact and ``--resume last`` never sees a half-written one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covr_lightning.errors import ConfigError

FORMAT_VERSION = 1
STATE_FILE = "state.pt"
REPLAY_DIR = "replay"
LAST_POINTER = "last"
_PREFIX = "env_step_"


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that ``last`` points at, or ``None`` if the run has none yet."""
    pointer = checkpoints_dir(run_dir) / LAST_POINTER
    if not pointer.is_file():
        return None
    target = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return target if target.is_dir() else None


def save_checkpoint(
    fabric,
    run_dir: Path,
    env_steps: int,
    state: dict[str, Any],
    stores: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``state`` and the ``stores`` as one checkpoint; keep only the newest ``keep``.

    Args:
        fabric: The run's :class:`lightning.Fabric` (its checkpoint I/O writes ``state.pt``).
        run_dir: The run directory.
        env_steps: Env steps done; names the checkpoint.
        state: Plain-typed state (tensors, numbers, strings, lists, dicts) for ``state.pt``.
        stores: ``{subfolder: object with save(directory)}`` (replay buffer, COVR's D_f).
        keep: Number of checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{_PREFIX}{env_steps:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    fabric.save(tmp / STATE_FILE, {"format_version": FORMAT_VERSION, **state})
    for folder, store in stores.items():
        store.save(tmp / folder)
    if final.exists():  # same env step written twice (e.g. interrupt right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / LAST_POINTER, final.name)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """Turn ``--resume last|PATH`` into a checkpoint directory.

    ``PATH`` may be a checkpoint directory, its ``state.pt`` or a run directory (its latest one).

    Raises:
        ConfigError: Nothing to resume from.
    """
    if resume == "last":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(
                f"--resume last: no checkpoint in {checkpoints_dir(run_dir)}",
                "run without --resume to start this run, or pass --resume PATH to a checkpoint",
            )
        return found
    path = Path(resume).expanduser()
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    raise ConfigError(
        f"--resume {resume}: not a checkpoint or run directory",
        f"pass a folder holding {STATE_FILE}, a run directory, or 'last'",
    )


def read_state(checkpoint: Path, fix: str, mmap: bool = False) -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint directory onto the CPU (tensors only, no pickled code).

    The one reader of checkpoints: ``--resume`` loads the whole state through it, ``evaluate``
    and ``export`` only the policy's weights (with ``mmap``, only the tensors touched are read).

    Args:
        checkpoint: The checkpoint directory.
        fix: The fix line of the error, which depends on what the caller was doing.
        mmap: Memory-map the file instead of reading it whole.

    Raises:
        ConfigError: The file is missing, truncated, corrupt or of another format version.
    """
    try:
        state = torch.load(
            checkpoint / STATE_FILE, map_location="cpu", weights_only=True, mmap=mmap
        )
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/OSError
        raise ConfigError(
            f"checkpoint {checkpoint} is corrupt or unreadable ({type(err).__name__})", fix
        ) from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {checkpoint} has an unknown format", fix)
    return state


def class_path(obj: object) -> str:
    """``module.Qualname`` of ``obj``'s class: how a checkpoint names the policy it holds."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def require_policy_class(state: dict[str, Any], policy: object, checkpoint: Path, fix: str) -> None:
    """Refuse a checkpoint whose policy class differs from the one the recipe builds.

    Raises:
        ConfigError: The checkpoint names another class.
    """
    saved, built = state.get("policy_class"), class_path(policy)
    if saved != built:
        raise ConfigError(
            f"checkpoint {checkpoint} holds a {saved}, the recipe builds {built}", fix
        )


def load_policy_state(
    policy: Any, state: dict[str, Any], checkpoint: Path, fix: str, optimizers: list[Any] = ()
) -> None:
    """Load a checkpoint's policy weights (and optimizer states) strictly, after the class check.

    Raises:
        ConfigError: Another policy class, or weights/optimizers that do not fit the policy.
    """
    require_policy_class(state, policy, checkpoint, fix)
    try:
        policy.load_state_dict(state["policy"], strict=True)
        if optimizers:
            if len(state["optimizers"]) != len(optimizers):
                raise ValueError("number of optimizers differs")
            for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(
            f"checkpoint {checkpoint} does not match the policy the recipe builds "
            f"({str(err).splitlines()[0][:160]})",
            fix,
        ) from err


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch RNG states in checkpoint-safe types."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value):
    return [_to_plain(v) for v in value] if isinstance(value, tuple) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
