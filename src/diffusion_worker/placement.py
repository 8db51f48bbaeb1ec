"""Where the weights live and in which precision: chosen once at start from the settings and the hardware."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Settings

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    # Set when DTYPE overrides the manifest's per-role precision.
    forced_dtype: torch.dtype | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Placement:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda, but torch sees no CUDA device")
        use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        forced = None if settings.dtype == "auto" else _DTYPES[settings.dtype]
        return cls(device=torch.device("cuda" if use_cuda else "cpu"), forced_dtype=forced)

    def dtype_for(self, role_dtype: str) -> torch.dtype:
        """The manifest's precision on CUDA; float32 on CPU, where half precision is slow or unsupported."""
        if self.forced_dtype is not None:
            return self.forced_dtype
        if self.device.type != "cuda":
            return torch.float32
        return _DTYPES[role_dtype]
