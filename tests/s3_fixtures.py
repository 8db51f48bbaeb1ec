"""Real S3 servers on loopback for tests: moto in server mode over HTTP, with IAM users whose keys it can be made to
check, and servers that misbehave the ways stores do (stopped, silent, throttling, slow).

Presigned links are checked as S3 checks them. moto does not: it reads signatures from the Authorization header
only (moto/iam/access_control.py), so with its authentication off any link opens (wrong region, expired, forged),
and with it on every presigned link fails. s3rver (npm) checks query signatures and expiry but signs with whatever
region the link names, so a wrong region still opens. So `s3_server` is moto behind `PresignGate`, a front of our
own that verifies every presigned request by AWS's documented SigV4 algorithm (checked against AWS's example
below) for the server's one region, its users' secrets and its own clock, and refuses the rest with S3's error
codes; everything else passes through to moto unchanged.

Import the fixtures where they are needed (`from s3_fixtures import s3_server, ...`). moto keeps its state per
process, so every server here sees the same buckets and users."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote

import boto3
import pytest
from botocore.config import Config
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from diffusion_worker.config import BucketSettings

S = TypeVar("S")

REGION = "us-east-1"
# Small enough that each failure ends in a few seconds, with room for moto on a busy machine.
FAST_FAILURE = {"connect_timeout_s": 1.0, "read_timeout_s": 1.0, "max_attempts": 2, "upload_timeout_s": 10.0}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
ALLOW_S3 = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
# Every access key the tests' servers know, with its secret: what S3 looks a presigned link's key up in.
SECRETS: dict[str, str] = {}
SIGV4_TIME = "%Y%m%dT%H%M%SZ"
# RFC 3986's unreserved characters: SigV4 percent-encodes every other byte of query keys and values.
UNRESERVED = "-_.~"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str

    def client(self, service: str = "s3") -> Any:
        return boto3.session.Session().client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(signature_version="s3v4"),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def bucket(self, name: str, **changes: Any) -> BucketSettings:
        """Settings for a bucket on this server (or, with `endpoint_url`, on another), with short timeouts."""
        fields = {
            "endpoint_url": self.endpoint,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            **FAST_FAILURE,
            **changes,
        }
        return BucketSettings(name=name, **fields)

    def worker_env(self, bucket: str) -> dict[str, str]:
        """The environment of a worker process whose own bucket is `bucket` on this server."""
        return {
            "BUCKET_NAME": bucket,
            "BUCKET_ENDPOINT_URL": self.endpoint,
            "BUCKET_ACCESS_KEY_ID": self.access_key_id,
            "BUCKET_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def add_user(self, name: str) -> S3Server:
        """An IAM user allowed all of S3; the server holds them to their keys inside `enforced_auth`."""
        iam = self.client("iam")
        unique = f"{name}-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=unique)
        iam.put_user_policy(UserName=unique, PolicyName="s3", PolicyDocument=ALLOW_S3)
        key = iam.create_access_key(UserName=unique)["AccessKey"]
        SECRETS[key["AccessKeyId"]] = key["SecretAccessKey"]
        return S3Server(self.endpoint, key["AccessKeyId"], key["SecretAccessKey"])

    @contextmanager
    def enforced_auth(self) -> Iterator[None]:
        """Makes the server check every request's signature and key against its IAM users, as S3 does.

        moto accepts any key unless told otherwise, through its own API; the switch is global to the process,
        so it is on only inside this block. moto checks header signatures only: presigned links fail while on."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, free_requests: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=free_requests.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def presigned_signature(method: str, host: str, raw_path: str, query: str, secret: str) -> str:
    """The SigV4 signature of a presigned request (query-string authentication, signed headers `host`, unsigned
    payload), from AWS's documentation (sigv4-query-string-auth), computed here rather than by botocore, whose links
    it checks. `query` is the raw query string, X-Amz-Signature left out or not."""
    pairs = [(key, value) for key, value in parse_qsl(query, keep_blank_values=True) if key != "X-Amz-Signature"]
    parameters = dict(pairs)
    canonical_query = "&".join(
        f"{quote(key, safe=UNRESERVED)}={quote(value, safe=UNRESERVED)}" for key, value in sorted(pairs)
    )
    canonical_request = "\n".join([method, raw_path, canonical_query, f"host:{host}", "", "host", "UNSIGNED-PAYLOAD"])
    scope = parameters["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            parameters["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret}".encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class MotoFront:
    """moto's S3 behind a WSGI front of our own on loopback; each subclass's `_app` decides what reaches `self.moto`."""

    def _serve(self) -> None:
        self.moto = DomainDispatcherApplication(create_backend_app)
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join()


class PresignGate(MotoFront):
    """moto behind a front that checks presigned requests as S3 does; `clock_offset_s` moves the server's clock."""

    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self.clock_offset_s = 0.0
        self.refusals: list[str] = []
        self._serve()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        if "X-Amz-Signature=" in query:
            refusal = self.refusal(environ["REQUEST_METHOD"], environ["HTTP_HOST"], environ["RAW_URI"], query)
            if refusal is not None:
                self.refusals.append(refusal[0])
                body = f"<Error><Code>{refusal[0]}</Code><Message>{refusal[1]}</Message></Error>".encode()
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [body]
        return self.moto(environ, start_response)

    def refusal(self, method: str, host: str, raw_uri: str, query: str) -> tuple[str, str] | None:
        """S3's error code and message for a presigned request it would refuse, or None."""
        parameters = dict(parse_qsl(query, keep_blank_values=True))
        access_key, date, region, service, terminal = parameters.get("X-Amz-Credential", "").split("/")
        if parameters.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or (service, terminal) != ("s3", "aws4_request"):
            return "AuthorizationQueryParametersError", "only AWS4-HMAC-SHA256 for s3"
        if region != self.region:
            return "AuthorizationQueryParametersError", f"the region '{region}' is wrong; expecting '{self.region}'"
        if access_key not in SECRETS:
            return "InvalidAccessKeyId", "the access key is not known"
        signed_at = datetime.datetime.strptime(parameters["X-Amz-Date"], SIGV4_TIME).replace(tzinfo=datetime.UTC)
        expires = signed_at + datetime.timedelta(seconds=int(parameters["X-Amz-Expires"]))
        now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.clock_offset_s)
        if date != parameters["X-Amz-Date"][:8] or now > expires:
            return "AccessDenied", "Request has expired"
        path = raw_uri.split("?", 1)[0]
        expected = presigned_signature(method, host, path, query, SECRETS[access_key])
        if not hmac.compare_digest(expected, parameters["X-Amz-Signature"]):
            return "SignatureDoesNotMatch", "the signature does not match"
        return None


@pytest.fixture(scope="module")
def presign_gate() -> Iterator[PresignGate]:
    gate = PresignGate()
    try:
        yield gate
    finally:
        gate.close()


@pytest.fixture(scope="module")
def s3_server(presign_gate: PresignGate) -> S3Server:
    """moto's S3 (and IAM, and its own API) over HTTP on 127.0.0.1 behind the presign gate, with an IAM user whose
    keys the tests use."""
    # Any key works until auth is enforced: the bootstrap key only creates the real user.
    bootstrap = S3Server(presign_gate.endpoint, "AKIABOOTSTRAP0000000", "bootstrap")
    return bootstrap.add_user("worker")


@pytest.fixture
def stopped_endpoint() -> str:
    """The address of an S3 server that has stopped: connections are refused."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    server.stop()
    return f"http://{host}:{port}"


class SilentServer:
    """Accepts connections and never answers: a hung store, or a proxy that black-holes requests."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        for connection in [*self.connections, self.listener]:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


@dataclass
class Interposer(MotoFront):
    """moto's S3 behind a front of our own: it answers the first `throttle` requests with 503 SlowDown, as S3 does
    under load, delays every answer by `delay_s`, and records what each request looked like on the wire."""

    throttle: int = 0
    delay_s: float = 0.0
    # Per request: method, path with query, lower-cased header names.
    requests: list[tuple[str, str, frozenset[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._serve()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING")
        headers = frozenset(name[5:].replace("_", "-").lower() for name in environ if name.startswith("HTTP_"))
        with self.lock:
            self.requests.append(
                (environ["REQUEST_METHOD"], environ["PATH_INFO"] + (f"?{query}" if query else ""), headers)
            )
            throttled = self.throttle > 0
            self.throttle -= throttled
        time.sleep(self.delay_s)
        if throttled:
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [SLOW_DOWN]
        return self.moto(environ, start_response)


def closed_after(build: Callable[..., S]) -> Iterator[Callable[..., S]]:
    """For a fixture to `yield from`: makes servers with `build`, and closes every one of them after the test."""
    made: list[S] = []

    def make(*args: Any, **kwargs: Any) -> S:
        made.append(build(*args, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for server in made:
            server.close()


@pytest.fixture
def interposer() -> Iterator[Callable[..., Interposer]]:
    """Makes Interposers (`interposer(throttle=2)`), closed after the test."""
    yield from closed_after(Interposer)
