"""params.yaml → `vgg.config.Profile`: pick the profile (the one documented switch), apply overrides, validate."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from vgg.config import Profile, from_mapping
from vgg.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def read_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The parsed params file, with a clear error when it is missing or not YAML."""
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the project root, or pass --params PATH)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(params, dict) or not isinstance(params.get("profiles"), dict):
        raise ConfigError(f"{path}: expected a top-level 'profiles:' mapping (see the project's params.yaml)")
    return params


def load_profile(
    path: Path = DEFAULT_PARAMS, *, profile: str | None = None, overrides: Sequence[str] = (),
    overlays: Sequence[Path] = (),
) -> Profile:
    """The active profile: `profile` if given, else the file's `profile:` key; then the values `overlays` (files
    nested as params.yaml, e.g. `vgg tune`'s output) hold for that profile, in order; then `overrides`,
    `section.key=value` (values parsed as YAML, e.g. `train.lr=0.02`, `scales.low={s_min: 48, s_max: 48}`)."""
    params = read_params(path)
    name = profile or params.get("profile")
    profiles = params["profiles"]
    if not isinstance(name, str) or name not in profiles:
        raise ConfigError(
            f"profile: {name!r} is not in {path}; choose one of {', '.join(profiles)} (params.yaml 'profile:' key "
            "or --profile)"
        )
    section = copy.deepcopy(profiles[name])
    if not isinstance(section, dict):
        raise ConfigError(f"profiles.{name}: expected a mapping of sections")
    for overlay in overlays:
        for override in overlay_overrides(overlay, name):
            _apply(section, override, name)
    for override in overrides:
        _apply(section, override, name)
    return from_mapping(Profile, {"name": name, **section}, path=f"profiles.{name}")


def overlay_overrides(path: Path, profile: str) -> list[str]:
    """The `section.key=value` overrides an overlay file holds for `profile` (none when it names other profiles
    only): every leaf under `profiles.<profile>`, so a partial mapping such as `scales: {jitter: {s_min: 48}}`
    changes that one key."""
    if not path.is_file():
        raise ConfigError(f"--overlay: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--overlay {path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise ConfigError(f"--overlay {path}: expected a top-level 'profiles:' mapping, nested as params.yaml")
    overrides: list[str] = []

    def leaves(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                leaves(value, f"{prefix}.{key}" if prefix else str(key))
        elif prefix:
            overrides.append(f"{prefix}={json.dumps(node)}")  # JSON is YAML: `_apply` reads it back

    leaves(data["profiles"].get(profile) or {}, "")
    return overrides


def _apply(section: dict[str, Any], override: str, profile: str) -> None:
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected section.key=value, e.g. train.lr=0.02")
    *parents, leaf = key.split(".")
    node: Any = section
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"profiles.{profile}.{key}: unknown key in override {override!r}")
        node = node[part]
    if not isinstance(node, dict) or leaf not in node:
        raise ConfigError(f"profiles.{profile}.{key}: unknown key in override {override!r}")
    try:
        node[leaf] = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: the value is not valid YAML") from None
