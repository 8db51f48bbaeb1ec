"""Results delivered end to end: every task's jobs through the worker with the BUCKET_* variables set, against a
real S3 server on loopback; a request's s3Config; a local folder; and what the response echoes of the request."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import test_inputs
from PIL import Image
from test_sdxl_family import PHOTO, as_base64, gradient
from test_storage import TYPES, fetch
from test_video import FAST as VIDEO

from diffusion_worker import inputs, runtime, storage
from diffusion_worker.config import Settings
from diffusion_worker.inputs import InputLimits
from diffusion_worker.pipelines.outputs import GeneratedImage
from diffusion_worker.pipelines.sdxl import SdxlFamily
from diffusion_worker.runtime import Worker, _echoed_parameters
from diffusion_worker.schema import parse_input

if TYPE_CHECKING:
    from s3_fixtures import S3Server

pytest_plugins = ("s3_fixtures",)
# An HTTPS server on loopback for input URLs, behind a resolver for its test host names, and a guard that fails a test
# connecting anywhere but loopback.
https_server, local, connections = test_inputs.https_server, test_inputs.local, test_inputs.connections
IMAGE = {"prompt": "a cottage", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 5}
JOBS = {
    "txt2img": {**IMAGE, "task": "txt2img", "num_images": 2, "output_format": "jpeg"},
    "img2img": {**IMAGE, "task": "img2img", "image": PHOTO, "output_format": "webp"},
    "controlnet_depth": {**IMAGE, "task": "controlnet_depth", "image": PHOTO, "return_control_image": True},
    "txt2video": VIDEO,
    "img2video": {**VIDEO, "task": "img2video", "image": PHOTO},
}


def worker_with(worker: Worker, tiny_models_dir: Path, **env: str) -> Worker:
    """The session's loaded pipelines behind settings read from these environment variables, as at a cold start."""
    settings = Settings.from_env({"MODELS_DIR": str(tiny_models_dir), **env})
    return Worker(settings, worker.manifest, worker.placement, worker.families)


def assets_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert "error" not in response, response
    found = [*response.get("images", []), *(response[kind] for kind in ("control_image", "video") if kind in response)]
    assert found
    return found


@pytest.mark.parametrize("task", JOBS)
def test_with_a_bucket_every_tasks_assets_thumbnails_and_metadata_land(
    task: str, worker: Worker, tiny_models_dir: Path, s3_server: S3Server
) -> None:
    bucket = s3_server.create_bucket("results")
    bucketed = worker_with(
        worker,
        tiny_models_dir,
        BUCKET_NAME=bucket,
        BUCKET_ENDPOINT_URL=s3_server.endpoint,
        BUCKET_ACCESS_KEY_ID=s3_server.access_key_id,
        BUCKET_SECRET_ACCESS_KEY=s3_server.secret_access_key,
        BUCKET_PREFIX="runs",
    )
    job_id = f"sync-{task}-u1"
    response = bucketed.handle({"id": job_id, "input": JOBS[task]})
    store = s3_server.client()
    for index, entry in enumerate(assets_of(response)):
        data, served_type = fetch(entry["url"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
        assert served_type == TYPES[entry["format"]]
        key = f"runs/{job_id}/{index}.{entry['format']}"
        assert store.head_object(Bucket=bucket, Key=key)["ContentType"] == TYPES[entry["format"]]
        thumbnail, thumbnail_type = fetch(entry["thumbnail_url"])
        assert thumbnail_type == "image/webp" and thumbnail.startswith(b"RIFF")
        assert f"runs/{job_id}/{index}.thumb.webp" in entry["thumbnail_url"]
    metadata, metadata_type = fetch(response["metadata_url"])
    assert metadata_type == "application/json"
    result = json.loads(metadata)
    assert (result["job_id"], result["seed"], result["parameters"]) == (job_id, 5, response["parameters"])
    assert [output["sha256"] for output in result["outputs"]] == [entry["sha256"] for entry in assets_of(response)]
    # What the store holds, read back object by object: result.json as stored, and every object it describes hashed
    # against it; nothing else in the job's folder but their thumbnails.
    stored = {
        item["Key"]: store.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in store.list_objects_v2(Bucket=bucket, Prefix=f"runs/{job_id}/")["Contents"]
    }
    assert json.loads(stored.pop(f"runs/{job_id}/result.json")) == result
    for index, output in enumerate(result["outputs"]):
        data = stored.pop(f"runs/{job_id}/{index}.{output['format']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (output["bytes"], output["sha256"])
        assert stored.pop(f"runs/{job_id}/{index}.thumb.webp").startswith(b"RIFF")
    assert stored == {}
    assert {"inference_s", "encode_s", "total_s"} <= result["timings"].keys()
    assert all(model["revision"] for model in result["models"])
    # Nothing about the bucket, and no secret, reaches the response beyond the links.
    assert s3_server.secret_access_key not in json.dumps(response)


@pytest.fixture
def private_endpoints(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's worker as if started with ALLOW_PRIVATE_S3CONFIG_ENDPOINTS=true: the tests' S3 server is moto
    on loopback, over http."""
    monkeypatch.setattr(worker, "settings", replace(worker.settings, allow_private_s3config_endpoints=True))


def test_a_requests_loopback_endpoint_is_refused_before_any_work(
    run_job: Callable[..., dict], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the operator's leave, a request can't send the worker to an internal address: INVALID_INPUT at once,
    before the GPU or the store is touched."""
    bucket = s3_server.create_bucket("not-for-requests")
    generated: list[object] = []
    monkeypatch.setattr(SdxlFamily, "generate", lambda *args: generated.append(args))
    https_loopback = s3_server.endpoint.replace("http://", "https://")
    for endpoint in (s3_server.endpoint, https_loopback):
        s3_config = {
            "accessId": s3_server.access_key_id,
            "accessSecret": s3_server.secret_access_key,
            "bucketName": bucket,
            "endpointUrl": endpoint,
        }
        refused = run_job(IMAGE, job_id="job-internal", s3Config=s3_config)
        assert (refused["error_code"], refused["retryable"]) == ("INVALID_INPUT", False)
        assert refused["error"].startswith("INVALID_INPUT: s3Config.endpointUrl: ")
    assert "https:// URL" in run_job(IMAGE, s3Config={"bucketName": bucket, "endpointUrl": s3_server.endpoint})["error"]
    assert generated == []
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", []) == []


@pytest.mark.usefixtures("private_endpoints")
def test_a_requests_s3config_sends_its_results_to_its_own_bucket(
    run_job: Callable[..., dict], s3_server: S3Server
) -> None:
    bucket = s3_server.create_bucket("theirs")
    s3_config = {
        "accessId": s3_server.access_key_id,
        "accessSecret": s3_server.secret_access_key,
        "bucketName": bucket,
        "endpointUrl": s3_server.endpoint,
    }
    response = run_job(JOBS["txt2img"], job_id="job-theirs", s3Config=s3_config)
    [first, second] = assets_of(response)
    assert fetch(second["url"])[0] != fetch(first["url"])[0]
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        "job-theirs/0.jpeg",
        "job-theirs/0.thumb.webp",
        "job-theirs/1.jpeg",
        "job-theirs/1.thumb.webp",
        "job-theirs/result.json",
    ]
    assert s3_server.secret_access_key not in json.dumps(response)


@pytest.mark.usefixtures("private_endpoints")
def test_an_upload_that_fails_is_retryable_and_the_next_job_is_delivered(
    run_job: Callable[..., dict], s3_server: S3Server
) -> None:
    s3_config = {
        "accessId": s3_server.access_key_id,
        "accessSecret": s3_server.secret_access_key,
        "bucketName": "never-created",
        "endpointUrl": s3_server.endpoint,
    }
    failed = run_job(IMAGE, job_id="job-lost", s3Config=s3_config)
    assert (failed["error_code"], failed["retryable"]) == ("UPLOAD_FAILED", True)
    assert "NoSuchBucket" in failed["error"] and "images" not in failed
    assert "data" in assets_of(run_job(IMAGE))[0]


def test_with_an_output_dir_results_are_files_and_the_response_gives_their_paths(
    worker: Worker, tiny_models_dir: Path, tmp_path: Path
) -> None:
    local = worker_with(worker, tiny_models_dir, OUTPUT_DIR=str(tmp_path))
    response = local.handle({"id": "local_test", "input": JOBS["controlnet_depth"]})
    folder = tmp_path / "local_test"
    for index, entry in enumerate(assets_of(response)):
        path = Path(entry["path"])
        assert path == folder / f"{index}.{entry['format']}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert Path(entry["thumbnail_path"]) == folder / f"{index}.thumb.webp"
    assert json.loads(Path(response["metadata_path"]).read_text())["outputs"][1]["kind"] == "control_image"


def test_a_blank_image_is_a_failed_decode_and_nothing_is_delivered(
    run_job: Callable[..., dict], worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VAE that overflowed decodes to black: the job fails with INTERNAL instead of delivering it, even when the
    image before it was fine."""
    family = worker.families["txt2img"]

    def second_black(*args: object, **kwargs: object) -> Iterator[GeneratedImage]:
        yield GeneratedImage(image=gradient(64, 64), seed=5)
        yield GeneratedImage(image=Image.new("RGB", (64, 64)), seed=6)

    monkeypatch.setattr(family, "generate", second_black)
    result = run_job({**IMAGE, "num_images": 2})
    assert (result["error_code"], result["retryable"]) == ("INTERNAL", True)
    assert "image 1 is uniformly black" in result["error"] and "images" not in result


def slowed(function: Callable[..., Any], seconds: float, finished: list[float] | None = None) -> Callable[..., Any]:
    """`function`, taking `seconds` longer, noting when each call ended."""

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        try:
            return function(*args, **kwargs)
        finally:
            if finished is not None:
                finished.append(time.monotonic())

    return slow


def test_a_thumbnail_is_uploaded_while_its_image_is_still_encoding(
    worker: Worker, tiny_models_dir: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.create_bucket("thumbnail-first")
    bucketed = worker_with(worker, tiny_models_dir, **s3_server.worker_env(bucket))
    encoded: list[float] = []
    monkeypatch.setattr(runtime, "encode_image", slowed(runtime.encode_image, 1.0, encoded))
    uploaded: dict[str, float] = {}
    upload = storage.S3Sink._upload

    def timed_upload(sink: storage.S3Sink, key: str, *args: Any) -> Any:
        try:
            return upload(sink, key, *args)
        finally:
            uploaded[key.rsplit("/", 1)[1]] = time.monotonic()

    monkeypatch.setattr(storage.S3Sink, "_upload", timed_upload)
    response = bucketed.handle({"id": "thumbnail-first", "input": IMAGE})
    assert fetch(response["images"][0]["thumbnail_url"])[1] == "image/webp"
    assert uploaded["0.thumb.webp"] < encoded[0] < uploaded["0.png"] < uploaded["result.json"]


def test_a_job_that_fails_while_its_thumbnail_is_made_never_delivers_the_thumbnail(
    worker: Worker, tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = worker_with(worker, tiny_models_dir, OUTPUT_DIR=str(tmp_path))
    monkeypatch.setattr(runtime, "encode_thumbnail", slowed(runtime.encode_thumbnail, 1.0))

    def broken(*args: object) -> None:
        raise OSError("the encoder broke")

    monkeypatch.setattr(runtime, "encode_image", broken)
    response = folder.handle({"id": "failed-early", "input": IMAGE})
    assert response["error_code"] == "INTERNAL"
    # The thumbnail was still being made when the job answered; it ended since, and was not delivered.
    time.sleep(1.5)
    assert not (tmp_path / "failed-early").exists()


def test_input_images_are_echoed_by_digest_or_by_url_without_its_query(run_job: Callable[..., dict]) -> None:
    response = run_job(JOBS["img2img"])
    assert response["parameters"]["image"] == "sha256:" + hashlib.sha256(PHOTO.encode()).hexdigest()
    assert PHOTO not in json.dumps(response)
    for url in (
        "https://cdn.example.test/in/cat.png?X-Amz-Signature=abc#x",
        "https://user:pa%40ss@cdn.example.test/in/cat.png",
        "https://token@cdn.example.test/in/cat.png#frag",
    ):
        echoed = _echoed_parameters(parse_input({**JOBS["img2img"], "image": url}))["image"]
        assert echoed == "https://cdn.example.test/in/cat.png"
    port = _echoed_parameters(parse_input({**JOBS["img2img"], "image": "https://u:p@cdn.example.test:8443/a.png?s"}))
    assert port["image"] == "https://cdn.example.test:8443/a.png"


# --- secrets -----------------------------------------------------------------------------------------------------

PASSWORD = "url-password-not-for-logs"
SIGNATURE = "url-signature-not-for-logs"
# An inline image no other test sends, so that any trace of it here is this test's.
INLINE = as_base64(gradient(72, 56).transpose(Image.Transpose.FLIP_LEFT_RIGHT))


@pytest.fixture
def fetching_worker(
    worker: Worker, local: test_inputs.Local, monkeypatch: pytest.MonkeyPatch
) -> Iterator[test_inputs.Local]:
    """The session's worker as if started with private input URLs and s3Config endpoints allowed (the test servers
    are on loopback), trusting the test CA for input URLs."""
    settings = replace(worker.settings, allow_private_urls=True, allow_private_s3config_endpoints=True)
    monkeypatch.setattr(worker, "settings", settings)
    monkeypatch.setattr(worker, "input_limits", InputLimits.from_settings(settings))
    monkeypatch.setattr(inputs, "_default_context", lambda: local.context)
    yield local


def test_no_secret_reaches_the_log_the_response_or_result_json(
    run_job: Callable[..., dict],
    s3_server: S3Server,
    fetching_worker: test_inputs.Local,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG, every logger (botocore's too): an s3Config secret, a password and a signature in an input URL, and
    an inline input image appear nowhere a user or an operator could read them."""
    customer = s3_server.add_user("secrets")
    bucket = customer.create_bucket("secrets-results")
    # From here on: the user's creation above answers with its secret, at DEBUG.
    caplog.set_level(logging.DEBUG)
    s3_config = {
        "accessId": customer.access_key_id,
        "accessSecret": customer.secret_access_key,
        "bucketName": bucket,
        "endpointUrl": customer.endpoint,
    }
    url = fetching_worker.url(f"/image.png?X-Amz-Signature={SIGNATURE}#{SIGNATURE}").replace(
        "https://", f"https://alice:{PASSWORD}@"
    )
    jobs = {
        "url": {**JOBS["img2img"], "image": url},
        "inline": {**JOBS["controlnet_depth"], "image": INLINE},
        "failed fetch": {**JOBS["img2img"], "image": url.replace("/image.png", "/missing")},
        "failed decode": {**JOBS["img2img"], "image": INLINE[:40] + "!"},
    }
    responses = {
        name: run_job(job, job_id=f"secrets-{index}", s3Config=s3_config)
        for index, (name, job) in enumerate(jobs.items())
    }
    assert "error" not in responses["url"] and "error" not in responses["inline"], responses
    assert responses["url"]["parameters"]["image"] == fetching_worker.url("/image.png")
    assert responses["inline"]["parameters"]["image"] == "sha256:" + hashlib.sha256(INLINE.encode()).hexdigest()
    assert responses["failed fetch"]["error_code"] == "INPUT_FETCH_FAILED"
    assert responses["failed decode"]["error_code"] == "INVALID_INPUT"
    stored = [
        customer.client().get_object(Bucket=bucket, Key=f"secrets-{index}/result.json")["Body"].read().decode()
        for index in (0, 1)
    ]
    assert json.loads(stored[0])["parameters"] == responses["url"]["parameters"]
    # The log did see the jobs: botocore's requests and the fetch of the input.
    assert "botocore" in {record.name.split(".")[0] for record in caplog.records}
    assert "images.test" in caplog.text
    for secret in (customer.secret_access_key, PASSWORD, SIGNATURE, INLINE, INLINE[100:140]):
        for where, text in {
            "log": caplog.text,
            "responses": json.dumps(responses),
            "result.json": "".join(stored),
        }.items():
            assert secret[:40] not in text, (where, secret[:40])
