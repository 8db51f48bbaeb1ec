"""Where the weights live and in which precision: chosen once at start from the settings and the hardware."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import Settings
from .manifest import Manifest
from .plan import GIB, Plan, make_plan, weights_from_files

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    # Set when DTYPE overrides the manifest's per-role precision.
    forced_dtype: torch.dtype | None = None
    # The GPU memory to plan for (GPU_MEMORY_GIB, else the device's); None on CPU, where nothing is planned.
    gpu_bytes: int | None = None
    plan: Plan | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Placement:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda, but torch sees no CUDA device")
        use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        forced = None if settings.dtype == "auto" else _DTYPES[settings.dtype]
        gpu_bytes = None
        if use_cuda:
            detected = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            gpu_bytes = round(settings.gpu_memory_gib * GIB) if settings.gpu_memory_gib else detected
        return cls(device=torch.device("cuda" if use_cuda else "cpu"), forced_dtype=forced, gpu_bytes=gpu_bytes)

    def planned(self, manifest: Manifest, models_dir: Path, tasks: Iterable[str]) -> Placement:
        """This placement with the memory plan for `tasks`, from the sizes of the files in `models_dir`."""
        weights = weights_from_files(manifest, models_dir, tasks, self.dtype_name)
        return replace(self, plan=make_plan(self.gpu_bytes, weights, tasks))

    def dtype_name(self, role_dtype: str) -> str:
        return str(self.dtype_for(role_dtype)).removeprefix("torch.")

    def dtype_for(self, role_dtype: str) -> torch.dtype:
        """The manifest's precision on CUDA; float32 on CPU, where half precision is slow or unsupported."""
        if self.forced_dtype is not None:
            return self.forced_dtype
        if self.device.type != "cuda":
            return torch.float32
        return _DTYPES[role_dtype]
