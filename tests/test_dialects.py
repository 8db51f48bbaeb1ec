"""REQUEST_DIALECT=worker-sdxl: worker-sdxl's requests mapped onto the native contract, and its response shape,
as a pure mapping and end to end through the RunPod SDK's local API server, inline and to a bucket."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import requests
from PIL import Image
from s3_fixtures import presign_gate, s3_server  # noqa: F401  (fixtures)
from test_sdxl_family import PHOTO

from diffusion_worker.dialects import DIALECTS, WORKER_SDXL_SCHEDULERS
from diffusion_worker.errors import InvalidInput
from diffusion_worker.schema import SCHEDULER_NAMES, parse_input

WORKER_SDXL = DIALECTS["worker-sdxl"]
# What worker-sdxl's README shows its clients sending, made small: its fields only, nulls included.
REQUEST = {
    "prompt": "a lighthouse",
    "negative_prompt": None,
    "height": 64,
    "width": 64,
    "num_inference_steps": 4,
    "refiner_inference_steps": 4,
    "guidance_scale": 7.5,
    "strength": 0.3,
    "seed": 11,
    "scheduler": "K_EULER",
    "num_images": 2,
    "high_noise_frac": None,
}


def read(raw: dict, has_refiner: bool = True) -> dict:
    native = WORKER_SDXL.read(raw, has_refiner)
    parse_input(native)  # every mapped request is one the native contract accepts
    return native


def test_every_worker_sdxl_scheduler_maps_to_one_of_ours() -> None:
    assert set(WORKER_SDXL_SCHEDULERS.values()) <= set(SCHEDULER_NAMES)
    for name, ours in WORKER_SDXL_SCHEDULERS.items():
        assert read({"prompt": "x", "scheduler": name})["scheduler"] == ours
    assert WORKER_SDXL_SCHEDULERS["DPMSolverSinglestep"] == "dpmpp_2m"


def test_a_text_request_runs_the_base_then_the_refiner_from_1_minus_strength() -> None:
    assert read(REQUEST) == {
        "task": "txt2img",
        "prompt": "a lighthouse",
        "height": 64,
        "width": 64,
        "seed": 11,
        "guidance_scale": 7.5,
        "num_images": 2,
        "scheduler": "euler",
        "num_inference_steps": 4,
        "output_format": "png",
        "thumbnail_size": 0,
        "refiner": True,
        "high_noise_frac": 0.7,
        "refiner_inference_steps": 4,
    }
    assert read({**REQUEST, "high_noise_frac": 0.9})["high_noise_frac"] == 0.9
    # Without a refiner on the worker: the base alone, as native txt2img.
    alone = read(REQUEST, has_refiner=False)
    assert alone["task"] == "txt2img" and "refiner" not in alone and "high_noise_frac" not in alone


def test_worker_sdxl_defaults_apply_where_the_client_sends_nothing() -> None:
    native = read({"prompt": "x"})
    assert (native["scheduler"], native["num_inference_steps"], native["guidance_scale"]) == ("ddim", 25, 7.5)
    assert (native["high_noise_frac"], native["refiner_inference_steps"]) == (0.7, 50)
    assert "seed" not in native and "width" not in native


def test_an_image_url_is_refined_on_the_refiner_or_else_the_base() -> None:
    request = {**REQUEST, "image_url": "https://example.com/photo.png", "strength": 0.5}
    native = read(request)
    assert (native["task"], native["image"], native["strength"], native["refiner"]) == (
        "img2img",
        "https://example.com/photo.png",
        0.5,
        True,
    )
    assert native["num_inference_steps"] == REQUEST["refiner_inference_steps"]
    assert "refiner" not in read(request, has_refiner=False)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"prompt": "x", "lora": "y", "task": "info"}, "lora: unknown field, not part of worker-sdxl's request"),
        ({"prompt": "x", "scheduler": "euler"}, "scheduler: must be one of PNDM, KLMS, DDIM, K_EULER,"),
        ({"prompt": "x", "strength": 0.8}, "strength: must be above 0 and at most 0.5 without `high_noise_frac`"),
    ],
)
def test_what_worker_sdxl_does_not_send_is_refused(raw: dict, error: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        WORKER_SDXL.read(raw, True)
    assert caught.value.message.startswith(error)


def test_the_native_limits_still_apply() -> None:
    with pytest.raises(InvalidInput, match="num_images: Input should be less than or equal to 8"):
        parse_input(WORKER_SDXL.read({"prompt": "x", "num_images": 9}, True))


def test_the_response_takes_worker_sdxls_shape() -> None:
    native = {"images": [{"url": "https://a/0.png", "sha256": "x"}, {"url": "https://a/1.png"}], "seed": 3}
    assert WORKER_SDXL.answer(native) == {
        "images": ["https://a/0.png", "https://a/1.png"],
        "image_url": "https://a/0.png",
        "seed": 3,
    }
    inline = WORKER_SDXL.answer({"images": [{"data": "data:image/png;base64,AA=="}], "seed": 4})
    assert inline["image_url"] == "data:image/png;base64,AA=="
    error = {"error": "INVALID_INPUT: width: ...", "error_code": "INVALID_INPUT", "retryable": False}
    assert WORKER_SDXL.answer(error) == {"error": "INVALID_INPUT: width: ..."}


# --- end to end ----------------------------------------------------------------------------------------------------

SERVED = {"REQUEST_DIALECT": "worker-sdxl", "WORKER_TASKS": "txt2img,img2img"}


def runsync(server: str, job_input: dict) -> dict:
    return requests.post(f"{server}/runsync", json={"input": job_input}, timeout=300).json()


def png_of(data_uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_uri.removeprefix(prefix))))


@pytest.fixture(scope="module")
def inline_server(serve_api: Callable[..., AbstractContextManager[str]]) -> Iterator[str]:
    with serve_api(**SERVED) as server:
        yield server


def test_drop_in_mode_answers_inline_with_data_uris(inline_server: str) -> None:
    answer = runsync(inline_server, REQUEST)
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert set(output) == {"images", "image_url", "seed"} and output["seed"] == 11
    assert len(output["images"]) == 2 and output["image_url"] == output["images"][0]
    assert png_of(output["image_url"]).size == (64, 64)
    # The same seed, the same bytes; an image_url request runs too (an inline image, as the native contract takes).
    assert runsync(inline_server, REQUEST)["output"] == output
    refined = runsync(inline_server, {**REQUEST, "image_url": PHOTO, "strength": 0.5, "num_images": 1})
    assert refined["status"] == "COMPLETED", refined
    assert png_of(refined["output"]["image_url"]).size == (64, 64)


def test_drop_in_mode_fails_in_worker_sdxls_error_shape(inline_server: str) -> None:
    answer = runsync(inline_server, {**REQUEST, "sampler": "x"})
    assert answer["status"] == "FAILED"
    assert answer["error"] == "INVALID_INPUT: sampler: unknown field, not part of worker-sdxl's request"
    native = runsync(inline_server, {"task": "txt2img", "prompt": "x"})
    assert native["status"] == "FAILED" and "task: unknown field" in native["error"]


def test_drop_in_mode_answers_with_links_to_the_bucket(
    serve_api: Callable[..., AbstractContextManager[str]],
    s3_server,  # noqa: F811
) -> None:
    with serve_api(**SERVED, **s3_server.worker_env(s3_server.create_bucket("drop-in"))) as server:
        answer = runsync(server, REQUEST)
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["image_url"] == output["images"][0] and len(output["images"]) == 2
    for url in output["images"]:
        fetched = requests.get(url, timeout=30)
        assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
