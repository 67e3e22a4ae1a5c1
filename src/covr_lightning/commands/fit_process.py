"""The ``python -m covr_lightning fit`` subprocess that runs one seed of a sweep: its environment.

A local ``--parallel`` child (:mod:`covr_lightning.commands.sweep`) and the fit inside a cluster
job (:mod:`covr_lightning.commands.cluster`) both get their environment here, so a seed runs the
same way wherever it is launched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity: a SLURM job's allocation, a taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fit_env(base: Mapping[str, str], threads: int) -> dict[str, str]:
    """The environment of a seed's fit subprocess.

    Args:
        base: The environment to start from (the launching process's own).
        threads: torch threads for the fit, unless ``base`` already sets them (the user's choice
            wins): N fits on one machine share its cores instead of each taking all of them.

    Returns:
        ``base`` plus the thread counts, unbuffered output and this package on ``PYTHONPATH``.
    """
    env = dict(base)
    for name in THREAD_VARIABLES:
        env.setdefault(name, str(max(1, threads)))
    env["PYTHONUNBUFFERED"] = "1"  # lines reach fit.log (and the console) as they happen
    # The fit imports the same covr_lightning as the launching process, whatever is installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env
