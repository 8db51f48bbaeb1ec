"""The client's HTTP: where an endpoint's routes are, what it is sent, and how long anything may take.

One job has one deadline; every request takes its timeouts from what is left of it, and transient failures
(connection errors, timeouts, 429, 5xx) are retried with exponential backoff and jitter inside it."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

log = logging.getLogger(__name__)

RUNPOD_API = "https://api.runpod.ai/v2"
RUNPOD_API_HOST = "api.runpod.ai"
# RunPod's endpoint ids are short runs of lower-case letters and digits; anything with a scheme is a base URL.
ENDPOINT_ID = re.compile(r"[a-z0-9]{1,64}")
# The innermost cause in a requests connection error, e.g. "[Errno 111] Connection refused".
ERRNO_CAUSE = re.compile(r"\[Errno -?\d+\] [^'\")]+")


class Unavailable(Exception):
    """A request that may succeed if tried again: no connection, no answer in time, 429 or a 5xx."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class DeadlinePassed(Exception):
    """The job's time is up; whoever holds a job id cancels it."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def sleep(self, seconds: float) -> None:
        """Sleeps, but never past the deadline; raises DeadlinePassed when the deadline is what ended it."""
        time.sleep(min(seconds, self.remaining()))
        if self.remaining() <= 0:
            raise DeadlinePassed


@dataclass(frozen=True)
class Backoff:
    """How often and how patiently a transient failure is retried (also: rounds over the endpoints)."""

    attempts: int = 5
    base_s: float = 1.0
    cap_s: float = 16.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        step = min(self.cap_s, self.base_s * 2**attempt)
        # Equal jitter: clients that failed together spread out, yet each still waits at least half the step.
        return max(step / 2 + random.uniform(0, step / 2), min(retry_after_s or 0.0, self.cap_s))


@dataclass
class Endpoint:
    """Where jobs go: RunPod's API for an endpoint id, or a base URL serving the same routes (the SDK's local API
    server, or a pod running it)."""

    base_url: str
    # Sent to RunPod's API only: never to a pod or any other host a base URL names.
    api_key: str | None = field(default=None, repr=False)
    # RunPod answers GET /status/{id}; the SDK's local server only POST, and runs the queued job inside that
    # request. Learnt from a 405 the first time, then remembered for the endpoint.
    status_method: str = "GET"

    @classmethod
    def parse(cls, text: str, api_key: str | None) -> Endpoint:
        """An endpoint from `--endpoint`: `http(s)://host[:port][/path]` or a RunPod endpoint id."""
        if text.startswith(("http://", "https://")):
            parts = urlsplit(text)
            if not parts.hostname or parts.query or parts.fragment:
                raise ValueError(f"endpoint {text!r}: a base URL is scheme, host, port and path only")
            on_runpod = parts.hostname == RUNPOD_API_HOST
            return cls(text.rstrip("/"), api_key if on_runpod else None)
        if not ENDPOINT_ID.fullmatch(text):
            raise ValueError(f"endpoint {text!r}: give a base URL (http://host:port) or a RunPod endpoint id")
        if not api_key:
            raise ValueError(f"endpoint {text!r} is a RunPod endpoint id, which needs RUNPOD_API_KEY to be set")
        return cls(f"{RUNPOD_API}/{text}", api_key)

    def url(self, route: str) -> str:
        return f"{self.base_url}/{route}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __str__(self) -> str:
        return self.base_url


class Transport:
    """Requests with the client's timeouts, one connection pool per thread (a batch runs jobs side by side)."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, backoff: Backoff) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.backoff = backoff
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def once(
        self,
        method: str,
        url: str,
        deadline: Deadline,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        read_timeout_s: float | None = None,
    ) -> requests.Response:
        """One request inside the deadline. Raises Unavailable where trying again may help, DeadlinePassed where
        the deadline ended it; any other answer is returned for the caller to judge."""
        remaining = deadline.remaining()
        if remaining <= 0:
            raise DeadlinePassed
        read = min(read_timeout_s or self.read_timeout_s, remaining)
        try:
            response = self.session.request(
                method, url, headers=headers, json=json, timeout=(min(self.connect_timeout_s, remaining), read)
            )
        except requests.Timeout:
            if deadline.remaining() <= 0:
                raise DeadlinePassed from None
            raise Unavailable("no answer in time") from None
        except requests.ConnectionError as error:
            cause = ERRNO_CAUSE.search(str(error))
            raise Unavailable(cause.group(0) if cause else type(error).__name__) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise Unavailable(f"HTTP {response.status_code}", _retry_after(response))
        return response

    def with_retries(self, method: str, url: str, deadline: Deadline, **request: Any) -> requests.Response:
        """`once`, retried with backoff on transient failures; the last Unavailable is raised when they run out."""
        attempt = 0
        while True:
            try:
                return self.once(method, url, deadline, **request)
            except Unavailable as failure:
                attempt += 1
                if attempt == self.backoff.attempts:
                    raise
                delay = self.backoff.delay(attempt - 1, failure.retry_after_s)
                log.info("%s %s: %s; retrying in %.1f s", method, without_query(url), failure, delay)
                deadline.sleep(delay)


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def without_query(url: str) -> str:
    """A URL fit for a message or a log: a presigned link's query is its signature."""
    return url.split("?", 1)[0]
