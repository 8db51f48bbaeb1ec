"""Delivery against a real S3 server over HTTP on loopback (moto in server mode), and inline data URIs."""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import test_inputs
from test_inputs import fake_resolver

from diffusion_worker import storage
from diffusion_worker.config import BucketSettings
from diffusion_worker.errors import InvalidInput, ResultTooLarge, UploadFailed
from diffusion_worker.storage import Asset, Sink, bucket_for_job, open_sink

if TYPE_CHECKING:
    # Only for annotations: pytest imports the module itself, as a plugin, so that its asserts are rewritten.
    from s3_fixtures import PresignGate, S3Server

# Every file starts with it, so a log that printed any file's bytes or base64 would show it. 18 bytes: its base64
# is the same whatever follows.
MARKER = b"PIXELS-NOT-FOR-LOG"
METADATA = {
    "job_id": "placeholder",
    "seed": 42,
    "parameters": {"prompt": "a lighthouse at dusk", "num_inference_steps": 4},
    "models": [{"role": "sdxl", "id": "tiny/sdxl", "revision": "0123abc"}],
    "outputs": [{"kind": "image", "seed": 42}],
}
# The fixtures: moto on loopback, and servers that stop, stay silent, throttle or answer slowly.
pytest_plugins = ("s3_fixtures",)
# A fixture that fails a test, before any packet is sent, if it connects anywhere but loopback.
connections = test_inputs.connections
TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}


def asset(ext: str, size: int = 2000, seed: int = 0) -> Asset:
    return Asset(MARKER + random.Random(seed).randbytes(size), ext, TYPES[ext])


def put(sink: Sink, index: int, file: Asset, thumbnail: Asset | None) -> None:
    sink.put(index, file)
    if thumbnail is not None:
        sink.put_thumbnail(index, thumbnail)


def deliver(sink: Sink, results: list[tuple[Asset, Asset | None]]) -> list[dict[str, str]]:
    """What the runtime does with a sink: put each result as it is made, finish, and always close."""
    try:
        for index, (file, thumbnail) in enumerate(results):
            put(sink, index, file, thumbnail)
        return sink.finish(METADATA)
    finally:
        sink.close()


def fetch(url: str) -> tuple[bytes, str]:
    """A GET with no credentials at all, as a browser following the link would make."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(), response.headers["Content-Type"]


def objects(server: S3Server, bucket: str, prefix: str) -> dict[str, tuple[bytes, str]]:
    client = server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    found = {}
    for item in listed:
        stored = client.get_object(Bucket=bucket, Key=item["Key"])
        found[item["Key"]] = (stored["Body"].read(), stored["ContentType"])
    return found


@pytest.fixture(autouse=True)
def watched(caplog: pytest.LogCaptureFixture, s3_server: S3Server) -> Iterator[list[str]]:
    """Captures every log record at DEBUG, botocore's included, and checks after each test that no secret a test
    used (add them to the list) and no file's bytes appear in any of them."""
    caplog.set_level(logging.DEBUG)
    secrets = [s3_server.secret_access_key]
    yield secrets
    text = caplog.text
    for secret in secrets:
        assert secret not in text
    assert MARKER.decode() not in text
    assert base64.b64encode(MARKER).decode() not in text


def test_results_land_with_their_keys_bytes_and_types(s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    bucket = s3_server.bucket(s3_server.create_bucket("results-main"), prefix="renders")
    results = [
        (asset("png", seed=1), asset("webp", 300, seed=2)),
        (asset("jpeg", seed=3), asset("webp", 300, seed=4)),
        (asset("webp", seed=5), None),
    ]
    sink = open_sink(bucket, "sync-3f2a9c-u1", 1024)
    delivered = deliver(sink, results)

    folder = "renders/sync-3f2a9c-u1"
    expected = {
        f"{folder}/0.png": results[0][0],
        f"{folder}/0.thumb.webp": results[0][1],
        f"{folder}/1.jpeg": results[1][0],
        f"{folder}/1.thumb.webp": results[1][1],
        f"{folder}/2.webp": results[2][0],
    }
    stored = objects(s3_server, bucket.name, folder + "/")
    assert set(stored) == {*expected, f"{folder}/result.json"}
    for key, file in expected.items():
        assert stored[key] == (file.data, file.mime)
    body, content_type = stored[f"{folder}/result.json"]
    assert (json.loads(body), content_type) == (METADATA, "application/json")

    assert [set(entry) for entry in delivered] == [{"url", "thumbnail_url"}, {"url", "thumbnail_url"}, {"url"}]
    links = [
        (entry[name], file)
        for entry, pair in zip(delivered, results, strict=True)
        for name, file in zip(("url", "thumbnail_url"), pair, strict=True)
        if file is not None
    ]
    assert len(links) == 5
    for url, file in links:
        assert fetch(url) == (file.data, file.mime)
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Expires"] == [str(bucket.presign_expires_s)]
        assert query["X-Amz-Credential"][0].startswith(f"{s3_server.access_key_id}/")
    assert json.loads(fetch(sink.result_json["metadata_url"])[0]) == METADATA
    # The links open because they are signed, not because the objects are public.
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(f"{s3_server.endpoint}/{bucket.name}/{folder}/0.png")
    assert refused.value.code == 403

    lines = [record for record in caplog.records if record.name == "diffusion_worker.storage"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert "6 objects" in lines[0].getMessage()
    assert str(sum(len(file.data) for file in expected.values()) + len(body)) in lines[0].getMessage()


def test_the_gate_signs_as_aws_documents() -> None:
    """AWS's own example of a presigned GET (sigv4-query-string-auth): the gate computes its signature."""
    from s3_fixtures import presigned_signature

    query = (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2F"
        "aws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
    )
    signature = presigned_signature(
        "GET", "examplebucket.s3.amazonaws.com", "/test.txt", query, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    )
    assert signature == "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"


def refusal_of(url: str) -> str:
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(url)
    assert refused.value.code == 403
    return refused.value.read().decode()


def test_presigned_links_open_only_when_signed_for_the_stores_region_key_and_time(
    s3_server: S3Server, presign_gate: PresignGate
) -> None:
    name = s3_server.create_bucket("results-signed")
    file = asset("png", seed=21)
    jobs = iter(range(10))

    def link(**changes: Any) -> str:
        sink = open_sink(s3_server.bucket(name, **changes), f"job-signed-{next(jobs)}", 1024)
        return deliver(sink, [(file, None)])[0]["url"]

    good = link(presign_expires_s=60)
    assert fetch(good) == (file.data, file.mime)
    # Signed for another region than the store's: S3 names the one it expects.
    wrong_region = refusal_of(link(region="eu-west-1"))
    assert "AuthorizationQueryParametersError" in wrong_region and "'eu-west-1' is wrong" in wrong_region
    # Signed with a secret that is not the key's.
    assert "SignatureDoesNotMatch" in refusal_of(link(secret_access_key="not-the-secret"))
    # The signature covers the path: it opens no other object.
    assert "SignatureDoesNotMatch" in refusal_of(good.replace("/0.png?", "/result.json?"))
    # Past its expiry by the store's clock.
    presign_gate.clock_offset_s = 61
    try:
        assert "Request has expired" in refusal_of(good)
    finally:
        presign_gate.clock_offset_s = 0
    assert fetch(good) == (file.data, file.mime)


def test_public_base_gives_plain_links_under_it(s3_server: S3Server) -> None:
    bucket = s3_server.bucket(
        s3_server.create_bucket("results-public"), prefix="out", public_url="https://cdn.example.test/media"
    )
    sink = open_sink(bucket, "job-7", 1024)
    delivered = deliver(sink, [(asset("png"), asset("webp", 100))])
    assert delivered == [
        {
            "url": "https://cdn.example.test/media/out/job-7/0.png",
            "thumbnail_url": "https://cdn.example.test/media/out/job-7/0.thumb.webp",
        }
    ]
    assert sink.result_json["metadata_url"] == "https://cdn.example.test/media/out/job-7/result.json"
    assert set(objects(s3_server, bucket.name, "out/job-7/")) == {
        "out/job-7/0.png",
        "out/job-7/0.thumb.webp",
        "out/job-7/result.json",
    }


def test_s3config_overrides_the_environment_for_one_job(s3_server: S3Server, watched: list[str]) -> None:
    customer = s3_server.add_user("customer")
    watched.append(customer.secret_access_key)
    customer.create_bucket("customer-results")
    default = s3_server.bucket(
        s3_server.create_bucket("results-default"), prefix="renders", public_url="https://cdn.example.test"
    )
    s3_config = {
        "accessId": customer.access_key_id,
        "accessSecret": customer.secret_access_key,
        "bucketName": "customer-results",
        "endpointUrl": customer.endpoint + "/",
    }
    # moto listens on loopback over http: only a worker that allows private endpoints takes it.
    with pytest.raises(InvalidInput, match=r"^s3Config\.endpointUrl: must be an https:// URL"):
        bucket_for_job(default, s3_config)
    bucket = bucket_for_job(default, s3_config, allow_private_endpoints=True)
    assert bucket is not None
    assert (bucket.name, bucket.endpoint_url, bucket.access_key_id) == (
        "customer-results",
        customer.endpoint,
        customer.access_key_id,
    )
    # The prefix and public base belong to the environment's bucket; the transport settings stay.
    assert (bucket.prefix, bucket.public_url, bucket.read_timeout_s) == ("", None, default.read_timeout_s)
    assert customer.secret_access_key not in repr(bucket)

    file = asset("png", seed=9)
    delivered = deliver(open_sink(bucket, "job-override", 1024), [(file, None)])
    assert objects(customer, "customer-results", "job-override/")["job-override/0.png"] == (file.data, file.mime)
    assert objects(s3_server, default.name, "") == {}
    assert fetch(delivered[0]["url"]) == (file.data, file.mime)
    assert parse_qs(urlsplit(delivered[0]["url"]).query)["X-Amz-Credential"][0].startswith(customer.access_key_id)
    assert customer.secret_access_key not in json.dumps(delivered)
    assert bucket_for_job(default, None) is default


SECRET = "TOPSECRET-s3config-value"


@pytest.mark.parametrize(
    ("s3_config", "field"),
    [
        ("not an object", "s3Config:"),
        ({"accessId": "AKIA1", "accessSecret": SECRET, "bucketName": "results", "region": "x"}, "s3Config.region"),
        ({"accessId": "AKIA1", "accessSecret": 42, "bucketName": "results"}, "s3Config.accessSecret"),
        ({"accessId": "AKIA1", "accessSecret": SECRET, "bucketName": ""}, "s3Config.bucketName"),
        ({"accessSecret": SECRET, "bucketName": "results"}, "s3Config.accessId, s3Config.accessSecret"),
        ({"accessId": "AKIA1", "accessSecret": SECRET, "bucketName": "a/b"}, "s3Config.bucketName"),
        ({"accessId": "AKIA1", "accessSecret": SECRET, "endpointUrl": "file:///etc/x"}, "s3Config.endpointUrl"),
    ],
)
def test_bad_s3config_is_invalid_input_naming_the_field_not_the_value(s3_config: object, field: str) -> None:
    default = BucketSettings(endpoint_url=None, access_key_id="AKIA0", secret_access_key="env", name="results")
    with pytest.raises(InvalidInput) as refused:
        bucket_for_job(default, s3_config)
    assert refused.value.message.startswith(field)
    assert SECRET not in json.dumps(refused.value.to_response())


ENDPOINT_CONFIG = {"accessId": "AKIA1", "accessSecret": SECRET, "bucketName": "results"}
# Test hosts and what they resolve to here (fake_resolver: numeric lookups only, no DNS).
ENDPOINT_HOSTS = {
    "s3.example.test": ["93.184.216.34", "2606:2800:220:1::1"],
    "internal.example.test": ["10.1.2.3"],
    # One public address and one that is not: either could be the one botocore connects to.
    "rebinding.example.test": ["93.184.216.34", "169.254.169.254"],
    "metadata.example.test": ["169.254.169.254"],
}


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("http://s3.example.test", "must be an https:// URL"),
        ("ftp://s3.example.test", "must be an https:// URL"),
        ("https://exa mple.test", "not a valid URL"),
        ("https://s3.example.test\n.evil", "not a valid URL"),
        ("https://", "not a valid URL"),
        ("s3.example.test", "not a valid URL"),
        ("https://s3.example.test:99999", "the port must be a number from 0 to 65535"),
        ("https://user:pw@s3.example.test", "credentials go in accessId and accessSecret"),
        (
            "https://127.0.0.1:9000",
            "127.0.0.1 is at 127.0.0.1, a loopback address; only public addresses are written to",
        ),
        ("https://[::1]:9000", "a loopback address"),
        ("https://169.254.169.254", "a link-local address"),
        ("https://metadata.example.test", "metadata.example.test is at 169.254.169.254, a link-local address"),
        ("https://internal.example.test:8080/", "internal.example.test is at 10.1.2.3, a private address"),
        ("https://rebinding.example.test", "rebinding.example.test is at 169.254.169.254, a link-local address"),
        ("https://[::ffff:10.0.0.1]", "a private address"),
    ],
)
def test_a_requests_endpoint_must_be_https_at_public_addresses_checked_before_any_connection(
    endpoint: str, says: str, connections: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_resolver(monkeypatch, ENDPOINT_HOSTS, [])
    default = BucketSettings(endpoint_url=None, access_key_id="AKIA0", secret_access_key="env", name="results")
    for environment_bucket in (default, None):
        with pytest.raises(InvalidInput) as refused:
            bucket_for_job(environment_bucket, {**ENDPOINT_CONFIG, "endpointUrl": endpoint})
        assert refused.value.message.startswith("s3Config.endpointUrl: ")
        assert says in refused.value.message
        assert SECRET not in json.dumps(refused.value.to_response())
    assert connections == []


def test_a_public_https_endpoint_is_taken_and_one_that_does_not_resolve_is_upload_failed(
    connections: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []
    fake_resolver(monkeypatch, ENDPOINT_HOSTS, resolved)
    bucket = bucket_for_job(None, {**ENDPOINT_CONFIG, "endpointUrl": "https://s3.example.test/"})
    assert bucket is not None and bucket.endpoint_url == "https://s3.example.test"
    assert resolved == ["s3.example.test"]

    def fail(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(UploadFailed, match=r"^s3Config\.endpointUrl: can't resolve s3\.example\.test"):
        bucket_for_job(None, {**ENDPOINT_CONFIG, "endpointUrl": "https://s3.example.test"})
    assert connections == []


def test_private_endpoints_only_where_the_operator_allows_them(connections: list[object]) -> None:
    allowed = bucket_for_job(
        None, {**ENDPOINT_CONFIG, "endpointUrl": "http://127.0.0.1:9000"}, allow_private_endpoints=True
    )
    assert allowed is not None and allowed.endpoint_url == "http://127.0.0.1:9000"
    # The environment's own endpoint is the operator's: never checked.
    operator = BucketSettings(endpoint_url="http://10.0.0.5:9000", access_key_id="a", secret_access_key="b", name="x")
    assert bucket_for_job(operator, {"bucketName": "other"}).endpoint_url == "http://10.0.0.5:9000"
    assert connections == []


def test_s3config_without_an_environment_bucket() -> None:
    with pytest.raises(InvalidInput, match=r"^s3Config\.bucketName: required"):
        bucket_for_job(None, {"accessId": "AKIA1", "accessSecret": SECRET})
    bucket = bucket_for_job(None, {"accessId": "AKIA1", "accessSecret": SECRET, "bucketName": "results"})
    assert bucket == BucketSettings(endpoint_url=None, access_key_id="AKIA1", secret_access_key=SECRET, name="results")
    assert bucket_for_job(None, None) is None


@pytest.mark.parametrize("job_id", ["../escape", "a/b", "..", ".hidden", "", "x" * 129, "id with space"])
def test_job_ids_that_could_leave_their_folder_are_refused(job_id: str) -> None:
    bucket = BucketSettings(endpoint_url=None, access_key_id="AKIA1", secret_access_key="s", name="results")
    with pytest.raises(InvalidInput, match=r"^id: "):
        open_sink(bucket, job_id, 1024)
    # Inline results have no keys, so the id does not matter there.
    open_sink(None, job_id, 1024).close()


def test_a_retried_job_overwrites_the_same_keys(s3_server: S3Server) -> None:
    bucket = s3_server.bucket(s3_server.create_bucket("results-rerun"))
    for attempt in range(2):
        final = [
            (asset("png", seed=attempt), asset("webp", 100, seed=attempt)),
            (asset("png", seed=10 + attempt), None),
        ]
        deliver(open_sink(bucket, "sync-rerun", 1024), final)
    stored = objects(s3_server, bucket.name, "")
    assert sorted(stored) == [
        "sync-rerun/0.png",
        "sync-rerun/0.thumb.webp",
        "sync-rerun/1.png",
        "sync-rerun/result.json",
    ]
    assert stored["sync-rerun/0.png"][0] == final[0][0].data
    assert stored["sync-rerun/1.png"][0] == final[1][0].data


def test_a_large_video_goes_in_parts_with_no_checksums_stores_refuse(s3_server: S3Server, interposer: Any) -> None:
    """In parts, each asking first with `Expect: 100-continue`, where a refusal saves sending megabytes; a file sent
    in one request sends its body at once, without that round trip."""
    front = interposer()
    bucket = s3_server.bucket(
        s3_server.create_bucket("results-video"),
        endpoint_url=front.endpoint,
        multipart_threshold=5 * 1024 * 1024,
        addressing_style="path",
    )
    video = asset("mp4", 11 * 1024 * 1024)
    delivered = deliver(open_sink(bucket, "job-video", 1024), [(video, asset("webp", 100))])
    assert objects(s3_server, bucket.name, "job-video/0.mp4")["job-video/0.mp4"] == (video.data, "video/mp4")
    assert s3_server.client().head_object(Bucket=bucket.name, Key="job-video/0.mp4")["ETag"].endswith('-3"')
    assert fetch(delivered[0]["url"])[0] == video.data
    asked = {path: "expect" in headers for method, path, headers in front.requests if method == "PUT"}
    parts = {path: ask for path, ask in asked.items() if "partNumber=" in path}
    assert len(parts) == 3 and all(parts.values())
    whole = {path: ask for path, ask in asked.items() if "?" not in path}
    assert whole == {f"/{bucket.name}/job-video/0.thumb.webp": False, f"/{bucket.name}/job-video/result.json": False}
    # Path-style addressing, as MinIO and most self-hosted stores want.
    assert all(path.startswith(f"/{bucket.name}") for _, path, _ in front.requests)
    sent = set().union(*(headers for _, _, headers in front.requests))
    assert not {name for name in sent if "checksum" in name}


def test_uploads_overlap_and_put_returns_at_once(s3_server: S3Server, interposer: Any) -> None:
    delay_s = 0.5
    front = interposer(delay_s=delay_s)
    bucket = s3_server.bucket(s3_server.create_bucket("results-slow"), endpoint_url=front.endpoint)
    sink = open_sink(bucket, "job-overlap", 1024)
    try:
        for index in range(4):
            began = time.monotonic()
            sink.put(index, asset("png", seed=index))
            assert time.monotonic() - began < 0.1
        began = time.monotonic()
        sink.finish(METADATA)
        waited = time.monotonic() - began
    finally:
        sink.close()
    # One after another, four results and result.json would take 5 × delay; side by side, about 2 ×.
    assert waited < 3.5 * delay_s
    assert len(objects(s3_server, bucket.name, "job-overlap/")) == 5


def test_throttling_is_retried_with_backoff(s3_server: S3Server, interposer: Any) -> None:
    front = interposer(throttle=2)
    bucket = s3_server.bucket(s3_server.create_bucket("results-throttled"), endpoint_url=front.endpoint, max_attempts=3)
    file = asset("png")
    deliver(open_sink(bucket, "job-throttled", 1024), [(file, None)])
    assert objects(s3_server, bucket.name, "job-throttled/0.png")["job-throttled/0.png"] == (file.data, file.mime)
    # Two refusals, then the image and result.json.
    assert len(front.requests) == 4


def _failing_bucket(case: str, s3_server: S3Server, request: pytest.FixtureRequest) -> tuple[BucketSettings, Any]:
    """A bucket that fails in the way `case` names, and the context the failure needs."""
    existing = "results-main-failures"
    if existing not in {item["Name"] for item in s3_server.client().list_buckets()["Buckets"]}:
        s3_server.create_bucket(existing)
    if case == "missing bucket":
        return s3_server.bucket("no-such-bucket"), nullcontext()
    if case == "unknown access key":
        return s3_server.bucket(existing, access_key_id="AKIAUNKNOWN000000000"), s3_server.enforced_auth()
    if case == "wrong secret":
        return s3_server.bucket(existing, secret_access_key="wrong-secret-value"), s3_server.enforced_auth()
    if case == "stopped server":
        return s3_server.bucket(existing, endpoint_url=request.getfixturevalue("stopped_endpoint")), nullcontext()
    if case == "silent server":
        endpoint = request.getfixturevalue("silent_server").endpoint
        return s3_server.bucket(existing, endpoint_url=endpoint), nullcontext()
    if case == "throttled throughout":
        endpoint = request.getfixturevalue("interposer")(throttle=1000).endpoint
        return s3_server.bucket(existing, endpoint_url=endpoint), nullcontext()
    assert case == "silent past the deadline"
    # Each attempt could wait 30 s; the job's deadline stops it after one.
    endpoint = request.getfixturevalue("silent_server").endpoint
    changes = {"endpoint_url": endpoint, "read_timeout_s": 30.0, "max_attempts": 3, "upload_timeout_s": 1.0}
    return s3_server.bucket(existing, **changes), nullcontext()


@pytest.mark.parametrize(
    ("case", "says", "bound_s"),
    [
        ("missing bucket", "NoSuchBucket (HTTP 404); the bucket does not exist", 2.0),
        ("unknown access key", "InvalidAccessKeyId (HTTP 403)", 2.0),
        ("wrong secret", "SignatureDoesNotMatch (HTTP 403)", 2.0),
        ("stopped server", "unreachable", 2.0),
        # Each attempt waits 1 s for botocore's `100 Continue` and then the 1 s read timeout.
        ("silent server", "Read timeout", 5.5),
        ("throttled throughout", "SlowDown (HTTP 503)", 3.0),
        ("silent past the deadline", "unfinished after 1 s (BUCKET_UPLOAD_TIMEOUT_S)", 2.0),
    ],
)
def test_failures_are_retryable_upload_failed_in_bounded_time_and_leave_the_worker_healthy(
    case: str, says: str, bound_s: float, s3_server: S3Server, request: pytest.FixtureRequest, watched: list[str]
) -> None:
    bucket, context = _failing_bucket(case, s3_server, request)
    watched.append("wrong-secret-value")
    healthy = s3_server.bucket("results-main-failures")
    with context:
        began = time.monotonic()
        with pytest.raises(UploadFailed) as failed:
            deliver(open_sink(bucket, "job-failing", 1024), [(asset("png"), asset("webp", 100))])
        elapsed = time.monotonic() - began
        response = failed.value.to_response()
        assert response["error_code"] == "UPLOAD_FAILED"
        assert response["retryable"] is True
        assert says in response["error"]
        assert bucket.secret_access_key not in json.dumps(response)
        assert elapsed < bound_s, f"{case}: {elapsed:.2f} s"
        # The next job, on a good bucket, goes through (with the server checking signatures where it was).
        file = asset("jpeg", seed=77)
        deliver(open_sink(healthy, f"job-after-{case.replace(' ', '-')}", 1024), [(file, None)])
    stored = objects(s3_server, healthy.name, f"job-after-{case.replace(' ', '-')}/")
    assert stored[f"job-after-{case.replace(' ', '-')}/0.jpeg"] == (file.data, file.mime)


def test_put_raises_once_an_earlier_upload_failed(s3_server: S3Server) -> None:
    sink = open_sink(s3_server.bucket("no-such-bucket"), "job-early", 1024)
    try:
        sink.put(0, asset("png"))
        deadline = time.monotonic() + 5
        with pytest.raises(UploadFailed, match="NoSuchBucket"):
            while time.monotonic() < deadline:
                sink.put(len(sink.entries), asset("png"))
                time.sleep(0.05)
    finally:
        sink.close()


def test_inline_results_are_data_uris_in_index_order() -> None:
    results = {1: (asset("jpeg", seed=1), None), 0: (asset("png", seed=0), asset("webp", 100, seed=2))}
    sink = open_sink(None, "local_test", 1024 * 1024)
    try:
        for index, (file, thumbnail) in results.items():
            put(sink, index, file, thumbnail)
        delivered = sink.finish(METADATA)
    finally:
        sink.close()
    assert [set(entry) for entry in delivered] == [{"data", "thumbnail_data"}, {"data"}]
    for entry, index in zip(delivered, (0, 1), strict=True):
        for name, file in zip(("data", "thumbnail_data"), results[index], strict=True):
            if file is not None:
                header, payload = entry[name].split(",", 1)
                assert header == f"data:{file.mime};base64"
                assert base64.b64decode(payload) == file.data
    assert sink.result_json == {}


def test_inline_results_over_the_limit_say_to_configure_a_bucket() -> None:
    file, thumbnail = asset("png", 3000), asset("webp", 200)
    exact = sum(len(f"data:{f.mime};base64,{base64.b64encode(f.data).decode()}") for f in (file, thumbnail))
    sink = open_sink(None, "local_test", exact)
    put(sink, 0, file, thumbnail)
    assert len(sink.finish(METADATA)) == 1

    sink = open_sink(None, "local_test", exact)
    put(sink, 0, file, thumbnail)
    # The second result passes the limit: the job stops there, before more GPU time is spent.
    with pytest.raises(ResultTooLarge) as refused:
        sink.put(1, asset("png", 1))
    response = refused.value.to_response()
    assert (response["error_code"], response["retryable"]) == ("RESULT_TOO_LARGE", False)
    assert "configure a bucket" in response["error"]
    assert "MAX_INLINE_BYTES" in response["error"]


def test_folder_results_are_files_named_as_in_a_bucket(tmp_path: Path) -> None:
    results = [(asset("png", seed=0), asset("webp", 100, seed=1)), (asset("jpeg", seed=2), None)]
    delivered = deliver(open_sink(None, "local_test", 1024, output_dir=tmp_path), results)
    folder = tmp_path / "local_test"
    assert delivered == [
        {"path": str(folder / "0.png"), "thumbnail_path": str(folder / "0.thumb.webp")},
        {"path": str(folder / "1.jpeg")},
    ]
    assert (folder / "0.png").read_bytes() == results[0][0].data
    assert (folder / "0.thumb.webp").read_bytes() == results[0][1].data
    assert (folder / "1.jpeg").read_bytes() == results[1][0].data
    # A folder has no inline limit (1024 bytes here), and no half-written files are left beside the results.
    assert json.loads((folder / "result.json").read_text()) == METADATA
    assert sorted(path.name for path in folder.iterdir()) == ["0.png", "0.thumb.webp", "1.jpeg", "result.json"]


def test_a_bucket_wins_over_the_folder_and_ids_that_leave_it_are_refused(tmp_path: Path) -> None:
    bucket = BucketSettings(endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b", name="x")
    sink = open_sink(bucket, "job", 1024, output_dir=tmp_path)
    sink.close()
    assert isinstance(sink, storage.S3Sink)
    with pytest.raises(InvalidInput, match="id:"):
        open_sink(None, "../escape", 1024, output_dir=tmp_path)


def test_an_unwritable_folder_is_upload_failed_naming_the_path(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("in the way")
    sink = open_sink(None, "job", 1024, output_dir=blocked)
    with pytest.raises(UploadFailed, match="OUTPUT_DIR"):
        sink.put(0, asset("png"))


def test_an_asset_type_must_match_its_extension() -> None:
    with pytest.raises(ValueError, match="asset"):
        Asset(b"x", "png", "image/jpeg")
    with pytest.raises(ValueError, match="asset"):
        Asset(b"x", "gif", "image/gif")


def test_clients_are_cached_per_store_and_key_never_holding_the_secret() -> None:
    aws = BucketSettings(
        endpoint_url="https://s3.eu-west-1.amazonaws.com",
        access_key_id="AKIA1",
        secret_access_key="cache-secret-one",
        name="results",
    )
    client = storage._client(aws)
    assert storage._client(replace(aws, name="other", prefix="x")) is client
    assert storage._client(replace(aws, secret_access_key="cache-secret-two")) is not client
    assert all("cache-secret" not in repr(key) for key in storage._clients)
    # SigV4 signs with the region, so an AWS endpoint's region is used where none is set.
    assert client.meta.region_name == "eu-west-1"
    r2 = replace(aws, endpoint_url="https://0123abcd.r2.cloudflarestorage.com")
    assert storage._client(r2).meta.region_name == "us-east-1"
    assert storage._client(replace(r2, region="auto")).meta.region_name == "auto"
