"""SDXL: one set of weights, loaded once, serving every SDXL task.

Each job runs on a throwaway pipeline object built around the shared components with its own fresh
scheduler, so per-call state (scheduler timesteps, guidance flags, progress bars) never outlives the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image

from ..config import Settings
from ..manifest import Manifest, ModelRole
from ..placement import Placement
from ..schema import Txt2Img
from .loras import LoraRegistry
from .outputs import GeneratedImage
from .schedulers import build_scheduler, scheduler_name_of

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 5.0


class SdxlFamily:
    TASKS = frozenset({"txt2img"})

    def __init__(
        self,
        base: StableDiffusionXLPipeline,
        roles: list[ModelRole],
        placement: Placement,
        tasks: frozenset[str],
        loras: LoraRegistry,
    ) -> None:
        self.base = base
        self.roles = roles
        self.placement = placement
        self.tasks = tasks
        self.loras = loras
        self.default_scheduler = scheduler_name_of(base.scheduler)
        # The UNet's latent size times the VAE's downsampling: 1024 for the real SDXL base.
        self.default_size = base.unet.config.sample_size * base.vae_scale_factor

    @classmethod
    def available_tasks(cls, models_dir: Path, manifest: Manifest) -> frozenset[str]:
        """The tasks whose models are all in the models folder."""
        needed = (manifest.role(name).path(models_dir) for name in ("sdxl", "sdxl_vae"))
        return cls.TASKS if all(path.is_dir() for path in needed) else frozenset()

    @classmethod
    def load(cls, settings: Settings, manifest: Manifest, placement: Placement, tasks: frozenset[str]) -> SdxlFamily:
        models_dir = settings.models_dir
        base_role, vae_role = manifest.role("sdxl"), manifest.role("sdxl_vae")
        vae = AutoencoderKL.from_pretrained(
            vae_role.path(models_dir),
            dtype=placement.dtype_for(vae_role.dtype),
            local_files_only=True,
        )
        base = StableDiffusionXLPipeline.from_pretrained(
            base_role.path(models_dir),
            vae=vae,
            dtype=placement.dtype_for(base_role.dtype),
            variant=_variant_in(base_role.path(models_dir), base_role.variant),
            local_files_only=True,
            add_watermarker=False,
        )
        base.to(placement.device)
        base.set_progress_bar_config(disable=True)
        loras = LoraRegistry.scan(models_dir, "sdxl", settings.lora_cache_size)
        return cls(base, [base_role, vae_role], placement, tasks, loras)

    def resolve(self, request: Txt2Img) -> Txt2Img:
        """Fills what the request left to the model's defaults, so `parameters` shows what really ran."""
        self.loras.check(request.loras)
        return request.model_copy(
            update={
                "width": request.width or self.default_size,
                "height": request.height or self.default_size,
                "num_inference_steps": request.num_inference_steps or DEFAULT_STEPS,
                "guidance_scale": DEFAULT_GUIDANCE if request.guidance_scale is None else request.guidance_scale,
                "scheduler": request.scheduler or self.default_scheduler,
            }
        )

    def generate(self, request: Txt2Img, seed: int, inputs: dict[str, Image.Image]) -> Iterator[GeneratedImage]:
        """Yields image k from seed + k, one at a time, so the caller encodes and uploads while the next denoises.

        One image per call rather than a batch: image k is then bit-identical to a one-image job with seed + k,
        and memory does not grow with num_images.
        """
        pipeline = self._job_pipeline(request.scheduler)
        with self.loras.applied(pipeline, request.loras):
            for index in range(request.num_images):
                image_seed = seed + index
                output = pipeline(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt or None,
                    width=request.width,
                    height=request.height,
                    num_inference_steps=request.num_inference_steps,
                    guidance_scale=request.guidance_scale,
                    generator=_generator(image_seed),
                    output_type="pil",
                )
                yield GeneratedImage(image=output.images[0], seed=image_seed)

    def _job_pipeline(self, scheduler_name: str) -> StableDiffusionXLPipeline:
        components = {
            **self.base.components,
            "scheduler": build_scheduler(scheduler_name, self.base.scheduler.config),
        }
        pipeline = StableDiffusionXLPipeline(**components, add_watermarker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": sorted(self.tasks),
            "models": [_describe_role(role) for role in self.roles],
            "default_size": self.default_size,
            "default_scheduler": self.default_scheduler,
            "dtype": str(self.base.unet.dtype).removeprefix("torch."),
            "loras": self.loras.names,
        }

    def weight_modules(self) -> list[torch.nn.Module]:
        return [self.base.unet, self.base.vae, self.base.text_encoder, self.base.text_encoder_2]


def _generator(seed: int) -> torch.Generator:
    # Initial noise is drawn on the CPU: the same seed then gives the same latents on any GPU or none.
    return torch.Generator("cpu").manual_seed(seed)


def _variant_in(folder: Path, variant: str | None) -> str | None:
    """The manifest's weight variant (fp16) if the folder holds files of it, else the plain weights."""
    if variant and any(folder.glob(f"*/*.{variant}.safetensors")):
        return variant
    return None


def _describe_role(role: ModelRole) -> dict[str, str]:
    return {"role": role.name, "repo_id": role.repo_id, "revision": role.revision}
