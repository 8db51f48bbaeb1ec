"""The model manifest: which weights fill each role, pinned, and where they live under the models folder.

Read by the runtime (to find folders) and by builder/ (to download or build them); imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.toml"
# A LoRA is trained for one base model: its family names the role it applies to.
LORA_FAMILIES = ("sdxl", "wan_t2v", "wan_i2v")
# Written last into a role folder by builder/fetch_models.py: a folder without it is an interrupted fetch. It records
# where the files came from and each file's size and SHA-256.
COMPLETE_MARKER = ".complete"
# A revision that names one commit; anything else (a branch such as `main`) can change under the same name.
PINNED_REVISION = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Component:
    """A model of a role that the worker loads: a subfolder of the role's folder, or the folder itself for a role
    that is one model. `nbytes` is its size at `dtype` (the precision on CUDA), from the real model; a component
    byte-identical to another role's names that role in `same_as` and is loaded once."""

    role: str
    name: str
    dtype: str
    nbytes: int = 0
    same_as: str | None = None


@dataclass(frozen=True)
class ModelRole:
    name: str
    repo_id: str
    revision: str
    dtype: str
    folder: str
    variant: str | None = None
    # Component folders of the repo that the worker replaces with another role's, and so never fetches.
    skip_components: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()

    def path(self, models_dir: Path) -> Path:
        return models_dir / self.folder

    def component(self, name: str) -> Component:
        return next(component for component in self.components if component.name == name)

    @property
    def single_model(self) -> bool:
        """A repo of one model, at the top of its folder. A pipeline repo keeps each model in a subfolder, even when
        the worker takes only one of them (the SDXL refiner's UNet)."""
        return len(self.components) == 1 and not self.skip_components

    def component_path(self, models_dir: Path, component: Component) -> Path:
        folder = self.path(models_dir)
        return folder if self.single_model else folder / component.name

    def recorded_digests(self, models_dir: Path) -> dict[str, str]:
        """A digest per subfolder (and, for a role of one component, of the folder's own files under the
        component's name), from the files' SHA-256 the builder recorded: equal digests, identical files."""
        try:
            recorded = json.loads((self.path(models_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError):
            return {}
        groups: dict[str, list[str]] = {}
        for name, facts in sorted(recorded.items()):
            group, in_subfolder, inner = name.partition("/")
            if in_subfolder:
                key, relative = group, inner
            elif self.single_model:
                key, relative = self.components[0].name, name
            else:
                continue
            groups.setdefault(key, []).append(f"{relative} {facts['sha256']}")
        return {key: hashlib.sha256("\n".join(lines).encode()).hexdigest() for key, lines in groups.items()}

    def is_complete(self, models_dir: Path) -> bool:
        """Whether the builder finished this role's folder (downloaded or tiny) and every file it recorded is still
        there at its size: a network volume that lost a file, or a link whose target is gone, is not complete.
        Reads only, so a read-only models folder is checked the same way."""
        folder = self.path(models_dir)
        try:
            recorded = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
            return all((folder / name).stat().st_size == facts["size"] for name, facts in recorded.items())
        except (OSError, ValueError, KeyError, TypeError):
            return False


@dataclass(frozen=True)
class LoraSource:
    name: str
    family: str
    repo_id: str
    revision: str
    filename: str
    # Set for adapters whose licence forbids commercial use (e.g. CC BY-NC 4.0).
    non_commercial: bool = False

    def path(self, models_dir: Path) -> Path:
        return lora_dir(models_dir, self.family) / f"{self.name}.safetensors"

    @property
    def baked_by_default(self) -> bool:
        """Whether an image bakes it unless told otherwise: pinned to a commit and free for commercial use."""
        return bool(PINNED_REVISION.fullmatch(self.revision)) and not self.non_commercial


@dataclass(frozen=True)
class Preset:
    """A few-step variant of a family's model: a distillation LoRA and the sampling it was trained for.

    `steps` lists the step counts the LoRA was distilled for, the first being the default; `scheduler_config`
    changes the scheduler's config for the job only (SDXL-Lightning and Hyper-SD need trailing timesteps).
    """

    name: str
    family: str
    scheduler: str
    steps: tuple[int, ...]
    guidance_scale: float
    max_guidance_scale: float
    lora: str | None = None
    lora_scale: float = 1.0
    scheduler_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    roles: dict[str, ModelRole]
    loras: dict[str, LoraSource]
    presets: dict[str, Preset] = field(default_factory=dict)

    def role(self, name: str) -> ModelRole:
        return self.roles[name]


def lora_dir(models_dir: Path, family: str) -> Path:
    return models_dir / "loras" / family


def _role(name: str, fields: dict) -> ModelRole:
    components = tuple(
        Component(
            role=name,
            name=component,
            dtype=spec.get("dtype", fields["dtype"]),
            nbytes=spec.get("bytes", 0),
            same_as=spec.get("same_as"),
        )
        for component, spec in fields.pop("components", {}).items()
    )
    skipped = tuple(fields.pop("skip_components", ()))
    return ModelRole(name=name, skip_components=skipped, components=components, **fields)


def load_manifest(path: Path = DEFAULT_MANIFEST) -> Manifest:
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    roles = {name: _role(name, fields) for name, fields in raw.get("roles", {}).items()}
    loras = {name: LoraSource(name=name, **fields) for name, fields in raw.get("loras", {}).items()}
    for role in roles.values():
        for component in role.components:
            other = roles.get(component.same_as) if component.same_as else role
            if other is None or component.name not in {each.name for each in other.components}:
                raise ValueError(f"role {role.name!r}: component {component.name!r} is the same as no other role's")
    for lora in loras.values():
        if lora.family not in LORA_FAMILIES:
            raise ValueError(f"LoRA {lora.name!r}: family must be one of {LORA_FAMILIES}")
    presets = {name: _preset(name, fields, loras) for name, fields in raw.get("presets", {}).items()}
    return Manifest(roles=roles, loras=loras, presets=presets)


def _preset(name: str, fields: dict[str, Any], loras: dict[str, LoraSource]) -> Preset:
    preset = Preset(name=name, **{**fields, "steps": tuple(fields["steps"])})
    lora = loras.get(preset.lora) if preset.lora else None
    if preset.lora and (lora is None or lora.family != preset.family):
        raise ValueError(f"preset {name!r}: lora must name a [loras.*] entry of family {preset.family!r}")
    if not preset.steps or min(preset.steps) < 1:
        raise ValueError(f"preset {name!r}: steps must list step counts of 1 or more")
    if not 0 <= preset.guidance_scale <= preset.max_guidance_scale:
        raise ValueError(f"preset {name!r}: guidance_scale must be from 0 to max_guidance_scale")
    return preset
