"""Recipe files: find one, read it safely, compose it over its base, refuse what is not a recipe.

:func:`read_recipe` turns a file into one mapping of sections with its ``base`` chain merged in
(the rule is :func:`merge_recipes`); :mod:`covr_lightning.config` then validates the values.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from covr_lightning.errors import ConfigError

BASE_KEY = "base"
"""Top-level key naming the recipe a recipe changes (a packaged name or a path relative to it)."""
_COMPONENTS = ("env", "policy", "replay", "guide", "vlm", "sft")
"""Sections in ``class_path`` / ``init_args`` form (replaced whole when the class changes)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (YAML silently keeps the
    last one, so a repeated key would hide a value the user wrote)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_mapping(path: Path) -> dict[str, Any]:
    """One recipe file as a mapping with string keys; one ConfigError line for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"recipe {path} is not a text file (not UTF-8)", "pass a YAML recipe file"
        ) from err
    except OSError as err:
        raise ConfigError(
            f"cannot read recipe {path} ({err.strerror or err})", "pass a readable YAML file"
        ) from err
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise ConfigError(
            f"recipe {path} is not valid YAML{line}: {problem}", "fix the YAML in that file"
        ) from err
    if raw is None:
        raise ConfigError(
            f"recipe {path} is empty",
            "write the sections run, env, policy, replay, covr, vlm, sft, tracking",
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"recipe {path} is a YAML {type(raw).__name__}, not a mapping of sections",
            "write a mapping of sections (run, env, policy, ...)",
        )
    _check_keys_are_text(raw, str(path), prefix="")
    return raw


def _check_keys_are_text(tree: dict, where: str, prefix: str) -> None:
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"recipe key {prefix}{key!r} in {where} is not text",
                "write keys as names (quote them if they look like numbers)",
            )
        if isinstance(value, dict):
            _check_keys_are_text(value, where, f"{prefix}{key}.")


def read_recipe(
    path: Path,
    find: Callable[[str], Path],
    check_sections: Callable[..., None],
    chain: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """A recipe file with its bases merged in, as one mapping of sections.

    Composition: a recipe may name ``base: NAME_OR_PATH`` (a path relative to the recipe's folder,
    or a packaged recipe name). Its sections are merged over the base's, mappings key by key and
    everything else replaced; a component whose ``class_path`` differs from the base's is
    replaced whole (its ``init_args`` start from the class's defaults, not the base's, since
    another class takes other arguments). Bases may have bases of their own.

    Args:
        path: The recipe file.
        find: Resolves a packaged recipe name to its file (``config.find_recipe``).
        check_sections: Refuses unknown top-level sections (``config``'s check).
        chain: The files that led here (cycle detection).

    Raises:
        ConfigError: A file that is not a recipe, a missing base, or a circular chain of bases.
    """
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"recipe bases form a cycle ({cycle})", "remove one of the base: keys")
    raw = _read_mapping(path)
    base_name = raw.pop(BASE_KEY, None)
    check_sections(raw.keys(), where=str(path))
    for section, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"recipe section '{section}' in {path} is a {type(value).__name__}, not a mapping",
                f"write {section}: as a mapping of keys (see docs/recipes.md)",
            )
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"base: {base_name!r} in {path} is not a recipe name", "write base: NAME")
    relative = path.parent / base_name
    try:
        base_path = relative if relative.is_file() else find(base_name)
    except ConfigError as err:
        raise ConfigError(
            f"base recipe '{base_name}' of {path} not found", err.fix or "fix the base: key"
        ) from err
    return merge_recipes(read_recipe(base_path, find, check_sections, (*chain, path)), raw)


def merge_recipes(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``delta``'s sections over ``base``'s (the composition rule of :func:`read_recipe`)."""
    merged = dict(base)
    for section, value in delta.items():
        old = merged.get(section)
        if (
            section in _COMPONENTS
            and isinstance(value, dict)
            and isinstance(old, dict)
            and "class_path" in value
            and value["class_path"] != old.get("class_path")
        ):
            merged[section] = value
        elif isinstance(value, dict) and isinstance(old, dict):
            merged[section] = _deep_merge(old, value)
        else:
            merged[section] = value
    return merged


def _deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def check_finite(tree: dict[str, Any], where: str, prefix: str = "") -> None:
    """No setting may be NaN or infinite (a NaN learning rate trains nothing, silently)."""
    for key, value in tree.items():
        name = f"{prefix}{key}" if key != "init_args" else prefix.rstrip(".")
        if isinstance(value, dict):
            check_finite(value, where, f"{name}." if name else "")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"recipe key '{name}' is {value}, not a finite number",
                f"give {name} a finite value in {where} or as an override",
            )


# --------------------------------------------------------------------------- finding


def packaged_recipes_dir() -> Path:
    """The packaged recipes: the top-level ``recipes/`` folder, shipped in the wheel as
    ``covr_lightning.recipes``."""
    return Path(str(resources.files("covr_lightning.recipes")))


def list_recipes() -> list[tuple[str, str]]:
    """Every packaged recipe as ``(name, first line of its header comment)``, sorted by name."""
    root = packaged_recipes_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        summary = ""
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                summary = line.lstrip("# ").strip()
                if summary:
                    break
        found.append((path.relative_to(root).as_posix(), summary))
    return found


def find_recipe(name_or_path: str) -> Path:
    """Resolve a recipe name (``quickstart``, ``quickstart.yaml``) or a file path.

    Raises:
        ConfigError: Neither an existing file nor a packaged recipe.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    root = packaged_recipes_dir()
    name = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{name_or_path}.yaml"
    packaged = root / name
    if packaged.is_file():
        return packaged
    names = [n for n, _ in list_recipes()]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"no recipe '{name_or_path}' (neither a file nor a packaged recipe)",
        f"{hint}`covr-lightning recipes` lists the packaged ones; or pass a path to a YAML file",
    )
