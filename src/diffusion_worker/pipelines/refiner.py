"""The SDXL refiner: a second UNet for the least noisy part of the schedule (SDXL's ensemble of experts).

Only its UNet is loaded. It reads the base's second text encoder, tokenizer and VAE (the refiner repo ships copies
of the same weights), so the refiner adds one model to memory. Its UNet is conditioned on text encoder 2's hidden
states alone and on an aesthetic score in place of the target size, hence `requires_aesthetics_score`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from ..errors import InvalidInput
from .schedulers import build_scheduler

ROLE = "sdxl_refiner"


def refiner_pipeline(
    base: StableDiffusionXLPipeline, unet: UNet2DConditionModel, scheduler_name: str, scheduler_config: Any
) -> StableDiffusionXLImg2ImgPipeline:
    """A job's refiner pipeline: the refiner's UNet on the base's shared modules, a fresh scheduler built like the
    base pipeline's, so both cut the same schedule at the hand-off."""
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(scheduler_name, base.scheduler.config, scheduler_config),
        requires_aesthetics_score=True,
        # As the refiner repo's model_index.json has it: an empty negative prompt is encoded, not zeroed.
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_handoff(
    scheduler_name: str,
    model_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None,
    steps: int,
    refiner_steps: int,
    high_noise_frac: float,
) -> None:
    """Refuses a hand-off that leaves the base or the refiner no step of its schedule.

    Diffusers cuts the base's schedule at the timestep `(1 - high_noise_frac) × training steps` and starts the
    refiner's below it; with few steps either side can come out empty, which would run a model for nothing.
    """
    cutoff = round((1 - high_noise_frac) * model_config["num_train_timesteps"])
    for name, count, keep in (
        ("num_inference_steps", steps, lambda timesteps: timesteps >= cutoff),
        ("refiner_inference_steps", refiner_steps, lambda timesteps: timesteps < cutoff),
    ):
        scheduler = build_scheduler(scheduler_name, model_config, scheduler_config)
        scheduler.set_timesteps(count)
        if not keep(scheduler.timesteps).any():
            side = "base" if name == "num_inference_steps" else "refiner"
            raise InvalidInput(
                f"{name}: {count} steps cut at high_noise_frac {high_noise_frac:g} leave the {side} no step; "
                "raise the steps or move high_noise_frac"
            )
