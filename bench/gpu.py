"""On a CUDA machine with the real weights: each kind of job through the handler against the bare diffusers pipeline
on the same components and inputs, in the same run, with the speed-ups in force listed first. Not run in CI.

    MODELS_DIR=/models python bench/gpu.py [--repeats 3]

Jobs: SDXL 1024² at 30 steps; ControlNet-depth (a depth map given); a LoRA job right after a LoRA-free one; WAN
2.1 480p at 81 frames. Each is warmed up once (kernels chosen, `torch.compile` traced where enabled), then timed
`--repeats` times, interleaved with its baseline; the GPU is synchronised before every clock reading.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse on a cliff at dusk, volumetric light"
LORA = "sdxl-offset"


def speedups(worker: Any) -> dict[str, str]:
    """What the loaded worker runs with, read from its pipelines rather than from its settings."""
    found: dict[str, str] = {}
    if "txt2img" in worker.families:
        family = worker.families["txt2img"]
        unet, vae = family.base.unet, family.base.vae
        processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
        found["sdxl attention"] = ", ".join(processors) + (" (SDPA)" if "AttnProcessor2_0" in processors else "")
        found["sdxl dtype"] = f"unet {unet.dtype}, vae {vae.dtype}".replace("torch.", "")
        vae_role = next((role for role in family.roles if role.name == "sdxl_vae"), None)
        found["sdxl vae"] = vae_role.repo_id if vae_role else "the base model's"
        channels_last = unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        found["sdxl channels-last"] = "on" if channels_last and unet.conv_in.weight.shape[-1] > 1 else "off"
        found["sdxl torch.compile"] = "on" if hasattr(unet, "_orig_mod") else "off"
    for task in ("txt2video", "img2video"):
        if task in worker.families:
            transformer = worker.families[task].pipelines[task].transformer
            processors = sorted({type(p).__name__ for p in transformer.attn_processors.values()})
            found[f"{task} attention"] = ", ".join(processors)
            found[f"{task} dtype"] = str(transformer.dtype).replace("torch.", "")
            found[f"{task} torch.compile"] = "on" if hasattr(transformer, "_orig_mod") else "off"
    found["tf32 matmul"] = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    found["cudnn benchmark"] = "on" if torch.backends.cudnn.benchmark else "off"
    return found


def synchronised(run: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        torch.cuda.synchronize()
        began = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return time.perf_counter() - began

    return timed


def cases(worker: Any, handle: Callable[[dict], dict]) -> dict[str, dict[str, Callable[[], object]]]:
    """Per job: the handler's run and the bare pipeline's, on the same components, seed and inputs."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from diffusion_worker.pipelines.common import seeded_generator

    found: dict[str, dict[str, Callable[[], object]]] = {}
    sdxl = {"prompt": PROMPT, "seed": 7, "width": 1024, "height": 1024, "num_inference_steps": 30}
    if "txt2img" in worker.families:
        base = worker.families["txt2img"].base

        def bare_sdxl() -> object:
            return base(prompt=PROMPT, width=1024, height=1024, num_inference_steps=30, generator=seeded_generator(7))

        found["sdxl 1024² 30 steps"] = {"handler": lambda: handle(sdxl), "bare": bare_sdxl}
        if LORA in worker.families["txt2img"].loras.names:
            lora_file = worker.families["txt2img"].loras.files[LORA]

            def lora_after_plain() -> object:
                handle(sdxl)
                return handle({**sdxl, "loras": [{"name": LORA}]})

            def bare_lora_after_plain() -> object:
                bare_sdxl()
                base.load_lora_weights(str(lora_file), adapter_name="bench")
                try:
                    return bare_sdxl()
                finally:
                    base.unload_lora_weights()

            found["sdxl LoRA job after a plain one"] = {"handler": lora_after_plain, "bare": bare_lora_after_plain}
    if "controlnet_depth" in worker.families:
        family = worker.families["controlnet_depth"]
        depth = Image.linear_gradient("L").resize((1024, 1024))
        buffer = io.BytesIO()
        depth.save(buffer, format="PNG")
        control_image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        pipeline = StableDiffusionXLControlNetPipeline(**family.base.components, controlnet=family.controlnet)
        job = {**sdxl, "task": "controlnet_depth", "control_image": control_image}
        found["controlnet-depth 1024² 30 steps"] = {
            "handler": lambda: handle(job),
            "bare": lambda: pipeline(
                prompt=PROMPT,
                image=depth,
                width=1024,
                height=1024,
                num_inference_steps=30,
                generator=seeded_generator(7),
            ),
        }
    if "txt2video" in worker.families:
        wan = worker.families["txt2video"].pipelines["txt2video"]
        video = {"task": "txt2video", "prompt": PROMPT, "seed": 7, "width": 832, "height": 480, "num_frames": 81}
        found["wan 480p 81 frames"] = {
            "handler": lambda: handle(video),
            "bare": lambda: wan(
                prompt=PROMPT, width=832, height=480, num_frames=81, generator=seeded_generator(7), output_type="np"
            ),
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py measures on a CUDA GPU and found none; on a CPU machine run bench/perf.py")
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    from perf import Handler, median_of

    import handler

    run_job = Handler(handler)
    worker = handler.worker
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "speed-ups": speedups(worker)}, indent=2))
    print(f"{'job':<36} {'handler s':>10} {'bare s':>8} {'ratio':>6}")
    for name, runs in cases(worker, lambda job_input: run_job({"id": "gpu-bench", "input": job_input})).items():
        medians = median_of(arguments.repeats, {kind: synchronised(run) for kind, run in runs.items()})
        handler_s, bare_s = medians["handler"], medians["bare"]
        print(f"{name:<36} {handler_s:>10.2f} {bare_s:>8.2f} {handler_s / bare_s:>6.3f}", flush=True)
    print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
