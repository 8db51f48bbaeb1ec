"""The model manifest: which weights fill each role, pinned, and where they live under the models folder.

Read by the runtime (to find folders) and by builder/ (to download or build them); imports no torch.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.toml"
# A LoRA is trained for one base model: its family names the role it applies to.
LORA_FAMILIES = ("sdxl", "wan_t2v", "wan_i2v")
# Written last into a role folder by builder/fetch_models.py: a folder without it is an interrupted fetch.
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class ModelRole:
    name: str
    repo_id: str
    revision: str
    dtype: str
    folder: str
    variant: str | None = None

    def path(self, models_dir: Path) -> Path:
        return models_dir / self.folder

    def is_complete(self, models_dir: Path) -> bool:
        """Whether the builder finished this role's folder (downloaded or tiny)."""
        return (self.path(models_dir) / COMPLETE_MARKER).is_file()


@dataclass(frozen=True)
class LoraSource:
    name: str
    family: str
    repo_id: str
    revision: str
    filename: str

    def path(self, models_dir: Path) -> Path:
        return lora_dir(models_dir, self.family) / f"{self.name}.safetensors"


@dataclass(frozen=True)
class Manifest:
    roles: dict[str, ModelRole]
    loras: dict[str, LoraSource]

    def role(self, name: str) -> ModelRole:
        return self.roles[name]


def lora_dir(models_dir: Path, family: str) -> Path:
    return models_dir / "loras" / family


def load_manifest(path: Path = DEFAULT_MANIFEST) -> Manifest:
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    roles = {name: ModelRole(name=name, **fields) for name, fields in raw.get("roles", {}).items()}
    loras = {name: LoraSource(name=name, **fields) for name, fields in raw.get("loras", {}).items()}
    for lora in loras.values():
        if lora.family not in LORA_FAMILIES:
            raise ValueError(f"LoRA {lora.name!r}: family must be one of {LORA_FAMILIES}")
    return Manifest(roles=roles, loras=loras)
