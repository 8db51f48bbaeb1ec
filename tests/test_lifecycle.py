"""A job's lifecycle through the real async handler: deadlines stop it within one step, with nothing decoded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

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
