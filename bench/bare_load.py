"""The cold start's baseline: the same components the worker loads, by bare `from_pretrained` calls and nothing
else, in a process of its own; prints `ready` once they are loaded. Run by bench/perf.py.

    python bench/bare_load.py MODELS_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
)
from transformers import AutoImageProcessor, AutoModelForDepthEstimation

from diffusion_worker.manifest import load_manifest


def main() -> None:
    models_dir = Path(sys.argv[1])
    manifest = load_manifest()

    def present(role: str) -> bool:
        return role in manifest.roles and manifest.role(role).is_complete(models_dir)

    def load(loader: type, role: str, **options: object) -> object:
        # float32, as the worker on CPU; a CUDA machine runs bench/gpu.py instead.
        model = manifest.role(role)
        return loader.from_pretrained(model.path(models_dir), variant=model.variant, dtype=torch.float32, **options)

    loaded = [load(StableDiffusionXLPipeline, "sdxl", vae=load(AutoencoderKL, "sdxl_vae"))]
    if present("controlnet_depth") and present("depth_estimator"):
        loaded += [
            load(ControlNetModel, "controlnet_depth"),
            load(AutoModelForDepthEstimation, "depth_estimator"),
            AutoImageProcessor.from_pretrained(manifest.role("depth_estimator").path(models_dir)),
        ]
    loaded += [
        load(pipeline, role)
        for role, pipeline in (("wan_t2v", WanPipeline), ("wan_i2v", WanImageToVideoPipeline))
        if present(role)
    ]
    print("ready", len(loaded), flush=True)


if __name__ == "__main__":
    main()
