"""No job leaks into the next: a baseline txt2img job gives the same bytes, and the SDXL weights the same checksum,
after any sequence of SDXL jobs — every task, with and without LoRAs, any scheduler and size, and jobs that fail
on a bad LoRA name, a bad image, a LoRA file that breaks halfway through loading, and inside the GPU lock with LoRAs
loaded: an exception raised in the middle of denoising, or a delivery that fails. Hypothesis writes the sequences;
every job of a sequence runs again afterwards, in reverse order, and must end the same way.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_sdxl_family import LORA_NAMES, PHOTO, REPO, adapters_left, as_base64, gradient

from diffusion_worker.config import Settings
from diffusion_worker.hygiene import weights_digest
from diffusion_worker.manifest import load_manifest
from diffusion_worker.media import encode_image
from diffusion_worker.pipelines.sdxl import SdxlFamily
from diffusion_worker.placement import Placement
from diffusion_worker.schema import SCHEDULER_NAMES, parse_input

sys.path.insert(0, str(REPO / "builder"))
import tiny

BASELINE = {"prompt": "a lighthouse", "seed": 1234, "num_inference_steps": 2, "width": 64, "height": 64}
DEPTH_MAP = as_base64(gradient(48, 80).convert("L"))
BROKEN_LORA = "broken-halfway"
# Every outcome seen so far, by job: a job that comes again, in any sequence, must end the same way.
OUTCOMES: dict[str, Any] = {}


class Boom(RuntimeError):
    """Raised from inside the denoiser, as a CUDA error or a bug in a pipeline would be."""


@pytest.fixture(scope="module")
def family(worker):
    return worker.families["txt2img"]


@pytest.fixture(scope="module")
def baseline(tiny_models_dir: Path) -> tuple[str, str]:
    """The baseline image's sha256 and the weights' checksum from a family loaded afresh, which has run nothing
    else: the worker under test has served other test modules' jobs before these."""
    settings = Settings(models_dir=tiny_models_dir)
    fresh = SdxlFamily.load(settings, load_manifest(), Placement.from_settings(settings), SdxlFamily.TASKS)
    request = fresh.resolve(parse_input(BASELINE), {})
    [output] = fresh.generate(request, BASELINE["seed"], {})
    png = encode_image(output.image, "png", request.output_quality, settings.png_compress_level)
    return hashlib.sha256(png.data).hexdigest(), weights_digest(fresh.weight_modules())


def write_half_fitting_lora(path: Path) -> None:
    """A kohya SDXL LoRA whose second text encoder's part has the wrong shape: loading it fails once its UNet and
    first-encoder adapters are in the model."""
    tiny.write_lora("sdxl", path.stem, path, "kohya")
    tensors = load_file(path)
    key = next(key for key in sorted(tensors) if key.startswith("lora_te2_") and key.endswith(".lora_down.weight"))
    tensors[key] = torch.zeros(tiny.LORA_RANK, 7)
    save_file(tensors, path)


@pytest.fixture(scope="module", autouse=True)
def broken_lora(family, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A registered LoRA that breaks halfway through loading, after the adapters before it loaded."""
    path = tmp_path_factory.mktemp("loras") / f"{BROKEN_LORA}.safetensors"
    write_half_fitting_lora(path)
    family.loras.files[BROKEN_LORA] = path
    yield
    del family.loras.files[BROKEN_LORA]


@contextmanager
def exploding(denoiser: torch.nn.Module, on_call: int) -> Iterator[None]:
    """Makes a shared UNet or transformer raise on its `on_call`-th call: mid-denoising, with the job's LoRAs
    loaded."""
    calls = 0

    def hook(module: object, args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == on_call:
            raise Boom(f"{type(denoiser).__name__} call {calls}")

    handle = denoiser.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def delivering_to(worker, output_dir: Path) -> Iterator[None]:
    """Makes the worker deliver into `output_dir`; a path that can't be a folder fails each job's first result
    with UPLOAD_FAILED, inside the GPU lock, while the job's LoRAs are loaded."""
    saved = worker.settings
    worker.settings = replace(saved, output_dir=output_dir)
    try:
        yield
    finally:
        worker.settings = saved


@pytest.fixture(scope="module")
def faults(worker, family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Callable[[], Any]]:
    """What can go wrong inside the GPU lock, by name, as context managers around a job."""
    blocked = tmp_path_factory.mktemp("blocked") / "file-not-folder"
    blocked.write_text("in the way")
    return {
        "none": nullcontext,
        "denoise": lambda: exploding(family.base.unet, on_call=2),
        "upload": lambda: delivering_to(worker, blocked),
    }


def run(run_job: Callable[..., dict], faults: dict[str, Callable[[], Any]], job: dict, fault: str) -> Any:
    """Runs one job and returns what identifies its outcome: the result's hashes, or its error code."""
    with faults[fault]():
        result = run_job(job)
    if "error" in result:
        return result["error_code"]
    return [image["sha256"] for image in result["images"]] + [result.get("control_image", {}).get("sha256")]


def check_clean(run_job: Callable[..., dict], family, baseline: tuple[str, str]) -> None:
    assert adapters_left(family) == []
    assert weights_digest(family.weight_modules()) == baseline[1]
    assert run_job(BASELINE)["images"][0]["sha256"] == baseline[0]


# --- the sequences -----------------------------------------------------------------------------------------------

loras = st.lists(
    st.builds(
        lambda name, scale: {"name": name, "scale": scale},
        st.sampled_from(LORA_NAMES),
        st.sampled_from([-1.0, 0.5, 1.0, 2.0]),
    ),
    max_size=2,
    unique_by=lambda lora: lora["name"],
)
common = st.fixed_dictionaries(
    {
        "prompt": st.sampled_from(["a lighthouse", "a red cottage"]),
        "seed": st.integers(0, 3),
        "num_inference_steps": st.integers(1, 2),
        "width": st.sampled_from([64, 72]),
        "height": st.sampled_from([64, 88]),
        "scheduler": st.sampled_from(SCHEDULER_NAMES),
        "loras": loras,
    },
    optional={"num_images": st.just(2), "guidance_scale": st.sampled_from([0.0, 3.0])},
)
txt2img = common.map(lambda job: {**job, "task": "txt2img"})
img2img = st.builds(
    lambda job, image, strength: {**job, "task": "img2img", "image": image, "strength": strength},
    common,
    st.sampled_from([PHOTO, DEPTH_MAP]),
    st.sampled_from([1.0, 0.75, 0.5]),
)
controlnet = st.builds(
    lambda job, source, scale, window, returned: {
        **job,
        "task": "controlnet_depth",
        **source,
        "controlnet_conditioning_scale": scale,
        "control_guidance_start": window[0],
        "control_guidance_end": window[1],
        "return_control_image": returned,
    },
    common,
    st.sampled_from([{"image": PHOTO}, {"control_image": DEPTH_MAP}]),
    st.sampled_from([0.0, 0.8, 2.0]),
    st.sampled_from([(0.0, 1.0), (0.5, 1.0), (0.0, 0.5)]),
    st.booleans(),
)
good_job = st.one_of(txt2img, img2img, controlnet)
# Jobs that pass validation and fail later, where shared state may already have been touched.
failing_job = st.one_of(
    good_job.map(lambda job: {**job, "loras": [*job["loras"][:1], {"name": "../x", "scale": 1.0}]}),
    img2img.map(lambda job: {**job, "image": "aGVsbG8gd29ybGQ="}),
    good_job.map(
        lambda job: {**job, "loras": [{"name": LORA_NAMES[0], "scale": 1.0}, {"name": BROKEN_LORA, "scale": 1.0}]}
    ),
)
# Jobs that fail inside the GPU lock: valid, with LoRAs loaded when they fail, and calling the UNet at least twice
# (img2img at full strength and 2 steps) so that an exception on its second call comes mid-denoising.
in_the_lock = good_job.map(
    lambda job: {
        **job,
        "loras": job["loras"] or [{"name": LORA_NAMES[0], "scale": 1.0}],
        "num_inference_steps": 2,
        **({"strength": 1.0} if "strength" in job else {}),
    }
)
step = st.one_of(
    st.tuples(good_job, st.just("none")),
    st.tuples(failing_job, st.just("none")),
    st.tuples(in_the_lock, st.sampled_from(["denoise", "upload"])),
)
EXPECTED = {"denoise": "INTERNAL", "upload": "UPLOAD_FAILED"}
EVERY_KIND = [
    ({**BASELINE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": "pixel-art-xl", "scale": -1.0}]}, "none"),
    ({**BASELINE, "task": "img2img", "image": PHOTO, "scheduler": "heun", "width": 72}, "none"),
    (
        {
            **BASELINE,
            "task": "controlnet_depth",
            "image": PHOTO,
            "return_control_image": True,
            "scheduler": "dpmpp_2m_sde_karras",
        },
        "none",
    ),
    (
        {
            **BASELINE,
            "task": "controlnet_depth",
            "control_image": DEPTH_MAP,
            "loras": [{"name": "pixel-art-xl", "scale": 2.0}],
        },
        "denoise",
    ),
    ({**BASELINE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": "../x", "scale": 1.0}]}, "none"),
    ({**BASELINE, "task": "img2img", "image": "aGVsbG8gd29ybGQ="}, "none"),
    ({**BASELINE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": BROKEN_LORA, "scale": 1.0}]}, "none"),
    (
        {
            **BASELINE,
            "task": "img2img",
            "image": PHOTO,
            "strength": 1.0,
            "loras": [{"name": "sdxl-offset", "scale": 0.5}],
        },
        "denoise",
    ),
    ({**BASELINE, "scheduler": "euler_ancestral", "width": 72, "height": 88, "num_images": 2}, "none"),
    ({**BASELINE, "num_images": 2, "loras": [{"name": "pixel-art-xl", "scale": 0.5}]}, "upload"),
    ({**BASELINE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": "pixel-art-xl", "scale": -1.0}]}, "none"),
]


@settings(
    max_examples=5,
    deadline=None,
    # The same sequences on every run and machine, and no example database: CI failures reproduce anywhere.
    derandomize=True,
    database=None,
    # Each shrinking step reruns real jobs; the failing sequence is printed in full instead.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(sequence=EVERY_KIND)
@given(sequence=st.lists(step, min_size=3, max_size=6))
def test_no_sequence_of_jobs_leaks_into_the_next(
    run_job: Callable[..., dict], family, faults, baseline: tuple[str, str], sequence: list[tuple[dict, str]]
) -> None:
    outcomes = []
    for job, fault in sequence:
        outcome = run(run_job, faults, job, fault)
        # What ran, for --hypothesis-show-statistics: every task should both succeed and fail in the sequences.
        event(f"{job.get('task', 'txt2img')}, fault {fault}: {outcome if isinstance(outcome, str) else 'ok'}")
        key = json.dumps([job, fault], sort_keys=True)
        assert OUTCOMES.setdefault(key, outcome) == outcome, job
        if fault in EXPECTED:
            assert outcome == EXPECTED[fault]
        outcomes.append(outcome)
    check_clean(run_job, family, baseline)
    # Every job once more, in reverse order, so that each runs after other jobs than the first time: the same
    # outcome, bit for bit.
    for (job, fault), outcome in reversed(list(zip(sequence, outcomes, strict=True))):
        assert run(run_job, faults, job, fault) == outcome, (job, fault)
    check_clean(run_job, family, baseline)


# --- the failures, one by one ------------------------------------------------------------------------------------


def test_an_exception_mid_denoising_removes_the_loras(
    run_job: Callable[..., dict], family, faults, baseline: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    job = {**BASELINE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": "pixel-art-xl", "scale": 0.5}]}
    assert run(run_job, faults, job, "denoise") == "INTERNAL"
    assert "UNet2DConditionModel call 2" in caplog.text
    check_clean(run_job, family, baseline)


def test_a_lora_that_breaks_while_loading_removes_the_ones_before(
    run_job: Callable[..., dict], family, baseline: tuple[str, str]
) -> None:
    job = {**BASELINE, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": BROKEN_LORA, "scale": 1.0}]}
    result = run_job(job)
    assert result["error_code"] == "INTERNAL" and "refresh_worker" not in result
    check_clean(run_job, family, baseline)


def test_a_delivery_that_fails_with_loras_loaded_removes_them(
    run_job: Callable[..., dict], family, faults, baseline: tuple[str, str]
) -> None:
    job = {**BASELINE, "num_images": 2, "loras": [{"name": "pixel-art-xl", "scale": 1.0}]}
    assert run(run_job, faults, job, "upload") == "UPLOAD_FAILED"
    check_clean(run_job, family, baseline)


def test_stopping_after_the_first_image_removes_the_loras(
    run_job: Callable[..., dict], family, baseline: tuple[str, str]
) -> None:
    # The runtime closes the generator when delivery fails halfway: the LoRAs must go then too.
    request = family.resolve(parse_input({**BASELINE, "num_images": 2, "loras": [{"name": "sdxl-offset"}]}), {})
    generated = family.generate(request, 1, {})
    next(generated)
    assert adapters_left(family) != []
    generated.close()
    check_clean(run_job, family, baseline)
