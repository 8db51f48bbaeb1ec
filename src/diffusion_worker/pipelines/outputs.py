"""What a pipeline family yields to the runtime, which encodes and delivers each item as it arrives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    # "image": one of the job's results; "control_image": the depth map a ControlNet job was conditioned on.
    kind: Literal["image", "control_image"] = "image"
