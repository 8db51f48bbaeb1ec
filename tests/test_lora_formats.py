"""LoRAs in the layouts they are published in (diffusers', kohya's for SDXL, ComfyUI/Kijai's for WAN, each with an
alpha that is not the rank): each changes the output, gives the same bytes every time, and leaves the base weights
bit for bit as they were; a LoRA that fails halfway through loading is removed, and a removal that fails is never
hidden."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from safetensors.torch import load_file, save_file
from test_no_leak import exploding, tiny, write_half_fitting_lora
from test_sdxl_family import PHOTO, adapters_left
from test_video import FAST as VIDEO

from diffusion_worker.hygiene import weights_digest
from diffusion_worker.pipelines.loras import LoraRegistry
from diffusion_worker.schema import LoraRef

IMAGE = {"prompt": "a cottage", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 5}
# name → (task, LoRA family, layout): the manifest's LoRAs in their real layouts, and one of each other layout.
LORAS = {
    "sdxl-offset": ("txt2img", "sdxl", "kohya"),
    "sdxl-diffusers": ("txt2img", "sdxl", "diffusers"),
    "causvid": ("txt2video", "wan_t2v", "kijai"),
    "wan-diffusers": ("txt2video", "wan_t2v", "diffusers"),
    "wan-i2v-kijai": ("img2video", "wan_i2v", "kijai"),
}
# A LoRA that fails halfway through loading (see write_half_fitting_lora).
HALF_FITTING = "half-fitting"
JOBS = {
    "txt2img": IMAGE,
    "txt2video": {**VIDEO, "num_frames": 5},
    "img2video": {**VIDEO, "task": "img2video", "image": PHOTO, "num_frames": 5},
}


def registry_for(worker, task: str) -> LoraRegistry:
    family = worker.families[task]
    return family.loras[task] if isinstance(family.loras, dict) else family.loras


def digest(worker, task: str) -> str:
    return weights_digest(worker.families[task].weight_modules())


@pytest.fixture(scope="module", autouse=True)
def extra_loras(worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The LoRAs the manifest has no example of, written by the tiny builder and registered for this module."""
    folder = tmp_path_factory.mktemp("loras")
    added: dict[str, tuple[LoraRegistry, Path]] = {}
    for name, (task, family, style) in LORAS.items():
        registry = registry_for(worker, task)
        if name not in registry.files:
            path = folder / f"{name}.safetensors"
            tiny.write_lora(family, name, path, style)
            added[name] = (registry, path)
    half = folder / f"{HALF_FITTING}.safetensors"
    write_half_fitting_lora(half)
    added[HALF_FITTING] = (registry_for(worker, "txt2img"), half)
    for name, (registry, path) in added.items():
        registry.files[name] = path
    yield {name: path for name, (_, path) in added.items()}
    for name, (registry, _) in added.items():
        del registry.files[name]


def result_sha(result: dict[str, Any]) -> str:
    assert "error" not in result, result
    return result["video"]["sha256"] if "video" in result else result["images"][0]["sha256"]


@pytest.mark.parametrize("name", LORAS)
def test_each_layout_changes_the_output_the_same_way_every_time_and_leaves_the_weights(
    run_job: Callable[..., dict], worker, name: str
) -> None:
    task, _, style = LORAS[name]
    registry = registry_for(worker, task)
    as_read = load_file(registry.files[name])
    if style != "diffusers":
        assert any(key.endswith(".alpha") and value.item() != tiny.LORA_RANK for key, value in as_read.items())
    job = JOBS[task]
    weights = digest(worker, task)
    base = result_sha(run_job(job))
    with_lora = {result_sha(run_job({**job, "loras": [{"name": name, "scale": 1.0}]})) for _ in range(3)}
    assert len(with_lora) == 1 and base not in with_lora
    assert adapters_left(worker.families[task]) == []
    assert digest(worker, task) == weights
    assert result_sha(run_job(job)) == base
    # What the cache keeps is what the file holds, whatever the loaders did with the copies they were given.
    cached = registry.state_dict(name)
    assert cached.keys() == as_read.keys()
    assert all(torch.equal(cached[key], as_read[key]) for key in as_read)


def test_every_layout_is_converted_whole(worker) -> None:
    """Each adapter of a file lands in the model: none of its layers is dropped on the way."""
    for name, (task, _, _) in LORAS.items():
        registry = registry_for(worker, task)
        pipeline = worker.families[task].pipelines[task] if task != "txt2img" else worker.families[task].base
        tensors = registry.state_dict(name)
        pairs = sum(key.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight")) for key in tensors)
        pairs += sum(key.endswith(".lora_linear_layer.down.weight") for key in tensors)
        biases = sum(key.endswith(".diff_b") for key in tensors)
        with registry.applied(pipeline, [LoraRef(name=name)]):
            loaded = [
                parameter
                for module in worker.families[task].weight_modules()
                for parameter, _ in module.named_parameters()
                if ".lora_A." in parameter
            ]
            loaded_biases = [
                parameter
                for module in worker.families[task].weight_modules()
                for parameter, _ in module.named_parameters()
                if ".lora_B." in parameter and parameter.endswith(".bias")
            ]
        assert (len(loaded), len(loaded_biases)) == (pairs, biases), name


def test_a_copy_for_each_load_never_the_cached_tensors(worker) -> None:
    registry = registry_for(worker, "txt2video")
    first, second = registry.state_dict("causvid"), registry.state_dict("causvid")
    assert first.keys() == second.keys()
    assert all(first[key].data_ptr() != second[key].data_ptr() for key in first)


def test_a_lora_that_fails_halfway_through_loading_is_removed(run_job: Callable[..., dict], worker) -> None:
    family = worker.families["txt2img"]
    weights = digest(worker, "txt2img")
    base = result_sha(run_job(IMAGE))
    failed = run_job({**IMAGE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": HALF_FITTING}]})
    assert (failed["error_code"], failed.get("refresh_worker")) == ("INTERNAL", None)
    assert adapters_left(family) == []
    assert digest(worker, "txt2img") == weights
    # The adapter names are free again: the same LoRAs load in the next job.
    assert result_sha(run_job({**IMAGE, "loras": [{"name": "sdxl-offset", "scale": 1.0}]})) != base
    assert result_sha(run_job(IMAGE)) == base


def test_a_lora_of_an_unknown_layout_does_not_fit(run_job: Callable[..., dict], worker, tmp_path: Path) -> None:
    registry = registry_for(worker, "txt2img")
    path = tmp_path / "unknown-layout.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, path)
    registry.files["unknown-layout"] = path
    try:
        result = run_job({**IMAGE, "loras": [{"name": "unknown-layout"}]})
    finally:
        del registry.files["unknown-layout"]
    assert (result["error_code"], result["retryable"]) == ("INVALID_INPUT", False)
    assert result["error"].startswith("INVALID_INPUT: loras: 'unknown-layout' does not fit this model")
    assert adapters_left(worker.families["txt2img"]) == []


@pytest.fixture
def failing_unload(worker, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Makes every removal of adapters fail, as a bug or a device fault would; they are removed for real after."""
    calls: list[str] = []

    def failing(pipeline: LoraBaseMixin) -> None:
        calls.append(type(pipeline).__name__)
        raise RuntimeError("unload exploded")

    monkeypatch.setattr(LoraBaseMixin, "unload_lora_weights", failing)
    yield calls
    monkeypatch.undo()
    worker.families["txt2img"].base.unload_lora_weights()
    assert adapters_left(worker.families["txt2img"]) == []


def test_a_failing_removal_asks_for_a_new_worker_and_keeps_the_jobs_own_error(
    run_job: Callable[..., dict], worker, failing_unload: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    family = worker.families["txt2img"]
    job = {**IMAGE, "loras": [{"name": "sdxl-offset", "scale": 1.0}]}
    with exploding(family.base.unet, on_call=2):
        result = run_job(job)
    assert (result["error_code"], result["refresh_worker"]) == ("INTERNAL", True)
    assert "could not be removed; this worker will be replaced" in result["error"]
    assert failing_unload == ["StableDiffusionXLPipeline"]
    # Both errors are in the log, with their tracebacks: the removal's, and the denoising fault it followed.
    assert "unload exploded" in caplog.text and "UNet2DConditionModel call 2" in caplog.text
    # The adapters are still in the model: no job is served from it, with LoRAs or without.
    assert adapters_left(family) != []
    for next_job in (IMAGE, job):
        refused = run_job(next_job)
        assert (refused["error_code"], refused["refresh_worker"]) == ("INTERNAL", True)
        assert "still loaded from an earlier job" in refused["error"]
