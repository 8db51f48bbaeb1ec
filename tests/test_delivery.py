"""Results delivered end to end: every task's jobs through the worker with the BUCKET_* variables set, against a
real S3 server on loopback; a request's s3Config; a local folder; and what the response echoes of the request."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_sdxl_family import PHOTO
from test_storage import TYPES, fetch
from test_video import FAST as VIDEO

from diffusion_worker.config import Settings
from diffusion_worker.runtime import Worker, _echoed_parameters
from diffusion_worker.schema import parse_input

if TYPE_CHECKING:
    from s3_fixtures import S3Server

pytest_plugins = ("s3_fixtures",)
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
    assert {"inference_s", "encode_s", "total_s"} <= result["timings"].keys()
    assert all(model["revision"] for model in result["models"])
    # Nothing about the bucket, and no secret, reaches the response beyond the links.
    assert s3_server.secret_access_key not in json.dumps(response)


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


def test_input_images_are_echoed_by_digest_or_by_url_without_its_query(run_job: Callable[..., dict]) -> None:
    response = run_job(JOBS["img2img"])
    assert response["parameters"]["image"] == "sha256:" + hashlib.sha256(PHOTO.encode()).hexdigest()
    assert PHOTO not in json.dumps(response)
    signed = parse_input({**JOBS["img2img"], "image": "https://cdn.example.test/in/cat.png?X-Amz-Signature=abc#x"})
    assert _echoed_parameters(signed)["image"] == "https://cdn.example.test/in/cat.png"
