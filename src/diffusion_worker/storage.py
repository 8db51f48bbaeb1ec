"""Delivering a job's results: S3 uploads (thumbnails, a result.json, links that need no credentials) when a bucket
is set; else files in a local folder when one is set (local runs); else inline data URIs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.utils import is_valid_uri

from .config import BucketSettings
from .errors import InvalidInput, ResultTooLarge, UploadFailed
from .inputs import resolve_public
from .schema import JOB_ID

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}
S3_CONFIG_FIELDS = {
    "accessId": "access_key_id",
    "accessSecret": "secret_access_key",
    "bucketName": "name",
    "endpointUrl": "endpoint_url",
}
# botocore's own rule for bucket names; checking it here makes a bad s3Config an input error, not an upload failure.
BUCKET_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
# An AWS endpoint names its region; SigV4 signs with it, so a presigned link made with another one does not open.
AWS_REGION_HOST = re.compile(r"(?:^|\.)s3[.-](?:dualstack\.)?([a-z0-9-]+)\.amazonaws\.com$")
# Results of one job upload side by side; a multipart video sends its parts side by side too.
UPLOAD_THREADS = 4
PART_THREADS = 4
CLIENT_CACHE_SIZE = 8
ERROR_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret does not match the access key",
    "AccessDenied": "the credentials may not write there",
}


@dataclass(frozen=True)
class Asset:
    """One encoded file. Its extension names the object and its type is the object's Content-Type, so the two
    must agree: a mismatch is a bug caught here rather than a file browsers refuse."""

    data: bytes
    ext: str
    mime: str

    def __post_init__(self) -> None:
        if CONTENT_TYPES.get(self.ext) != self.mime:
            raise ValueError(f"asset .{self.ext} as {self.mime}: deliverable types are {CONTENT_TYPES}")


def bucket_for_job(
    default: BucketSettings | None, s3_config: object | None, allow_private_endpoints: bool = False
) -> BucketSettings | None:
    """Applies a request's top-level s3Config (accessId, accessSecret, bucketName, endpointUrl; all strings; unknown
    keys or wrong types -> InvalidInput naming the field) over the environment's bucket; None -> the default. Its
    endpoint is checked before anything connects to it (`_checked_endpoint`).

    What it replaces is where results go; the prefix and public base describe the environment's bucket, so they are
    dropped when the bucket or endpoint changes. Timeouts, retries and link expiry stay. Messages never quote a value:
    one of them is a secret."""
    if s3_config is None:
        return default
    if not isinstance(s3_config, dict):
        raise InvalidInput(f"s3Config: must be an object with {', '.join(S3_CONFIG_FIELDS)}")
    for name, value in s3_config.items():
        if name not in S3_CONFIG_FIELDS:
            raise InvalidInput(f"s3Config.{name}: unknown field; allowed: {', '.join(S3_CONFIG_FIELDS)}")
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"s3Config.{name}: must be a non-empty string")
    given = {S3_CONFIG_FIELDS[name]: value.strip() for name, value in s3_config.items()}
    if ("access_key_id" in given) != ("secret_access_key" in given):
        raise InvalidInput("s3Config.accessId, s3Config.accessSecret: give both or neither")
    if "name" in given and not BUCKET_NAME.fullmatch(given["name"]):
        raise InvalidInput("s3Config.bucketName: must be 1 to 255 letters, digits, '.', '_' or '-'")
    if "endpoint_url" in given:
        timeout_s = default.connect_timeout_s if default else BucketSettings.connect_timeout_s
        given["endpoint_url"] = _checked_endpoint(given["endpoint_url"], allow_private_endpoints, timeout_s)
    if default is None:
        if "name" not in given:
            raise InvalidInput("s3Config.bucketName: required, as this worker has no bucket of its own")
        return BucketSettings(
            endpoint_url=given.get("endpoint_url"),
            access_key_id=given.get("access_key_id"),
            secret_access_key=given.get("secret_access_key"),
            name=given["name"],
        )
    if {"name", "endpoint_url"} & given.keys():
        given.update(prefix="", public_url=None)
    if "endpoint_url" in given:
        given["region"] = None
    return replace(default, **given)


def _checked_endpoint(url: str, allow_private: bool, timeout_s: float) -> str:
    """A request's own endpoint must be a URL botocore accepts, over https, at a host that resolves to public
    addresses only: the worker connects to it with the request's credentials and reports how it answered, so an
    internal address would let a request probe the worker's network (cloud metadata, local ports). With
    `allow_private` (ALLOW_PRIVATE_S3CONFIG_ENDPOINTS, local testing) http:// and any address are accepted, unresolved.
    The environment's BUCKET_ENDPOINT_URL is the operator's and is never checked.

    The host is resolved here, and botocore resolves it again when it connects: a DNS answer that changes in
    between is not caught."""
    field = "s3Config.endpointUrl"
    if not is_valid_uri(url):
        raise InvalidInput(f"{field}: not a valid URL (scheme://host[:port])")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput(f"{field}: the port must be a number from 0 to 65535") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (allow_private and scheme == "http"):
        raise InvalidInput(f"{field}: must be an https:// URL")
    if "@" in parts.netloc:
        raise InvalidInput(f"{field}: credentials go in accessId and accessSecret, not in the URL")
    if not allow_private:
        host = parts.hostname or ""
        try:
            resolve_public(host, port or 443, field, timeout_s, "written to")
        except socket.gaierror as error:
            raise UploadFailed(f"{field}: can't resolve {host} ({error.strerror})") from error
        except TimeoutError as error:
            raise UploadFailed(f"{field}: no answer resolving {host} within {timeout_s:g} s") from error
    return url.rstrip("/")


def open_sink(
    bucket: BucketSettings | None, job_id: str, max_inline_bytes: int, output_dir: Path | None = None
) -> Sink:
    """A bucket wins over a local folder, which wins over inline results."""
    if bucket is None and output_dir is None:
        return InlineSink(job_id, max_inline_bytes)
    if not JOB_ID.fullmatch(job_id):
        raise InvalidInput(
            "id: a job id names the job's folder for its results, so it must be 1 to 128 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    if bucket is None:
        return FolderSink(output_dir, job_id)
    return S3Sink(bucket, job_id)


class Sink(ABC):
    """A job's delivery: S3 when a bucket is set, else inline data URIs. Each result and its thumbnail go in with
    `put` and `put_thumbnail` while the next one is made; `finish` waits for them all and returns the response's
    entries; `close` always follows."""

    # The response's fields for a result and for its thumbnail.
    FIELDS: tuple[str, str]

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        # Per index: response field -> the object key (S3), the path (folder) or the data URI (inline).
        self.entries: dict[int, dict[str, str]] = {}
        # Where `finish` put the job's result.json, as response fields: {"metadata_url"} or {"metadata_path"};
        # empty inline, where the response is all there is.
        self.result_json: dict[str, str] = {}

    def put(self, index: int, asset: Asset) -> None:
        """Starts delivering result `index` and returns at once. It raises early where it can (an upload of an
        earlier file already failed, or the inline results already passed the limit), so no more GPU time is
        spent."""
        self._deliver(index, self.FIELDS[0], f"{index}.{asset.ext}", asset)

    def put_thumbnail(self, index: int, thumbnail: Asset) -> None:
        """As `put`, for result `index`'s thumbnail."""
        self._deliver(index, self.FIELDS[1], f"{index}.thumb.{thumbnail.ext}", thumbnail)

    def _deliver(self, index: int, field: str, filename: str, asset: Asset) -> None:
        entry = self.entries.setdefault(index, {})
        if field in entry:
            raise ValueError(f"{field} of result {index} delivered twice")
        entry[field] = self._put(filename, asset)

    @abstractmethod
    def _put(self, filename: str, asset: Asset) -> str:
        """Starts delivering one file; returns what its entry holds until `finish`."""

    @abstractmethod
    def finish(self, metadata: dict[str, Any]) -> list[dict[str, str]]:
        """Waits for every put and returns, in index order, one dict per result: {"url", "thumbnail_url"},
        {"path", "thumbnail_path"} or {"data", "thumbnail_data"}, without the thumbnail key where there is no
        thumbnail. Raises UploadFailed or ResultTooLarge."""

    @abstractmethod
    def close(self) -> None:
        """Cancels what is still pending and releases the threads; idempotent, called in `finally`."""

    def in_flight(self) -> list[Future[Any]]:
        """Uploads still running, which `close` cannot cancel: the runtime waits for them before a job answers, so
        that a late upload of a failed attempt never overwrites its retry's objects."""
        return []


class InlineSink(Sink):
    FIELDS = ("data", "thumbnail_data")

    def __init__(self, job_id: str, max_bytes: int) -> None:
        super().__init__(job_id)
        self.max_bytes = max_bytes
        self.size = 0

    def _put(self, filename: str, asset: Asset) -> str:
        # The limit is on the response RunPod carries, so what counts is the data URIs' length, not the file sizes;
        # it is checked before encoding so an oversized video is never copied into base64.
        self.size += _data_uri_length(asset)
        if self.size > self.max_bytes:
            raise ResultTooLarge(
                f"the results need {_mib(self.size)} inline, over the {_mib(self.max_bytes)} limit "
                "(MAX_INLINE_BYTES); configure a bucket (the BUCKET_* environment variables, or the request's "
                "s3Config) to receive results of this size as links"
            )
        return _data_uri(asset)

    def finish(self, metadata: dict[str, Any]) -> list[dict[str, str]]:
        # The response carries the metadata itself; inline there is nowhere else to put it.
        log.info("job %s: %d results inline, %d bytes of data URIs", self.job_id, len(self.entries), self.size)
        return [self.entries[index] for index in sorted(self.entries)]

    def close(self) -> None:
        """Inline, nothing runs in the background."""


class FolderSink(Sink):
    """Results as files in `<folder>/<job id>/`, named as in a bucket: for local runs, where a path is handier than
    a data URI and has no size limit."""

    FIELDS = ("path", "thumbnail_path")

    def __init__(self, root: Path, job_id: str) -> None:
        super().__init__(job_id)
        self.folder = root / job_id

    def _put(self, filename: str, asset: Asset) -> str:
        return str(self._write(filename, asset.data))

    def finish(self, metadata: dict[str, Any]) -> list[dict[str, str]]:
        path = self._write("result.json", _metadata_json(metadata))
        self.result_json = {"metadata_path": str(path)}
        log.info("job %s: %d results written to %s", self.job_id, len(self.entries), self.folder)
        return [self.entries[index] for index in sorted(self.entries)]

    def close(self) -> None:
        """Files are written in `put`, nothing runs in the background."""

    def _write(self, filename: str, data: bytes) -> Path:
        # Written aside and renamed into place, so a reader never sees half a file and a rerun replaces it whole.
        path = self.folder / filename
        partial = path.with_name(f".{filename}.partial")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(data)
            os.replace(partial, path)
        except OSError as error:
            with suppress(OSError):
                partial.unlink(missing_ok=True)
            raise UploadFailed(f"could not write {path} (OUTPUT_DIR): {error.strerror or error}") from error
        return path


class S3Sink(Sink):
    FIELDS = ("url", "thumbnail_url")

    def __init__(self, bucket: BucketSettings, job_id: str) -> None:
        super().__init__(job_id)
        self.bucket = bucket
        self.client = _client(bucket)
        # Keys depend on the job id and index alone, so a retried job overwrites its objects instead of adding more.
        self.folder = f"{bucket.prefix}/{job_id}" if bucket.prefix else job_id
        self.transfer = TransferConfig(
            multipart_threshold=bucket.multipart_threshold,
            multipart_chunksize=bucket.multipart_threshold,
            max_concurrency=PART_THREADS,
        )
        self.pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix=f"upload-{job_id}")
        self.uploads: list[Future[tuple[float, float, int]]] = []

    def _put(self, filename: str, asset: Asset) -> str:
        _raise_failed(self.uploads)
        key = f"{self.folder}/{filename}"
        self.uploads.append(self.pool.submit(self._upload, key, asset.data, asset.mime))
        return key

    def finish(self, metadata: dict[str, Any]) -> list[dict[str, str]]:
        began = time.monotonic()
        deadline = began + self.bucket.upload_timeout_s
        metadata_key = f"{self.folder}/result.json"
        # Links are signed while the last uploads run: they need only the keys.
        links = [{name: self._link(key) for name, key in self.entries[index].items()} for index in sorted(self.entries)]
        result_json = {"metadata_url": self._link(metadata_key)}
        self._wait(deadline)
        # result.json goes last: once it is there, every object it describes is there too.
        body = _metadata_json(metadata)
        self.uploads.append(self.pool.submit(self._upload, metadata_key, body, "application/json"))
        self._wait(deadline)
        self.result_json = result_json
        spans = [upload.result() for upload in self.uploads]
        log.info(
            "job %s: %d objects, %d bytes to bucket %s under %s/ in %.2f s (finish waited %.2f s)",
            self.job_id,
            len(spans),
            sum(size for _, _, size in spans),
            self.bucket.name,
            self.folder,
            max(end for _, end, _ in spans) - min(start for start, _, _ in spans),
            time.monotonic() - began,
        )
        return links

    def close(self) -> None:
        # Uploads already running are not waited for here: the runtime waits for them (`in_flight`) without
        # blocking its event loop, and their own timeouts end them.
        self.pool.shutdown(wait=False, cancel_futures=True)

    def in_flight(self) -> list[Future[Any]]:
        return [upload for upload in self.uploads if not upload.done()]

    def _upload(self, key: str, data: bytes, mime: str) -> tuple[float, float, int]:
        started = time.monotonic()
        try:
            # A file object, not bytes: botocore's debug log prints a request's body when it is bytes.
            body = io.BytesIO(data)
            if len(data) < self.bucket.multipart_threshold:
                # One request, without the transfer manager's threads and futures set up and torn down around it:
                # 20 % less time for a 3 MB image on loopback.
                self.client.put_object(Bucket=self.bucket.name, Key=key, Body=body, ContentType=mime)
            else:
                self.client.upload_fileobj(
                    body, self.bucket.name, key, ExtraArgs={"ContentType": mime}, Config=self.transfer
                )
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "unknown")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            hint = ERROR_HINTS.get(code)
            raise UploadFailed(
                f"bucket {self.bucket.name} refused {key}: {code} (HTTP {status})" + (f"; {hint}" if hint else "")
            ) from error
        except BotoCoreError as error:
            raise UploadFailed(f"bucket {self.bucket.name} unreachable for {key}: {error}") from error
        return started, time.monotonic(), len(data)

    def _wait(self, deadline: float) -> None:
        """Waits for every upload until the first failure or the deadline, which bounds the job's time whatever
        the server does."""
        finished, pending = wait(self.uploads, max(0.0, deadline - time.monotonic()), FIRST_EXCEPTION)
        _raise_failed(finished)
        if pending:
            raise UploadFailed(
                f"bucket {self.bucket.name}: {len(pending)} uploads unfinished after "
                f"{self.bucket.upload_timeout_s:g} s (BUCKET_UPLOAD_TIMEOUT_S)"
            )

    def _link(self, key: str) -> str:
        if self.bucket.public_url:
            return f"{self.bucket.public_url}/{quote(key)}"
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket.name, "Key": key}, ExpiresIn=self.bucket.presign_expires_s
        )


_clients: OrderedDict[tuple[object, ...], Any] = OrderedDict()
_clients_lock = threading.Lock()


def _client(bucket: BucketSettings) -> Any:
    """One S3 client per store and credentials, reused across jobs: creating one takes tens of milliseconds."""
    # The cache key holds a digest of the secret, never the secret, so no repr of it can print one.
    secret_digest = hashlib.sha256((bucket.secret_access_key or "").encode()).hexdigest()
    key = (
        bucket.endpoint_url,
        bucket.access_key_id,
        secret_digest,
        bucket.region,
        bucket.addressing_style,
        bucket.connect_timeout_s,
        bucket.read_timeout_s,
        bucket.max_attempts,
    )
    with _clients_lock:
        if key in _clients:
            _clients.move_to_end(key)
            return _clients[key]
        client = _new_client(bucket)
        _clients[key] = client
        if len(_clients) > CLIENT_CACHE_SIZE:
            _clients.popitem(last=False)
        return client


def _new_client(bucket: BucketSettings) -> Any:
    config = Config(
        # Presigned links in SigV4: R2 and GCS accept nothing older, and SigV2 links are being retired on AWS.
        signature_version="s3v4",
        connect_timeout=bucket.connect_timeout_s,
        read_timeout=bucket.read_timeout_s,
        # Standard mode retries throttling (SlowDown, 503) and connection errors and timeouts, with jittered
        # exponential backoff, up to this many attempts in all.
        retries={"mode": "standard", "total_max_attempts": bucket.max_attempts},
        s3={"addressing_style": bucket.addressing_style},
        # boto3 ≥ 1.36 adds CRC checksums to every upload by default; R2, GCS and older MinIO refuse or mishandle
        # them, and S3 does not need them where the API does not require them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=UPLOAD_THREADS * PART_THREADS,
    )
    region = bucket.region
    if region is None and bucket.endpoint_url:
        match = AWS_REGION_HOST.search(urlsplit(bucket.endpoint_url).hostname or "")
        region = match.group(1) if match else None
    # A session per client: boto3's default session is not safe to create clients from in several threads.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        region_name=region or "us-east-1",
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
        config=config,
    )
    client.meta.events.register("before-sign.s3.PutObject", _send_body_at_once)
    return client


def _send_body_at_once(request: Any, **_: Any) -> None:
    """botocore asks with `Expect: 100-continue` before sending any file-like body, and waits for the store's go-ahead:
    one more round trip per upload, and a job's last two uploads (its last result, then result.json) follow each
    other. A single PutObject is under BUCKET_MULTIPART_THRESHOLD_BYTES; the parts of larger uploads still ask first."""
    del request.headers["Expect"]


def _raise_failed(uploads: Iterable[Future[Any]]) -> None:
    for upload in uploads:
        if upload.done() and upload.exception() is not None:
            raise upload.exception()


def _metadata_json(metadata: dict[str, Any]) -> bytes:
    return json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False).encode()


def _data_uri_length(asset: Asset) -> int:
    return len(f"data:{asset.mime};base64,") + 4 * ((len(asset.data) + 2) // 3)


def _data_uri(asset: Asset) -> str:
    return f"data:{asset.mime};base64,{base64.b64encode(asset.data).decode('ascii')}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
