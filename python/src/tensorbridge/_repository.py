"""The model repository: ``DIR/<model>/config.toml`` and ``DIR/<model>/<version>/model.*``.

A version is a folder named by a positive integer holding one model file (``model.pt``
TorchScript, ``model.onnx`` ONNX Runtime, or ``model.py`` exporting ``create()``) and
optionally weights (``.safetensors`` / ``.pth``, loaded into the ``create()`` model). The
model's ``config.toml`` takes the keys of a ``[models.NAME]`` table (pre/post-processing,
batching, instances, ``version_policy``, ``[routing]``); which versions are served follows the
version policy: ``"latest"`` (the default: the highest number), ``{latest = N}``, ``"all"``, or
a list of version numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._models import ModelConfig
from ._settings import apply, schema

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("tensorbridge")

#: Model files a version folder may hold, in the order they are looked for.
MODEL_FILES = ("model.pt", "model.onnx", "model.py")
WEIGHT_SUFFIXES = (".safetensors", ".pth")
#: Keys a repository config.toml may not set: the version folder says where the model is.
_FOLDER_KEYS = frozenset({"source", "weights", "name"})
MODEL_SETTINGS = schema(ModelConfig)


@dataclass(frozen=True)
class VersionFolder:
    """One version found on disk."""

    version: int
    source: Path
    weights: Path | None
    #: Changes whenever a file of the version is replaced (for polling).
    stamp: tuple[int, ...]


def select_versions(policy: Any, available: list[int]) -> list[int]:
    """The versions ``policy`` serves out of ``available``, highest first."""
    newest = sorted(available, reverse=True)
    if policy in (None, "latest"):
        return newest[:1]
    if policy == "all":
        return newest
    if isinstance(policy, dict) and set(policy) == {"latest"}:
        n = policy["latest"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"version_policy {{latest = N}} needs N >= 1, not {n!r}")
        return newest[:n]
    if isinstance(policy, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                        and v > 0 for v in policy):
        return [v for v in newest if v in set(policy)]
    raise ValueError(f"version_policy must be \"latest\", \"all\", {{latest = N}} or a list of "
                     f"version numbers, not {policy!r}")


class Repository:
    """A folder of model folders, read afresh on every ``scan``/``model_config`` call."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"repository {self.path} is not a directory")

    def names(self) -> list[str]:
        """Model folders of the repository (those with at least one version folder)."""
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def versions(self, name: str) -> dict[int, VersionFolder]:
        """Every version folder of ``name`` that holds a model file."""
        folder = self.path / name
        found: dict[int, VersionFolder] = {}
        if not folder.is_dir():
            return found
        for sub in folder.iterdir():
            if not sub.is_dir() or not sub.name.isdigit() or int(sub.name) < 1:
                continue
            source = next((sub / f for f in MODEL_FILES if (sub / f).is_file()), None)
            if source is None:
                log.warning("repository: %s holds none of %s; skipped", sub,
                            ", ".join(MODEL_FILES))
                continue
            weights = sorted(p for p in sub.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            files = [source, *weights]
            stamp = tuple(x for f in files for x in (f.stat().st_mtime_ns, f.stat().st_size))
            found[int(sub.name)] = VersionFolder(int(sub.name), source,
                                                 weights[0] if weights else None, stamp)
        return found

    def model_config(self, name: str, overrides: ModelConfig | None = None) -> ModelConfig:
        """The model's settings: its ``config.toml``, then ``overrides`` (a ``[models.NAME]``
        table of the server's config) on top. ``source`` is filled in per version."""
        table: dict[str, Any] = {}
        path = self.path / name / "config.toml"
        if path.is_file():
            try:
                table = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: {exc}") from None
        fields = set(ModelConfig.__dataclass_fields__) - _FOLDER_KEYS
        unknown = set(table) - fields
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown & set(table))}; "
                             f"{sorted(_FOLDER_KEYS)} come from the version folders")
        labels = (table.get("postprocess") or {}).get("labels")  # a file beside config.toml
        if isinstance(labels, str) and ":" not in labels and not Path(labels).is_absolute():
            table["postprocess"] = {**table["postprocess"], "labels": str(path.parent / labels)}
        config = ModelConfig(name=name, source="", origin=f"{path}:")
        apply(config, MODEL_SETTINGS, table, f"{path}:")
        if overrides is not None:
            defaults = ModelConfig(name=name, source="")
            for f in dataclasses.fields(ModelConfig):
                value = getattr(overrides, f.name)
                if f.name not in _FOLDER_KEYS and value != getattr(defaults, f.name):
                    setattr(config, f.name, value)
        select_versions(config.version_policy, [])  # a bad policy fails here, by name
        return config

    def version_config(self, base: ModelConfig, folder: VersionFolder) -> ModelConfig:
        """``base`` pointed at one version folder's files."""
        return dataclasses.replace(base, source=str(folder.source),
                                   weights=str(folder.weights) if folder.weights else None)
