"""The SDXL refiner through the real handler: the base hands its latents over at high_noise_frac, the refiner's UNet
finishes on the base's own second text encoder and VAE, and a worker without it says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_sdxl_family import FAST, PHOTO, sha

from diffusion_worker.hygiene import weights_digest

REPO = Path(__file__).resolve().parents[1]
# 4 steps: the tiny model's leading timesteps 751, 501, 251, 1, of which high_noise_frac 0.8 hands 1 to the refiner.
REFINED = {**FAST, "num_inference_steps": 4, "refiner": True}


def test_the_refiner_changes_the_image_reproducibly(run_job: Callable[..., dict]) -> None:
    plain = sha(run_job({**FAST, "num_inference_steps": 4}))
    refined = run_job(REFINED)
    parameters = refined["parameters"]
    assert (parameters["refiner"], parameters["high_noise_frac"], parameters["refiner_inference_steps"]) == (
        True,
        0.8,
        4,
    )
    assert sha(refined) != plain
    assert sha(run_job(REFINED)) == sha(refined)
    others = {
        sha(run_job({**REFINED, "high_noise_frac": 0.5})),
        # Refiner steps of their own: its schedule below the hand-off is then 126 and 1.
        sha(run_job({**REFINED, "refiner_inference_steps": 8})),
        sha(run_job({**REFINED, "seed": 6})),
    }
    assert sha(refined) not in others and len(others) == 3


def test_img2img_on_the_refiner_refines_the_input_image(run_job: Callable[..., dict]) -> None:
    job = {**FAST, "task": "img2img", "image": PHOTO, "strength": 0.5}
    refined = run_job({**job, "refiner": True})
    assert refined["parameters"]["refiner"] is True
    assert sha(refined) != sha(run_job(job))
    assert sha(run_job({**job, "refiner": True})) == sha(refined)


def test_refiner_jobs_leave_every_weight_as_it_was(run_job: Callable[..., dict], worker) -> None:
    family = worker.families["txt2img"]
    before = weights_digest(family.weight_modules())
    run_job({**REFINED, "loras": [{"name": "sdxl-offset", "scale": 1.0}], "num_images": 2})
    run_job({**FAST, "task": "img2img", "image": PHOTO, "strength": 0.5, "refiner": True})
    assert weights_digest(family.weight_modules()) == before


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"refiner": True, "num_inference_steps": 1},
            "INVALID_INPUT: num_inference_steps: 1 steps cut at high_noise_frac 0.8 leave the base no step; "
            "raise the steps or move high_noise_frac",
        ),
        ({"refiner": True, "high_noise_frac": 1.0}, "INVALID_INPUT: high_noise_frac: Input should be less than 1"),
        (
            {"refiner_inference_steps": 4},
            "INVALID_INPUT: refiner_inference_steps: applies only with `refiner: true`",
        ),
        (
            {"task": "img2img", "image": PHOTO, "refiner": True, "preset": "lightning-4step"},
            "INVALID_INPUT: refiner: img2img on the refiner takes no `loras` or `preset`: they fit the base model",
        ),
    ],
)
def test_refiner_rules_name_their_field(run_job: Callable[..., dict], change: dict, error: str) -> None:
    assert run_job({**FAST, **change})["error"] == error


def test_without_the_refiner_role_refiner_jobs_are_task_unavailable(
    run_job: Callable[..., dict], worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.families["txt2img"], "refiner_unet", None)
    result = run_job(REFINED)
    assert result["error_code"] == "TASK_UNAVAILABLE" and result["retryable"] is False
    assert result["error"] == "TASK_UNAVAILABLE: refiner: this worker has no SDXL refiner (manifest role sdxl_refiner)"
    assert "error" not in run_job(FAST)


def test_info_lists_the_refiner(run_job: Callable[..., dict]) -> None:
    (sdxl,) = (pipeline for pipeline in run_job({"task": "info"})["pipelines"] if "txt2img" in pipeline["tasks"])
    assert sdxl["refiner"] is True
    (refiner,) = (model for model in sdxl["models"] if model["role"] == "sdxl_refiner")
    assert refiner["repo_id"] == "stabilityai/stable-diffusion-xl-refiner-1.0"


# A fresh process, so that nothing another test built is counted: the models of each kind that exist after a
# worker serving the refiner has loaded and run refiner jobs of both kinds.
COUNT_MODELS = """
import gc, json
import handler
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection
job = {"prompt": "a cottage", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 5, "refiner": True}
for task in ({}, {"task": "img2img", "image": %r, "strength": 0.5}):
    assert "images" in handler.worker.handle({"id": "count", "input": {**job, **task}})
# The worker freezes what it loaded out of the collector's sight (gc.freeze): count that too.
gc.unfreeze()
gc.collect()
kinds = (AutoencoderKL, CLIPTextModelWithProjection, UNet2DConditionModel)
print(json.dumps({kind.__name__: sum(isinstance(o, kind) for o in gc.get_objects()) for kind in kinds}))
"""


def test_the_refiner_adds_only_its_unet_to_the_process(tiny_models_dir: Path) -> None:
    env = {**os.environ, "MODELS_DIR": str(tiny_models_dir), "WORKER_TASKS": "txt2img,img2img"}
    completed = subprocess.run(
        [sys.executable, "-c", COUNT_MODELS % PHOTO], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    counts = json.loads(completed.stdout.strip().splitlines()[-1])
    # One VAE and one second text encoder, the base's, serve both; two UNets: the base's and the refiner's.
    assert counts == {"AutoencoderKL": 1, "CLIPTextModelWithProjection": 1, "UNet2DConditionModel": 2}
