"""Few-step presets (the manifest's `[presets.*]`): what a request's `preset` fills in, and the limits it keeps.

A preset is a LoRA plus the sampling it was distilled for, run on the model already loaded: its LoRA joins the
request's own LoRAs (and is removed with them after the job), its scheduler config changes only the job's fresh
scheduler. Torch-free, like the schema, so its rules test in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from .errors import InvalidInput
from .manifest import Preset
from .schema import MAX_LORAS, LoraRef

Request = TypeVar("Request", bound=BaseModel)


def find_preset(presets: Mapping[str, Preset], name: str) -> Preset:
    """The preset a request names; an unknown name is refused with the names this worker serves."""
    try:
        return presets[name]
    except KeyError:
        available = ", ".join(sorted(presets)) or "none on this worker"
        raise InvalidInput(f"preset: {name!r} is not a preset of this worker ({available})") from None


def apply_preset(request: Request, preset: Preset) -> Request:
    """The request with the preset's steps, guidance and scheduler where it gave none; refuses values the preset's
    LoRA was not made for, naming the field and what the preset allows."""
    steps = request.num_inference_steps or preset.steps[0]
    if steps not in preset.steps:
        allowed = ", ".join(map(str, preset.steps))
        raise InvalidInput(f"num_inference_steps: preset {preset.name!r} runs at {allowed} steps only (got {steps})")
    guidance = preset.guidance_scale if request.guidance_scale is None else request.guidance_scale
    if guidance > preset.max_guidance_scale:
        raise InvalidInput(
            f"guidance_scale: preset {preset.name!r} allows 0 to {preset.max_guidance_scale:g} (got {guidance:g})"
        )
    own = [ref.name for ref in request.loras]
    if preset.lora in own:
        raise InvalidInput(f"loras: {preset.lora!r} is applied by preset {preset.name!r} already")
    if preset.lora and len(own) >= MAX_LORAS:
        raise InvalidInput(
            f"loras: at most {MAX_LORAS - 1} with preset {preset.name!r}, whose LoRA takes one of the {MAX_LORAS}"
        )
    return request.model_copy(
        update={
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "scheduler": request.scheduler or preset.scheduler,
        }
    )


def preset_loras(preset: Preset | None) -> list[LoraRef]:
    """The preset's LoRA as a job applies it, ahead of the request's own."""
    if preset is None or preset.lora is None:
        return []
    return [LoraRef(name=preset.lora, scale=preset.lora_scale)]


def describe_preset(preset: Preset) -> dict[str, Any]:
    """A preset as `info` lists it."""
    return {
        "lora": preset.lora,
        "scheduler": preset.scheduler,
        "scheduler_config": preset.scheduler_config,
        "steps": list(preset.steps),
        "guidance_scale": preset.guidance_scale,
        "max_guidance_scale": preset.max_guidance_scale,
    }
