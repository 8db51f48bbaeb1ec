"""A job's lifecycle through the real async handler: deadlines stop it within one step, with nothing decoded."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
import runpod
import torch

from diffusion_worker import hygiene, lifecycle, runtime
from diffusion_worker.config import Settings
from diffusion_worker.runtime import GPU, Worker

pytest_plugins = ("s3_fixtures",)
BASELINE = {"prompt": "a lighthouse", "seed": 1234, "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def sdxl(worker):
    return worker.families["txt2img"]


@pytest.fixture(scope="module")
def baseline(run_job: Callable[..., dict]) -> str:
    return run_job(BASELINE)["images"][0]["sha256"]


@contextmanager
def slowed(module: torch.nn.Module, seconds: float) -> Iterator[list[float]]:
    """Makes each call of `module` take `seconds` longer, and records when each call began."""
    began: list[float] = []

    def hook(*_: object) -> None:
        began.append(time.monotonic())
        time.sleep(seconds)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield began
    finally:
        handle.remove()


@contextmanager
def counted(module: torch.nn.Module) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_a_job_past_its_timeout_stops_within_one_step_with_nothing_decoded(
    run_job: Callable[..., dict], sdxl, baseline: str
) -> None:
    # Guidance 0: one UNet call per step.
    job = {**BASELINE, "num_inference_steps": 100, "guidance_scale": 0.0, "timeout_s": 1, "num_images": 2}
    with slowed(sdxl.base.unet, 0.25) as began, counted(sdxl.base.vae.decoder) as decodes:
        asked = time.monotonic()
        result = run_job(job)
    assert result["error_code"] == "TIMEOUT" and result["retryable"] is True, result
    steps = len(began)
    assert f"passed its 1 s limit (timeout_s) and was stopped at step {steps} of 100 of image 1 of 2" in result["error"]
    # The deadline is at least 1 s after `asked`: no step began after it but the one that crossed it.
    assert sum(start > asked + 1 for start in began) <= 1
    assert decodes == []
    assert run_job(BASELINE)["images"][0]["sha256"] == baseline


def test_timeout_s_is_bounded_by_job_timeout_s(run_job: Callable[..., dict], worker) -> None:
    limit = worker.settings.job_timeout_s
    result = run_job({**BASELINE, "timeout_s": limit + 1})
    assert result["error"] == f"INVALID_INPUT: timeout_s: must be at most {limit:g} (JOB_TIMEOUT_S) (got {limit + 1:g})"
    assert run_job({**BASELINE, "timeout_s": 0.5})["error"].startswith("INVALID_INPUT: timeout_s: ")


def test_the_gpu_thread_is_one_thread_for_every_job(run_job: Callable[..., dict], sdxl) -> None:
    threads: set[str] = set()
    handle = sdxl.base.unet.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    try:
        for seed in (1, 2):
            assert "error" not in run_job({**BASELINE, "seed": seed})
    finally:
        handle.remove()
    assert len(threads) == 1 and threads.pop().startswith("gpu")


def test_cancelling_the_task_mid_denoising_stops_the_gpu_thread_within_one_step(
    handler_module, sdxl, baseline: str, run_job: Callable[..., dict]
) -> None:
    job = {**BASELINE, "num_inference_steps": 100, "guidance_scale": 0.0}

    async def cancel_at_step_three() -> int:
        task = asyncio.create_task(handler_module.handler({"id": "cancelled", "input": job}))
        while len(began) < 3:
            await asyncio.sleep(0.01)
        steps_at_cancel = len(began)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return steps_at_cancel

    with slowed(sdxl.base.unet, 0.1) as began, counted(sdxl.base.vae.decoder) as decodes:
        steps_at_cancel = asyncio.run(cancel_at_step_three())
        # The handler re-raised only once the GPU thread had stopped: no step after the one running at the cancel.
        assert len(began) <= steps_at_cancel + 1
        assert not GPU.busy
        time.sleep(0.3)
        assert len(began) <= steps_at_cancel + 1
    assert decodes == []
    assert run_job(BASELINE)["images"][0]["sha256"] == baseline


MIXED = [
    {**BASELINE, "num_images": 2, "seed": 7},
    {**BASELINE, "task": "txt2video", "num_frames": 5, "seed": 8},
    {**BASELINE, "width": 72, "scheduler": "euler_ancestral", "seed": 9},
]


def test_jobs_in_flight_together_give_the_bytes_they_give_one_by_one(
    handler_module, run_job: Callable[..., dict]
) -> None:
    def hashes(result: dict) -> list[str]:
        return [entry["sha256"] for entry in [*result.get("images", []), *filter(None, [result.get("video")])]]

    alone = [hashes(run_job(job)) for job in MIXED]

    async def together() -> list[dict]:
        return await asyncio.gather(
            *(handler_module.handler({"id": f"together-{n}", "input": job}) for n, job in enumerate(MIXED))
        )

    assert [hashes(result) for result in asyncio.run(together())] == alone
    assert Settings.from_env({"WORKER_CONCURRENCY": "2"}).worker_concurrency == 2
    assert handler_module.concurrency(1) == handler_module.settings.worker_concurrency == 1


@pytest.fixture
def progress(worker, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Progress updates on, unthrottled, recorded by replacing the SDK's function."""
    sent: list[dict] = []
    monkeypatch.setattr(worker, "settings", replace(worker.settings, progress_updates=True))
    monkeypatch.setattr(lifecycle, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(lifecycle, "PROGRESS_SETTLE_S", 0.0)
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda job, update: sent.append({**update}))
    return sent


def test_progress_updates_follow_the_steps_of_each_image(run_job: Callable[..., dict], progress: list[dict]) -> None:
    result = run_job({**BASELINE, "num_inference_steps": 3, "num_images": 2})
    assert "error" not in result
    denoising = [(update["image"], update["step"]) for update in progress if update["stage"] == "denoising"]
    assert [step for step in denoising if step[1] > 0] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert {update["stage"] for update in progress} <= set(lifecycle.STAGES)
    assert {"denoising", "encoding", "uploading"} <= {update["stage"] for update in progress}
    assert all(update["images"] == 2 and update["steps"] in (0, 3) for update in progress)


def test_a_failing_progress_function_never_fails_a_job(
    run_job: Callable[..., dict], progress: list[dict], monkeypatch: pytest.MonkeyPatch, baseline: str
) -> None:
    def broken(job: dict, update: dict) -> None:
        raise ConnectionError("the progress endpoint is down")

    monkeypatch.setattr(runpod.serverless, "progress_update", broken)
    assert run_job(BASELINE)["images"][0]["sha256"] == baseline


def test_progress_is_off_locally_and_on_at_runpod() -> None:
    assert Settings.from_env({}).progress_updates is False
    assert Settings.from_env({"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}).progress_updates
    assert Settings.from_env({"PROGRESS_UPDATES": "on"}).progress_updates is True
    assert Settings.from_env({"PROGRESS_UPDATES": "off", "RUNPOD_WEBHOOK_GET_JOB": "x"}).progress_updates is False


def test_what_loading_and_warm_up_made_is_frozen_out_of_each_jobs_collection(handler_module) -> None:
    # The session's worker warmed up at import; what loading made is frozen, out of each job's collection.
    assert gc.get_freeze_count() > 100_000


def test_what_outlives_a_job_in_numbers_is_frozen_and_a_jobs_own_leftovers_are_not(
    run_job: Callable[..., dict], baseline: str
) -> None:
    # As the SDK's loop and sessions, made after warm-up: many objects that live on.
    made_after_warm_up = [{"n": n} for n in range(2 * hygiene.LATE_LONG_LIVED)]
    assert run_job(BASELINE)["images"][0]["sha256"] == baseline
    frozen = gc.get_freeze_count()
    unfrozen = {id(thing) for thing in gc.get_objects()}
    assert not any(id(thing) in unfrozen for thing in made_after_warm_up)
    assert len(unfrozen) < hygiene.LATE_LONG_LIVED
    # A job alone leaves too few to freeze: nothing of it is kept from the collector.
    del unfrozen
    assert run_job(BASELINE)["images"][0]["sha256"] == baseline
    assert gc.get_freeze_count() == frozen


def test_a_failed_job_answers_only_once_its_uploads_ended(
    worker, tiny_models_dir: Path, interposer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every store request takes 1 s; image 2 fails to encode while image 1 is still uploading.
    front = interposer(delay_s=1.0)
    bucket = "late-uploads"
    store = boto3.client(
        "s3", endpoint_url=front.endpoint, aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1"
    )
    store.create_bucket(Bucket=bucket)
    env = {"BUCKET_NAME": bucket, "BUCKET_ENDPOINT_URL": front.endpoint}
    env.update(BUCKET_ACCESS_KEY_ID="x", BUCKET_SECRET_ACCESS_KEY="y")
    bucketed = Worker(
        Settings.from_env({"MODELS_DIR": str(tiny_models_dir), **env}),
        worker.manifest,
        worker.placement,
        worker.families,
    )
    encode = runtime._encode

    def failing_second(output, request, index, *rest):
        if index == 1:
            raise RuntimeError("the encoder broke")
        return encode(output, request, index, *rest)

    monkeypatch.setattr(runtime, "_encode", failing_second)
    requests_before = len(front.requests)
    result = bucketed.handle({"id": "late", "input": {**BASELINE, "num_images": 2, "thumbnail_size": 0}})
    assert result["error_code"] == "INTERNAL"
    answered = len(front.requests)
    # The upload of image 1 was running when the job failed: it landed before the answer, and nothing came after.
    assert answered > requests_before
    landed = [item["Key"] for item in store.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert landed == ["late/0.png"]
    time.sleep(1.5)
    assert len(front.requests) == answered + 1
