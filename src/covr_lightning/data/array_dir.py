"""A directory of ``.npy`` arrays plus ``meta.json``: how replay and D_f go to disk.

``meta.json`` is removed first and written last (atomically), so an interrupted save leaves a
directory that :func:`read_meta` rejects. Arrays are checked for shape and dtype against what the
metadata implies before the caller changes anything, so a bad checkpoint leaves it as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from covr_lightning.errors import ConfigError

META_FILE = "meta.json"
RESUME_FIX = "resume from another checkpoint (--resume PATH) or start fresh without --resume"


def save_array_dir(
    directory: str | Path, arrays: dict[str, np.ndarray], rows: int, meta: dict[str, Any]
) -> None:
    """Write ``arrays[name][:rows]`` to ``<directory>/<name>.npy`` (from views), then ``meta``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / META_FILE
    meta_path.unlink(missing_ok=True)
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array[:rows], allow_pickle=False)
    tmp = directory / f"{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)


def read_meta(directory: str | Path, what: str) -> dict[str, Any]:
    """The parsed ``meta.json`` of a saved directory.

    Raises:
        ConfigError: Missing or unreadable (``what`` names the store in the message).
    """
    meta_path = Path(directory) / META_FILE
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {what} metadata {meta_path} ({err})", RESUME_FIX) from err


def load_array_dir(
    directory: str | Path,
    expected: dict[str, tuple[tuple[int, ...], np.dtype]],
    what: str,
    mmap: bool = False,
) -> dict[str, np.ndarray]:
    """Open every expected array and check its shape and dtype.

    Args:
        directory: A directory written by :func:`save_array_dir`.
        expected: ``{name: (shape, dtype)}`` implied by the metadata.
        what: The store's name for messages (``replay``, ``SFT``).
        mmap: Memory-map the files (read-only) instead of reading them into memory.

    Raises:
        ConfigError: A file is missing, truncated, corrupt, or disagrees with the metadata.
    """
    stored: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in expected.items():
        path = Path(directory) / f"{name}.npy"
        try:
            stored[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ConfigError(
                f"{what} file {path} is missing or corrupt ({err})", RESUME_FIX
            ) from err
        if stored[name].shape != tuple(shape) or stored[name].dtype != dtype:
            raise ConfigError(
                f"{what} file {path} holds {stored[name].dtype} {stored[name].shape}, "
                f"meta.json says {dtype} {tuple(shape)}",
                RESUME_FIX,
            )
    return stored
