"""WAN 2.1 video: text-to-video on the T2V model and, where the manifest configures one, image-to-video on the I2V
model, each with the LoRAs of its own family.

As for SDXL, each job runs on a throwaway pipeline object around the shared, loaded-once components, with a
scheduler of its own built fresh from the model's config, so no job leaves timesteps or flags behind.

Defaults are the ones the WAN team and diffusers give for these 480p models: 832×480, 81 frames (5 s at 16 fps),
guidance 5.0, 50 steps for text-to-video and 40 for image-to-video, and UniPC on flow sigmas with a flow shift of 3.0
at 480p or less and 5.0 above. The input image of img2video sets the size when the request gives none and is fitted
to the size as for img2img: `output_size`, then `cover`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from ..config import Settings
from ..errors import InvalidInput
from ..manifest import Manifest, ModelRole
from ..media import to_pixels
from ..placement import Placement
from ..plan import WAN_NATIVE
from ..schema import LARGEST_VIDEO_JOB, WAN_SIZE, Img2Video, Txt2Video
from . import memory
from .common import StepHook, cover, describe_models, output_size, seeded_generator, step_end_callback
from .loras import LoraRegistry
from .outputs import GeneratedVideo
from .schedulers import fresh_scheduler

WanRequest = Txt2Video | Img2Video
WanPipelines = WanPipeline | WanImageToVideoPipeline
PIPELINES: dict[str, type[WanPipelines]] = {"txt2video": WanPipeline, "img2video": WanImageToVideoPipeline}
# The manifest role serving each task; its LoRAs live in the LoRA family of the same name.
ROLES = {"txt2video": "wan_t2v", "img2video": "wan_i2v"}
DEFAULT_SIZE = (832, 480)
DEFAULT_FRAMES = 81
DEFAULT_STEPS = {"txt2video": 50, "img2video": 40}
DEFAULT_GUIDANCE = 5.0
# Flow shift by size: diffusers' WAN docs give 3.0 for 480p and 5.0 for 720p.
FLOW_SHIFT_480P = 3.0
FLOW_SHIFT_720P = 5.0
MAX_TOKENS_AT = LARGEST_VIDEO_JOB


class WanFamily:
    TASKS = frozenset(PIPELINES)

    def __init__(
        self, pipelines: dict[str, WanPipelines], roles: list[ModelRole], loras: dict[str, LoraRegistry]
    ) -> None:
        self.pipelines = pipelines
        self.roles = roles
        self.loras = loras
        self.tasks = frozenset(pipelines)

    @classmethod
    def available_tasks(cls, models_dir: Path, manifest: Manifest) -> frozenset[str]:
        """The tasks whose model the manifest configures and the builder has completely put in the models folder."""
        return frozenset(
            task
            for task, role in ROLES.items()
            if role in manifest.roles and manifest.role(role).is_complete(models_dir)
        )

    @classmethod
    def load(cls, settings: Settings, manifest: Manifest, placement: Placement, tasks: frozenset[str]) -> WanFamily:
        pipelines: dict[str, WanPipelines] = {}
        loras: dict[str, LoraRegistry] = {}
        roles: list[ModelRole] = []
        placed: list[memory.PlacedModule] = []
        # What each role loaded, by the digests of its files: a later role with the same bytes reuses it. Text to
        # video first, so the smaller model's role owns what both share, as the memory plan counts it.
        loaded: dict[str, Any] = {}
        for task in (task for task in ROLES if task in tasks):
            role = manifest.role(ROLES[task])
            pipelines[task] = _load_pipeline(PIPELINES[task], role, settings.models_dir, placement, loaded)
            placed += [(role, each.name, getattr(pipelines[task], each.name)) for each in role.components]
            loras[task] = LoraRegistry.scan(settings.models_dir, role.name, settings.lora_cache_size)
            roles.append(role)
        memory.place(placed, placement)
        return cls(pipelines, roles, loras)

    def resolve(self, request: WanRequest, inputs: Mapping[str, Image.Image]) -> WanRequest:
        """Fills what the request left to the model's defaults, so `parameters` shows what really ran, and refuses
        a job larger than the worker takes."""
        self.loras[request.task].check(request.loras)
        width, height = output_size(request.width, request.height, inputs.get("image"), DEFAULT_SIZE, WAN_SIZE)
        num_frames = request.num_frames or DEFAULT_FRAMES
        pipeline = self.pipelines[request.task]
        budget = _tokens(pipeline, *MAX_TOKENS_AT)
        if _tokens(pipeline, width, height, num_frames) > budget:
            # Frames come in latent frames of 4 after the first; at the schema's largest size 41 frames still fit.
            most = (budget // _tokens(pipeline, width, height, 1) - 1) * pipeline.vae_scale_factor_temporal + 1
            largest = "{}×{} at {} frames".format(*MAX_TOKENS_AT)
            raise InvalidInput(
                f"num_frames: {num_frames} frames at {width}×{height} is more than this worker takes (as much as "
                f"{largest}); at {width}×{height} use at most {most} frames, or a smaller size"
            )
        return request.model_copy(
            update={
                "width": width,
                "height": height,
                "num_frames": num_frames,
                "num_inference_steps": request.num_inference_steps or DEFAULT_STEPS[request.task],
                "guidance_scale": DEFAULT_GUIDANCE if request.guidance_scale is None else request.guidance_scale,
            }
        )

    def generate(
        self,
        request: WanRequest,
        seed: int,
        inputs: Mapping[str, Image.Image],
        on_step: StepHook | None = None,
    ) -> Iterator[GeneratedVideo]:
        """Yields the one video of the job, once its LoRAs are removed again. `on_step` follows every denoising
        step and may end the job there. Above 832×480 the VAE decodes in tiles, as the memory plan's margin holds
        an untiled decode up to that size only."""
        arguments: dict[str, Any] = {}
        if isinstance(request, Img2Video):
            arguments["image"] = cover(inputs["image"], (request.width, request.height))
        pipeline = self.pipeline_for(request.task, request.width, request.height)
        tiled = request.width * request.height > WAN_NATIVE[0] * WAN_NATIVE[1]
        with memory.vae_tiling(pipeline.vae, tiled), self.loras[request.task].applied(pipeline, request.loras):
            output = pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                width=request.width,
                height=request.height,
                num_frames=request.num_frames,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=seeded_generator(seed),
                output_type="pt",
                callback_on_step_end=step_end_callback(on_step),
                **arguments,
            )
        yield GeneratedVideo(frames=to_pixels(output.frames[0], "video 0"), fps=request.fps, seed=seed)

    def pipeline_for(self, task: str, width: int, height: int) -> WanPipelines:
        """A job's own pipeline of the task's class: the shared models, a scheduler of its own for the job's size."""
        base = self.pipelines[task]
        shift = FLOW_SHIFT_480P if width * height <= DEFAULT_SIZE[0] * DEFAULT_SIZE[1] else FLOW_SHIFT_720P
        scheduler = fresh_scheduler(
            UniPCMultistepScheduler,
            base.scheduler.config,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
        pipeline = PIPELINES[task](
            **{**base.components, "scheduler": scheduler},
            boundary_ratio=base.config.boundary_ratio,
            expand_timesteps=base.config.expand_timesteps,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def describe(self) -> dict[str, Any]:
        any_pipeline = next(iter(self.pipelines.values()))
        return {
            "tasks": sorted(self.tasks),
            "models": describe_models(self.roles),
            "default_size": list(DEFAULT_SIZE),
            "default_num_frames": DEFAULT_FRAMES,
            "default_steps": {task: DEFAULT_STEPS[task] for task in sorted(self.tasks)},
            "default_guidance_scale": DEFAULT_GUIDANCE,
            "largest_job": dict(zip(("width", "height", "num_frames"), MAX_TOKENS_AT, strict=True)),
            "dtype": str(any_pipeline.transformer.dtype).removeprefix("torch."),
            "loras": {task: self.loras[task].names for task in sorted(self.tasks)},
        }

    def weight_modules(self) -> list[torch.nn.Module]:
        return [
            component
            for pipeline in self.pipelines.values()
            for component in pipeline.components.values()
            if isinstance(component, torch.nn.Module)
        ]


def _tokens(pipeline: WanPipelines, width: int, height: int, num_frames: int) -> int:
    """The transformer's sequence length for a clip: latent frames × latent rows × latent columns, per patch."""
    _, patch_height, patch_width = pipeline.transformer.config.patch_size
    spatial, temporal = pipeline.vae_scale_factor_spatial, pipeline.vae_scale_factor_temporal
    latent_frames = (num_frames - 1) // temporal + 1
    return latent_frames * (height // (spatial * patch_height)) * (width // (spatial * patch_width))


def _load_pipeline(
    pipeline_class: type[WanPipelines], role: ModelRole, models_dir: Path, placement: Placement, loaded: dict[str, Any]
) -> WanPipelines:
    """The role's pipeline, built around the components and tokenizer of a role loaded before wherever the builder's
    digests prove them byte-identical (the two WAN repos' UMT5 encoder, tokenizer and VAE), so they exist once."""
    names = [*(component.name for component in role.components), "tokenizer"]
    shared = memory.shared_objects(role, models_dir, loaded, names)
    pipeline = pipeline_class.from_pretrained(
        role.path(models_dir),
        **shared,
        **memory.load_components(role, models_dir, placement, given=shared),
        local_files_only=True,
    )
    pipeline.set_progress_bar_config(disable=True)
    memory.remember(role, models_dir, loaded, {name: getattr(pipeline, name) for name in names})
    return pipeline
