"""What a pipeline family yields to the runtime, which encodes and delivers each item as it arrives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    # "image": one of the job's results; "control_image": the depth map a ControlNet job was conditioned on.
    kind: Literal["image", "control_image"] = "image"


# eq=False: numpy compares arrays element by element, so a generated __eq__ could not say equal or not.
@dataclass(frozen=True, eq=False)
class GeneratedVideo:
    # uint8 RGB, shaped (frames, height, width, 3): what the encoder reads as raw video, with no copy per frame.
    frames: np.ndarray
    fps: int
    seed: int
    kind: Literal["video"] = "video"

    @property
    def middle_frame(self) -> Image.Image:
        """The thumbnail's frame: the middle shows what the clip does, where the first of an img2video clip is the
        input image again."""
        return Image.fromarray(self.frames[len(self.frames) // 2])
