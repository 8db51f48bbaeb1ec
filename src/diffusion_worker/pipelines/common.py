"""What every model family does alike: the output size of a job with an input image, fitting that image to it,
seeded noise, and how a loaded model is described."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageOps

from ..manifest import ModelRole

# Called after each denoising step with the steps done and the steps in all; raising from it ends the job there.
StepHook = Callable[[int, int], None]


def output_size(
    width: int | None,
    height: int | None,
    source: Image.Image | None,
    default: tuple[int, int],
    size_rule: tuple[int, int, int],
) -> tuple[int, int]:
    """The output size of a job: the request's; where it gives none, the input image's aspect ratio.

    Without width and height, an input image's aspect ratio at the pixel count of the model's default size (what it
    was trained on: 1024² for SDXL, 832×480 for WAN): a small image is generated larger, a large photo smaller, and
    a job's cost does not depend on the input's resolution. With one of them, the other follows the input's aspect
    ratio. Each side is rounded to the model's multiple within its bounds (`size_rule`: minimum, maximum,
    multiple); `cover` then fits the image to the size.
    """
    if width and height:
        return width, height
    if source is None:
        return width or default[0], height or default[1]
    aspect = source.width / source.height
    if width:
        return width, _round_side(width / aspect, size_rule)
    if height:
        return _round_side(height * aspect, size_rule), height
    scale = math.sqrt(default[0] * default[1] / (source.width * source.height))
    return _round_side(source.width * scale, size_rule), _round_side(source.height * scale, size_rule)


def _round_side(length: float, size_rule: tuple[int, int, int]) -> int:
    low, high, multiple = size_rule
    return min(max(round(length / multiple) * multiple, low), high)


def cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scales `image` to cover `size` with its aspect ratio kept, cutting what overflows equally from both sides.

    Nothing is stretched and nothing is padded; an image already of `size` is used as it is.
    """
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def seeded_generator(seed: int) -> torch.Generator:
    # Initial noise is drawn on the CPU: the same seed then gives the same latents on any GPU or none.
    return torch.Generator("cpu").manual_seed(seed)


def describe_models(roles: list[ModelRole]) -> list[dict[str, str]]:
    """What a family's models are, as `info` and every result.json list them."""
    return [{"role": role.name, "repo_id": role.repo_id, "revision": role.revision} for role in roles]


def step_end_callback(on_step: StepHook | None) -> Callable[..., dict[str, Any]] | None:
    """diffusers' `callback_on_step_end`, calling `on_step(steps done, steps in all)`.

    An exception raised by `on_step` leaves the pipeline before the VAE decodes, where diffusers' own `_interrupt`
    would still decode and return a half-denoised result. `num_timesteps` counts the steps really run (img2img runs
    only the last `strength` of them).
    """
    if on_step is None:
        return None

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, pipeline.num_timesteps)
        # Nothing replaced: the pipeline keeps its own latents.
        return {}

    return callback
