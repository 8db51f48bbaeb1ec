"""SDXL text-to-image through the real handler on tiny models: the contract's response, determinism, errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import Callable

import pytest
from PIL import Image

from diffusion_worker.schema import MAX_SEED, SCHEDULER_NAMES

FAST = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "width": 64, "height": 64}


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    header, payload = uri.split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64")
    return header[5:-7], base64.b64decode(payload)


def test_txt2img_returns_the_contract_response(run_job: Callable[..., dict]) -> None:
    result = run_job({**FAST, "seed": 7, "num_images": 2, "output_format": "jpeg", "output_quality": 80})
    assert "error" not in result, result
    assert result["seed"] == 7
    assert [image["seed"] for image in result["images"]] == [7, 8]
    for image in result["images"]:
        mime, data = decode_data_uri(image["data"])
        assert mime == "image/jpeg"
        assert image["bytes"] == len(data)
        assert image["sha256"] == hashlib.sha256(data).hexdigest()
        assert (image["width"], image["height"], image["format"]) == (64, 64, "jpeg")
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        thumb_mime, thumb = decode_data_uri(image["thumbnail_data"])
        assert thumb_mime == "image/webp"
        assert Image.open(io.BytesIO(thumb)).format == "WEBP"
    parameters = result["parameters"]
    assert parameters["scheduler"] == "euler" and parameters["guidance_scale"] == 5.0
    assert parameters["num_inference_steps"] == 2 and parameters["seed"] == 7
    assert set(result["timings"]) == {"inference_s", "encode_s", "upload_s", "total_s"}
    assert result["timings"]["total_s"] >= result["timings"]["inference_s"] > 0


def test_defaults_resolve_to_the_model_and_a_random_32_bit_seed(run_job: Callable[..., dict]) -> None:
    result = run_job({"prompt": "a lighthouse", "num_inference_steps": 1, "thumbnail_size": 0})
    assert 0 <= result["seed"] <= MAX_SEED
    # The tiny UNet's sample size (32) times the VAE's ×8: the real SDXL resolves to 1024 the same way.
    assert (result["parameters"]["width"], result["parameters"]["height"]) == (256, 256)
    assert "thumbnail_data" not in result["images"][0]


def test_same_input_and_seed_give_the_same_bytes(run_job: Callable[..., dict]) -> None:
    first = run_job({**FAST, "seed": 123})
    run_job({**FAST, "seed": 5, "scheduler": "dpmpp_2m_karras", "width": 128})
    again = run_job({**FAST, "seed": 123})
    assert first["images"][0]["sha256"] == again["images"][0]["sha256"]
    assert first["images"][0]["data"] == again["images"][0]["data"]


def test_different_seeds_give_different_images(run_job: Callable[..., dict]) -> None:
    one = run_job({**FAST, "seed": 1})["images"][0]["sha256"]
    two = run_job({**FAST, "seed": 2})["images"][0]["sha256"]
    assert one != two


def test_image_k_equals_a_one_image_job_with_seed_plus_k(run_job: Callable[..., dict]) -> None:
    batch = run_job({**FAST, "seed": 40, "num_images": 3})["images"]
    single = run_job({**FAST, "seed": 42})["images"][0]
    assert batch[2]["sha256"] == single["sha256"]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs(run_job: Callable[..., dict], scheduler: str) -> None:
    result = run_job({**FAST, "seed": 3, "scheduler": scheduler, "num_inference_steps": 3})
    assert "error" not in result, result
    assert result["parameters"]["scheduler"] == scheduler


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_output_formats(run_job: Callable[..., dict], output_format: str) -> None:
    image = run_job({**FAST, "seed": 3, "output_format": output_format})["images"][0]
    mime, data = decode_data_uri(image["data"])
    assert mime == f"image/{output_format}"
    assert Image.open(io.BytesIO(data)).format == output_format.upper()


def test_bad_input_is_a_clear_error_and_the_worker_goes_on(run_job: Callable[..., dict]) -> None:
    result = run_job({**FAST, "width": 100})
    assert result == {
        "error": "INVALID_INPUT: width: must be a multiple of 8 from 64 to 2048 (got 100)",
        "error_code": "INVALID_INPUT",
        "retryable": False,
    }
    assert "error" not in run_job({**FAST, "seed": 1})


@pytest.mark.parametrize(
    "job",
    [{"id": "x"}, {"id": "x", "input": None}, {"id": "x", "input": "a cat"}, {"id": "x", "input": []}],
)
def test_a_job_without_an_input_object_is_refused(handler_module, job: dict) -> None:
    result = asyncio.run(handler_module.handler(job))
    assert result["error_code"] == "INVALID_INPUT"
    assert result["error"].startswith("INVALID_INPUT: input: ")


def test_an_unexpected_exception_is_internal_without_a_traceback(run_job, worker, monkeypatch, caplog) -> None:
    family = worker.families["txt2img"]

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom inside the pipeline")

    monkeypatch.setattr(family, "generate", explode)
    result = run_job({**FAST, "seed": 1})
    assert result == {
        "error": "INTERNAL: unexpected error; the worker log has the details",
        "error_code": "INTERNAL",
        "retryable": True,
    }
    assert "boom inside the pipeline" in caplog.text
    assert "Traceback" in caplog.text
