"""The paper's numbers beside a run: which entry of ``paper_numbers.yaml`` a run matches.

The numbers are data (``paper_numbers.yaml``, each entry naming its table in the paper); this
module reads them and matches a run's logged params: DMC by (domain, task, base algorithm),
CARLA by scenario. A run's base algorithm comes from its policy class's hierarchy
(:func:`base_algorithm`), so a user's ``GradientPenaltySAC(SACPolicyModule)`` counts as SAC and
any subclass of ``RADModule`` as RAD, whatever their names.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib import resources
from typing import Any

import yaml

from covr_lightning.policies.deepmdp import DeepMDPModule
from covr_lightning.policies.rad import RADModule
from covr_lightning.policies.sac import SACPolicyModule

_BASES = (("DeepMDP", DeepMDPModule), ("RAD", RADModule), ("SAC", SACPolicyModule))
"""Most specific first: RAD and DeepMDP are SAC subclasses."""
_SCENARIO_TAGS = {"highway": "#HW", "ghost_pedestrian": "#GP"}


@cache
def paper_numbers() -> dict[str, list[dict[str, Any]]]:
    """The parsed ``paper_numbers.yaml`` (``dmc`` and ``carla`` lists of entries)."""
    text = (resources.files("covr_lightning.tracking") / "paper_numbers.yaml").read_text()
    return yaml.safe_load(text)


def base_algorithm(policy_class_path: str) -> str | None:
    """``SAC``, ``RAD`` or ``DeepMDP`` by class hierarchy; ``None`` for a class that does not
    import (a run logged by code no longer installed) or is none of them."""
    module_name, _, class_name = policy_class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return None
    if not isinstance(cls, type):
        return None
    return next((name for name, base in _BASES if issubclass(cls, base)), None)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def paper_number(params: dict[str, str]) -> str:
    """The paper's number for a run's logged params, as a table cell, or ``""``.

    Args:
        params: Flattened params of the run (``env.domain``, ``env.task``, ``env.scenario``,
            ``policy.class_path``, ``covr.enabled``).
    """
    with_covr = _truthy(params.get("covr.enabled"))
    scenario = params.get("env.scenario")
    if scenario in _SCENARIO_TAGS:
        method = "COVR" if with_covr else "SAC"
        for entry in paper_numbers()["carla"]:
            if entry["scenario"] == scenario and entry["method"] == method:
                return (
                    f"{entry['reward']:g} reward / {entry['distance']:g} distance "
                    f"({method}, {_SCENARIO_TAGS[scenario]})"
                )
        return ""
    base = base_algorithm(params.get("policy.class_path", ""))
    for entry in paper_numbers()["dmc"]:
        if (entry["domain"], entry["task"], entry["base"]) != (
            params.get("env.domain"),
            params.get("env.task"),
            base,
        ):
            continue
        value = entry["with_covr"] if with_covr else entry["base_only"]
        if value is None:
            return ""
        label = f"COVR on {base}" if with_covr else base
        return f"{value:g} ({label}, {entry['budget'] // 1000}k)"
    return ""
