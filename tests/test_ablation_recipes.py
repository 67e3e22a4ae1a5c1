"""The ablation recipes are quickstart with only run.name and their own sft keys changed.

jsonargparse has no YAML includes, so each file under ``recipes/ablations/`` is a full copy of
``quickstart.yaml``. These tests catch a copy that drifted from quickstart (regenerate it), a
wrong ablation key, and a row of the paper's ablation table without a recipe.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from covr_lightning.config import config_to_dict, load_recipe, packaged_recipes_dir

ABLATIONS_DIR = packaged_recipes_dir() / "ablations"
BASE = "quickstart"
SFT = "sft.init_args."

# Every ablation recipe (file stem) and the sft.init_args values it sets, written out by hand.
EXPECTED: dict[str, dict[str, Any]] = {
    "quickstart_eddf_random": {"eddf_mode": "random"},
    "quickstart_eddf_top80": {"eddf_mode": "top_k", "eddf_quantile": 0.80},
    "quickstart_eddf_top90": {"eddf_mode": "top_k", "eddf_quantile": 0.90},
    "quickstart_eddf_top95": {"eddf_mode": "top_k", "eddf_quantile": 0.95},
    "quickstart_eddf_no_zscore": {"eddf_mode": "no_zscore"},
    "quickstart_return_immediate": {"return_signal": "immediate_reward"},
    "quickstart_return_q_value": {"return_signal": "q_value"},
    "quickstart_ralw_none": {"ralw_mode": "none"},
    "quickstart_ralw_random": {"ralw_mode": "random"},
    "quickstart_eddf_literal_sign": {"eddf_sign": "literal"},
}

# The paper's ablation table (CARLA, #HW; full COVR 248) -> (recipe, #HW).
PAPER_TABLE: dict[str, tuple[str, int]] = {
    "random filter": ("quickstart_eddf_random", 144),
    "fixed top-80 %": ("quickstart_eddf_top80", 204),
    "fixed top-90 %": ("quickstart_eddf_top90", 217),
    "fixed top-95 %": ("quickstart_eddf_top95", 192),
    "w/o z-score": ("quickstart_eddf_no_zscore", 210),
    "immediate reward": ("quickstart_return_immediate", 221),
    "Q-value": ("quickstart_return_q_value", 200),
    "w/o RALW": ("quickstart_ralw_none", 204),
    "random weights": ("quickstart_ralw_random", 184),
}

REGENERATE = (
    "ablations/{name}.yaml has drifted from quickstart.yaml: regenerate it as a full copy of "
    "quickstart.yaml that differs only in its header comment, run.name and its sft keys {keys}"
)

FILES = sorted(p.stem for p in ABLATIONS_DIR.glob("*.yaml"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@cache
def _resolved(name: str) -> dict[str, Any]:
    return _flatten(config_to_dict(load_recipe(name)))


def _body(text: str, drop_sft_keys: set[str]) -> list[str]:
    """The lines after the header comment, without run.name and the given sft.init_args keys."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    body, section = [], None
    for line in lines[start:]:
        if line and not line.startswith((" ", "#")):
            section = line.split(":")[0]
        key = line.strip().split(":")[0]
        if section == "run" and line.startswith("  ") and key == "name":
            continue
        if section == "sft" and line.startswith("    ") and key in drop_sft_keys:
            continue
        body.append(line)
    return body


def test_every_file_has_an_expected_entry_and_back():
    assert sorted(EXPECTED) == FILES


def test_every_ablation_of_the_paper_table_has_a_recipe():
    assert len(PAPER_TABLE) == 9
    for row, (recipe, _) in PAPER_TABLE.items():
        assert (ABLATIONS_DIR / f"{recipe}.yaml").is_file(), f"no recipe for the ablation {row!r}"
        assert recipe in EXPECTED


@pytest.mark.parametrize("name", FILES)
def test_ablation_differs_from_quickstart_only_in_its_keys(name):
    base, ablation = _resolved(BASE), _resolved(f"ablations/{name}")
    assert set(ablation) == set(base)
    differing = {key for key in base if base[key] != ablation[key]}
    expected = {f"{SFT}{key}": value for key, value in EXPECTED[name].items()}
    assert ablation["run.name"] == name
    for key, value in expected.items():
        assert ablation[key] == value, key
    # Keys set to quickstart's value (eddf_quantile 0.90 is the default) do not differ.
    assert differing == {"run.name"} | {k for k, v in expected.items() if base[k] != v}
    assert differing - {"run.name"}, f"{name} changes no sft key"
    assert all(key == "run.name" or key.startswith(SFT) for key in differing)


@pytest.mark.parametrize("name", FILES)
def test_ablation_text_is_quickstart_apart_from_header_name_and_its_keys(name):
    keys = set(EXPECTED[name])
    base = _body((packaged_recipes_dir() / f"{BASE}.yaml").read_text(), keys)
    text = (ABLATIONS_DIR / f"{name}.yaml").read_text()
    assert _body(text, keys) == base, REGENERATE.format(name=name, keys=sorted(keys))
    header = text.split("\n\n")[0].splitlines()[0]
    assert header.startswith("# Quickstart ablation: ")
    assert f"covr-lightning fit --recipe ablations/{name}\n" in text
    number = next((n for recipe, n in PAPER_TABLE.values() if recipe == name), None)
    if number is not None:
        assert f"#HW: {number} vs 248" in header
