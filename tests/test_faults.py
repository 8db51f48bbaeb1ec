"""Faults on the GPU, injected on CPU where they happen on CUDA: out-of-memory in the denoiser or the VAE decode
(retryable, and the next job bit-identical to a baseline), CUDA/cuBLAS/cuDNN failures (the worker asks to be
replaced and refuses every later job), a clean-up whose CUDA calls fail (the answer still arrives), decodes that hold
NaN (refused), a VAE left in another precision (put back), and VAE tiling on large jobs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from test_sdxl_family import sha

from diffusion_worker.pipelines.common import seeded_generator
from diffusion_worker.schema import parse_input

IMAGE = {"prompt": "a lighthouse", "seed": 11, "num_inference_steps": 2, "width": 64, "height": 64}
VIDEO = {**IMAGE, "task": "txt2video", "num_frames": 5}
OUT_OF_MEMORY = {
    "error": "OUT_OF_MEMORY: the GPU ran out of memory; the worker freed it, retry or lower the size",
    "error_code": "OUT_OF_MEMORY",
    "retryable": True,
}
GPU_LOST = {
    "error": "INTERNAL: the GPU reported an error; this worker will be replaced",
    "error_code": "INTERNAL",
    "retryable": True,
    "refresh_worker": True,
}
# What torch raises: its own type for the caching allocator, the CUDA runtime's text for the rest.
OOM_ERRORS = {
    "OutOfMemoryError": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    "cuda text": lambda: torch.AcceleratorError("CUDA error: out of memory"),
    "cublas alloc": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
}
GPU_ERRORS = {
    "illegal address": lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    "cublas": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`"),
    "cudnn": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
}


def result_of(result: dict) -> str:
    """The output's sha256, image or video."""
    assert "error" not in result, result
    return result["video"]["sha256"] if "video" in result else sha(result)


def places(worker) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Where faults are injected: each family's denoiser and VAE decoder, with a job that reaches it."""
    sdxl, wan = worker.families["txt2img"], worker.families["txt2video"].pipelines["txt2video"]
    return {
        "unet": (sdxl.base.unet, IMAGE),
        "sdxl decode": (sdxl.base.vae.decoder, IMAGE),
        "transformer": (wan.transformer, VIDEO),
        "wan decode": (wan.vae.decoder, VIDEO),
    }


@contextmanager
def failing(module: torch.nn.Module, error: Callable[[], Exception]) -> Iterator[None]:
    def hook(*_: object) -> None:
        raise error()

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def decoding(module: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    handle = module.register_forward_hook(lambda _, __, output: change(output))
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def replaced_gpu(worker) -> Iterator[None]:
    """For tests that lose the GPU: the session's worker gets a working one back afterwards."""
    yield
    worker.gpu_lost = None


@pytest.mark.parametrize("kind", OOM_ERRORS)
@pytest.mark.parametrize("place", ["unet", "sdxl decode", "transformer", "wan decode"])
def test_out_of_memory_anywhere_is_retryable_and_the_next_job_is_bit_identical(
    run_job: Callable[..., dict], worker, place: str, kind: str
) -> None:
    module, job = places(worker)[place]
    baseline = result_of(run_job(job))
    with failing(module, OOM_ERRORS[kind]):
        assert run_job(job) == OUT_OF_MEMORY
    assert result_of(run_job(job)) == baseline


@pytest.mark.parametrize("kind", GPU_ERRORS)
@pytest.mark.parametrize("place", ["unet", "wan decode"])
def test_a_gpu_failure_asks_for_a_new_worker_and_refuses_every_later_job(
    run_job: Callable[..., dict], worker, replaced_gpu: None, place: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    module, job = places(worker)[place]
    with failing(module, GPU_ERRORS[kind]):
        assert run_job(job) == GPU_LOST
    assert GPU_ERRORS[kind]().args[0] in caplog.text
    for later in (IMAGE, VIDEO, {"task": "info"}):
        assert run_job(later) == GPU_LOST


def test_the_clean_up_never_raises_and_a_failing_one_loses_the_gpu(
    run_job: Callable[..., dict], worker, replaced_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an illegal address every CUDA call fails again, the clean-up's too: the job's answer arrives anyway."""

    def illegal_address() -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", illegal_address)
    monkeypatch.setattr(torch.cuda, "ipc_collect", illegal_address)
    with failing(places(worker)["unet"][0], GPU_ERRORS["illegal address"]):
        assert run_job(IMAGE) == GPU_LOST
    worker.gpu_lost = None
    # A job that succeeds is answered; the clean-up's failure then refuses the next.
    assert "images" in run_job(IMAGE)
    assert run_job(IMAGE) == GPU_LOST


@pytest.mark.parametrize("job", [IMAGE, VIDEO], ids=["image", "video"])
def test_a_half_nan_decode_is_refused_never_delivered(run_job: Callable[..., dict], worker, job: dict) -> None:
    place = "sdxl decode" if job is IMAGE else "wan decode"
    decoder = places(worker)[place][0]
    baseline = result_of(run_job(job))

    def half_nan(output: torch.Tensor) -> torch.Tensor:
        poisoned = output.clone()
        poisoned[..., : output.shape[-1] // 2] = float("nan")
        return poisoned

    with decoding(decoder, half_nan):
        result = run_job(job)
    what = "image 0" if job is IMAGE else "video 0"
    assert result == {
        "error": f"INTERNAL: {what} has non-finite values in 50% of its pixels: the decode failed",
        "error_code": "INTERNAL",
        "retryable": True,
    }
    # The VAE's −1 is black once mapped to [0, 1].
    with decoding(decoder, lambda output: torch.full_like(output, -1.0)):
        assert (
            run_job(job)["error"]
            == f"INTERNAL: {what} is uniformly black: the decode failed (NaN or overflow in the VAE)"
        )
    assert result_of(run_job(job)) == baseline


def test_images_are_the_bytes_diffusers_makes(worker) -> None:
    """Decoded as floats for the checks, then rounded as diffusers rounds its PIL images: the same pixels."""
    family = worker.families["txt2img"]
    request = family.resolve(parse_input(IMAGE), {})
    [ours] = family.generate(request, IMAGE["seed"], {})
    theirs = family.pipeline_for("txt2img", request.scheduler)(
        prompt=request.prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=seeded_generator(IMAGE["seed"]),
        width=64,
        height=64,
        output_type="pil",
    ).images[0]
    assert ours.image.tobytes() == theirs.tobytes()


def test_a_vae_left_in_another_precision_or_upcasting_is_put_back(run_job: Callable[..., dict], worker) -> None:
    vae = worker.families["txt2img"].base.vae
    baseline = result_of(run_job(IMAGE))
    vae.to(torch.float64)
    vae.register_to_config(force_upcast=True)
    run_job(IMAGE)
    assert vae.dtype == torch.float32 and not vae.config.force_upcast
    assert result_of(run_job(IMAGE)) == baseline
    # A cast cut short after its first module.
    vae.encoder.conv_in.to(torch.float64)
    run_job(IMAGE)
    assert {parameter.dtype for parameter in vae.parameters()} == {torch.float32}
    assert result_of(run_job(IMAGE)) == baseline


def test_a_large_job_decodes_in_tiles_completely_and_reproducibly(run_job: Callable[..., dict], worker) -> None:
    """Above the model's native size (the tiny SDXL's 256², the real one's 1024²) the VAE decodes in tiles."""
    vae = worker.families["txt2img"].base.vae
    seen: list[bool] = []
    large = {**IMAGE, "width": 512, "height": 384, "num_inference_steps": 1}
    with decoding(vae.decoder, lambda output: seen.append(vae.use_tiling)):
        first, second = run_job(large), run_job(large)
        assert "images" in run_job({**large, "width": 256, "height": 256})
    assert result_of(first) == result_of(second)
    assert (first["images"][0]["width"], first["images"][0]["height"]) == (512, 384)
    # Tiles of 256² overlapping by a quarter: six decodes per large image, one for the native size.
    assert seen == [True] * 6 + [True] * 6 + [False]
    assert not vae.use_tiling
