"""SDXL: one set of weights, loaded once, serving txt2img, img2img and ControlNet-depth, each with LoRAs.

Each job runs on a throwaway pipeline object of its task's class, built around the shared components with its
own fresh scheduler (diffusers' `from_pipe` would share the scheduler too), so per-call state (scheduler
timesteps, guidance flags, progress bars) never outlives the job and no two pipelines hold a copy of a weight.

Input images (img2img's `image`, a ControlNet job's `image` or `control_image`) set the output size when the
request gives none, and are fitted to the output size by `cover`; see `output_size`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import AutoModelForDepthEstimation

from ..config import Settings
from ..errors import InvalidInput, TaskUnavailable
from ..manifest import Manifest, ModelRole, Preset
from ..media import to_picture
from ..placement import Placement
from ..presets import apply_preset, describe_preset, find_preset, preset_loras
from ..schema import SDXL_SIZE, ControlNetDepth, Img2Img, Txt2Img
from . import memory
from .common import StepHook, cover, describe_models, output_size, seeded_generator, step_end_callback
from .depth import DepthEstimator
from .loras import LoraRegistry
from .outputs import GeneratedImage
from .refiner import ROLE as REFINER_ROLE
from .refiner import check_handoff, refiner_pipeline
from .schedulers import build_scheduler, scheduler_name_of

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 5.0
SdxlRequest = Txt2Img | Img2Img | ControlNetDepth
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "controlnet_depth": StableDiffusionXLControlNetPipeline,
}
# The manifest roles every SDXL task needs, and those ControlNet-depth needs besides.
BASE_ROLES = ("sdxl", "sdxl_vae")
CONTROLNET_ROLES = ("controlnet_depth", "depth_estimator")


class SdxlFamily:
    TASKS = frozenset(PIPELINES)

    def __init__(
        self,
        base: StableDiffusionXLPipeline,
        roles: list[ModelRole],
        placement: Placement,
        tasks: frozenset[str],
        loras: LoraRegistry,
        controlnet: ControlNetModel | None = None,
        depth: DepthEstimator | None = None,
        presets: Mapping[str, Preset] | None = None,
        refiner_unet: UNet2DConditionModel | None = None,
    ) -> None:
        self.base = base
        self.roles = roles
        self.placement = placement
        self.tasks = tasks
        self.loras = loras
        self.presets = dict(presets or {})
        self.refiner_unet = refiner_unet
        self.controlnet = controlnet
        self.depth = depth
        self.default_scheduler = scheduler_name_of(base.scheduler)
        # Fixed at load (force_upcast off): every job is checked to leave it so.
        self.vae_dtype = base.vae.dtype
        # The UNet's latent size times the VAE's downsampling: 1024 for the real SDXL base.
        self.default_size = base.unet.config.sample_size * base.vae_scale_factor

    @classmethod
    def available_tasks(cls, models_dir: Path, manifest: Manifest) -> frozenset[str]:
        """The tasks whose models the builder has completely put in the models folder."""

        def present(roles: tuple[str, ...]) -> bool:
            return all(manifest.role(name).is_complete(models_dir) for name in roles)

        if not present(BASE_ROLES):
            return frozenset()
        if present(CONTROLNET_ROLES):
            return cls.TASKS
        return cls.TASKS - {"controlnet_depth"}

    @classmethod
    def load(cls, settings: Settings, manifest: Manifest, placement: Placement, tasks: frozenset[str]) -> SdxlFamily:
        models_dir = settings.models_dir
        base_role, vae_role = (manifest.role(name) for name in BASE_ROLES)
        vae = memory.load_model(AutoencoderKL, vae_role, "vae", models_dir, placement)
        # The fp16-fix VAE decodes in half precision as it is. With force_upcast on, diffusers would cast the shared
        # VAE to float32 and back around every decode, and a failure in between would leave it float32 for good.
        vae.register_to_config(force_upcast=False)
        base = StableDiffusionXLPipeline.from_pretrained(
            base_role.path(models_dir),
            vae=vae,
            **memory.load_components(base_role, models_dir, placement),
            local_files_only=True,
            add_watermarker=False,
        )
        base.set_progress_bar_config(disable=True)
        placed = [(vae_role, "vae", vae)]
        placed += [(base_role, component.name, getattr(base, component.name)) for component in base_role.components]
        loras = LoraRegistry.scan(models_dir, "sdxl", settings.lora_cache_size)
        roles = [base_role, vae_role]
        controlnet = depth = None
        if "controlnet_depth" in tasks:
            controlnet_role, depth_role = (manifest.role(name) for name in CONTROLNET_ROLES)
            controlnet = memory.load_model(ControlNetModel, controlnet_role, "controlnet", models_dir, placement)
            depth_model = memory.load_model(
                AutoModelForDepthEstimation, depth_role, "depth_estimator", models_dir, placement
            )
            depth = DepthEstimator.load(depth_role.path(models_dir), depth_model)
            placed += [(controlnet_role, "controlnet", controlnet), (depth_role, "depth_estimator", depth_model)]
            roles += [controlnet_role, depth_role]
        # Optional: a worker without it serves everything but `refiner: true`.
        refiner_unet = None
        if REFINER_ROLE in manifest.roles and manifest.role(REFINER_ROLE).is_complete(models_dir):
            refiner_role = manifest.role(REFINER_ROLE)
            refiner_unet = memory.load_model(UNet2DConditionModel, refiner_role, "unet", models_dir, placement)
            placed.append((refiner_role, "unet", refiner_unet))
            roles.append(refiner_role)
        memory.place(placed, placement)
        # A preset is served when its LoRA is here: an image may leave out LoRAs it may not redistribute.
        presets = {
            name: preset
            for name, preset in manifest.presets.items()
            if preset.family == "sdxl" and (preset.lora is None or preset.lora in loras.files)
        }
        return cls(base, roles, placement, tasks, loras, controlnet, depth, presets, refiner_unet)

    def resolve(self, request: SdxlRequest, inputs: Mapping[str, Image.Image]) -> SdxlRequest:
        """Fills what the request left to the preset's or the model's defaults, so `parameters` shows what really
        ran."""
        self.loras.check(request.loras)
        if request.preset is not None:
            request = apply_preset(request, find_preset(self.presets, request.preset))
        source = inputs.get("image", inputs.get("control_image"))
        width, height = output_size(
            request.width, request.height, source, (self.default_size, self.default_size), SDXL_SIZE
        )
        if getattr(request, "refiner", False) and self.refiner_unet is None:
            raise TaskUnavailable(f"refiner: this worker has no SDXL refiner (manifest role {REFINER_ROLE})")
        steps = request.num_inference_steps or DEFAULT_STEPS
        # img2img denoises the last int(steps × strength) steps only: none would leave the input image unchanged.
        if isinstance(request, Img2Img) and int(steps * request.strength) < 1:
            raise InvalidInput(
                f"strength: {request.strength} × num_inference_steps {steps} leaves no step to run; "
                "their product must be at least 1"
            )
        resolved = request.model_copy(
            update={
                "width": width,
                "height": height,
                "num_inference_steps": steps,
                "guidance_scale": DEFAULT_GUIDANCE if request.guidance_scale is None else request.guidance_scale,
                "scheduler": request.scheduler or self.default_scheduler,
            }
        )
        if isinstance(resolved, Txt2Img) and resolved.refiner:
            refiner_steps = resolved.refiner_inference_steps or steps
            check_handoff(
                resolved.scheduler,
                self.base.scheduler.config,
                self._scheduler_config(resolved),
                steps,
                refiner_steps,
                resolved.high_noise_frac,
            )
            resolved = resolved.model_copy(update={"refiner_inference_steps": refiner_steps})
        return resolved

    def generate(
        self,
        request: SdxlRequest,
        seed: int,
        inputs: Mapping[str, Image.Image],
        on_step: StepHook | None = None,
    ) -> Iterator[GeneratedImage]:
        """Yields image k from seed + k, one at a time, so the caller encodes and uploads while the next denoises;
        then, if asked for, the depth map a ControlNet job was conditioned on. `on_step` follows every denoising
        step and may end the job there.

        One image per call rather than a batch: image k is then bit-identical to a one-image job with seed + k,
        and memory does not grow with num_images. Above the model's native size (1024²) the VAE decodes in tiles,
        as the memory plan's margin holds an untiled decode up to that size only.
        """
        size = (request.width, request.height)
        control_image = None
        if isinstance(request, Img2Img):
            arguments = {"image": cover(inputs["image"], size), "strength": request.strength}
        elif isinstance(request, ControlNetDepth):
            control_image = self._control_image(inputs, size)
            arguments = {
                "image": control_image,
                "width": request.width,
                "height": request.height,
                "controlnet_conditioning_scale": request.controlnet_conditioning_scale,
                "control_guidance_start": request.control_guidance_start,
                "control_guidance_end": request.control_guidance_end,
            }
        else:
            arguments = {"width": request.width, "height": request.height}
        scheduler_config = self._scheduler_config(request)
        pipeline = self.pipeline_for(request.task, request.scheduler, scheduler_config)
        refiner = None
        if getattr(request, "refiner", False):
            refiner = refiner_pipeline(self.base, self.refiner_unet, request.scheduler, scheduler_config)
        preset = self.presets[request.preset] if request.preset else None
        tiled = request.width * request.height > self.default_size**2
        with (
            memory.vae_precision_kept(self.base.vae, self.vae_dtype),
            memory.vae_tiling(self.base.vae, tiled),
            self.loras.applied(pipeline, [*preset_loras(preset), *request.loras]),
        ):
            for index in range(request.num_images):
                image_seed = seed + index
                common = {
                    "prompt": request.prompt,
                    "negative_prompt": request.negative_prompt or None,
                    "num_inference_steps": request.num_inference_steps,
                    "guidance_scale": request.guidance_scale,
                    "generator": seeded_generator(image_seed),
                    "callback_on_step_end": step_end_callback(on_step),
                }
                # Floats, checked before they become bytes: a NaN would otherwise pass as black.
                if refiner is None:
                    decoded = pipeline(**common, output_type="pt", **arguments).images[0]
                elif isinstance(request, Img2Img):
                    # The refiner alone refines the input image, as worker-sdxl's `image_url` does.
                    decoded = refiner(**common, output_type="pt", **arguments).images[0]
                else:
                    # The base stops at high_noise_frac and hands its latents, noise left in, to the refiner.
                    latents = pipeline(
                        **common, denoising_end=request.high_noise_frac, output_type="latent", **arguments
                    ).images
                    decoded = refiner(
                        **{**common, "num_inference_steps": request.refiner_inference_steps},
                        image=latents,
                        denoising_start=request.high_noise_frac,
                        output_type="pt",
                    ).images[0]
                yield GeneratedImage(image=to_picture(decoded, f"image {index}"), seed=image_seed)
        if control_image is not None and request.return_control_image:
            yield GeneratedImage(image=control_image, seed=seed, kind="control_image")

    def pipeline_for(
        self, task: str, scheduler_name: str, scheduler_config: Mapping[str, Any] | None = None
    ) -> DiffusionPipeline:
        """A job's own pipeline of the task's class: the shared models, a scheduler of its own (with a preset's
        `scheduler_config` on top)."""
        components: dict[str, Any] = {
            **self.base.components,
            "scheduler": build_scheduler(scheduler_name, self.base.scheduler.config, scheduler_config),
        }
        if task == "controlnet_depth":
            components["controlnet"] = self.controlnet
        pipeline = PIPELINES[task](
            **components,
            force_zeros_for_empty_prompt=self.base.config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _scheduler_config(self, request: SdxlRequest) -> Mapping[str, Any] | None:
        """The job's scheduler config changes: its preset's, if any."""
        return self.presets[request.preset].scheduler_config if request.preset else None

    def _control_image(self, inputs: Mapping[str, Image.Image], size: tuple[int, int]) -> Image.Image:
        """A given depth map fitted to the output size as it is, or one estimated from the fitted `image`."""
        if "control_image" in inputs:
            return cover(inputs["control_image"], size)
        return self.depth.estimate(cover(inputs["image"], size))

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": sorted(self.tasks),
            "models": describe_models(self.roles),
            "default_size": self.default_size,
            "default_scheduler": self.default_scheduler,
            "dtype": str(self.base.unet.dtype).removeprefix("torch."),
            "loras": self.loras.names,
            "presets": {name: describe_preset(preset) for name, preset in sorted(self.presets.items())},
            "refiner": self.refiner_unet is not None,
        }

    def weight_modules(self) -> list[torch.nn.Module]:
        modules = [self.base.unet, self.base.vae, self.base.text_encoder, self.base.text_encoder_2]
        if self.controlnet is not None:
            modules += [self.controlnet, self.depth.model]
        if self.refiner_unet is not None:
            modules.append(self.refiner_unet)
        return modules
