"""One job from submission to files on disk: validate, submit to the first endpoint that accepts, wait, cancel when
the time is up, download."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ..schema import parse_input
from .failures import DownloadFailed, JobFailed, JobTimedOut, NoEndpointReachable
from .results import save_results
from .transport import Backoff, Deadline, DeadlinePassed, Endpoint, Transport, Unavailable, without_query

log = logging.getLogger(__name__)

FAILED = frozenset({"FAILED", "CANCELLED", "TIMED_OUT"})
# Anything else (IN_QUEUE, IN_PROGRESS, a state RunPod adds later) is waited out, within the deadline.
FINISHED = FAILED | {"COMPLETED"}
# The contract's errors read "<CODE>: <message>"; RunPod keeps the string and may drop the other fields.
ERROR_CODE = re.compile(r"([A-Z][A-Z0-9_]*): ")
POLL_FIRST_S = 0.5
POLL_MOST_S = 3.0
# After the timeout, the cancel gets this long on top: it is worth a try, not a wait.
CANCEL_BUDGET_S = 0.8
DEFAULT_TIMEOUT_S = 3600.0


@dataclass
class JobResult:
    """A completed job: `response` is the final status answer (`id`, `status`, `output`, and RunPod's timings);
    with an output folder, each output in it also names its local `file` and its inline data is dropped."""

    id: str
    endpoint: str
    response: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    @property
    def output(self) -> dict[str, Any]:
        return self.response.get("output") or {}


class Client:
    """Runs jobs on the first of `endpoints` (RunPod endpoint ids or base URLs) that accepts each one.

    Thread-safe: a batch may call `run` from several threads at once."""

    def __init__(
        self,
        endpoints: Sequence[str | Endpoint],
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 15.0,
        backoff: Backoff | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("give at least one endpoint")
        # The worker reads its settings in config.py; this is the calling side, a program of its own, and
        # RUNPOD_API_KEY is where RunPod's tools keep the key it needs.
        key = api_key if api_key is not None else os.environ.get("RUNPOD_API_KEY")
        self.endpoints = [point if isinstance(point, Endpoint) else Endpoint.parse(point, key) for point in endpoints]
        self.transport = Transport(connect_timeout_s, read_timeout_s, backoff or Backoff())

    def run(
        self,
        job_input: dict[str, Any],
        *,
        output_dir: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        sync: bool = False,
        webhook: str | None = None,
        request_fields: Mapping[str, Any] | None = None,
    ) -> JobResult:
        """Runs one job and, with `output_dir`, saves its files under `output_dir/<job id>/`. `timeout_s` bounds
        it all, from submission to the last file.

        `request_fields` are other top-level fields of RunPod's request (`s3Config`, `policy`). Raises InvalidInput
        (nothing sent), JobFailed, JobTimedOut (after cancelling the job) or NoEndpointReachable."""
        # Bad input never leaves the machine: the worker's own rules, checked here first.
        parse_input(job_input)
        deadline = Deadline(timeout_s)
        body = {**(request_fields or {}), "input": job_input}
        if webhook is not None:
            body["webhook"] = webhook
        try:
            endpoint, answer = self._submit(body, "runsync" if sync else "run", deadline)
        except DeadlinePassed:
            message = f"timed out after {timeout_s:g} s before any endpoint gave a job id"
            raise JobTimedOut(message, None, False) from None
        job_id = answer["id"]
        try:
            final = self._wait(endpoint, answer, deadline)
        except DeadlinePassed:
            cancelled = self._cancel(endpoint, job_id)
            outcome = "cancelled" if cancelled else "not cancelled (the server has no /cancel)"
            raise JobTimedOut(f"timed out after {timeout_s:g} s; job {job_id} {outcome}", job_id, cancelled) from None
        if final.get("status") in FAILED:
            raise JobFailed(_error_code(final), str(final.get("error") or final.get("status")), final)
        result = JobResult(job_id, str(endpoint), final)
        if output_dir is not None:
            try:
                result.response, result.files = save_results(
                    final, Path(output_dir), lambda url: self._download(url, deadline)
                )
            except DeadlinePassed:
                message = f"timed out after {timeout_s:g} s downloading the results of job {job_id}"
                raise JobTimedOut(message, job_id, False) from None
            except DownloadFailed as error:
                error.response = final
                raise
        return result

    def _submit(self, body: dict[str, Any], route: str, deadline: Deadline) -> tuple[Endpoint, dict[str, Any]]:
        """The first endpoint, in order, that accepts the job, in rounds with backoff between them; an endpoint
        that refuses outright (4xx) is not asked again."""
        reasons: dict[str, str] = {}
        refused: set[int] = set()
        backoff = self.transport.backoff
        for attempt in range(backoff.attempts):
            retry_after_s = None
            for position, endpoint in enumerate(self.endpoints):
                if position in refused:
                    continue
                try:
                    answer = self._submit_to(endpoint, body, route, deadline)
                except Unavailable as failure:
                    reasons[str(endpoint)] = str(failure)
                    retry_after_s = failure.retry_after_s or retry_after_s
                    log.info("%s did not take the job (%s)", endpoint, failure)
                    continue
                except _Refused as refusal:
                    reasons[str(endpoint)] = str(refusal)
                    refused.add(position)
                    log.info("%s refused the job (%s)", endpoint, refusal)
                    continue
                log.info("job %s accepted by %s", answer["id"], endpoint)
                return endpoint, answer
            if len(refused) == len(self.endpoints) or attempt + 1 == backoff.attempts:
                break
            delay = backoff.delay(attempt, retry_after_s)
            log.info("no endpoint took the job; trying again in %.1f s", delay)
            deadline.sleep(delay)
        raise NoEndpointReachable(reasons)

    def _submit_to(self, endpoint: Endpoint, body: dict[str, Any], route: str, deadline: Deadline) -> dict[str, Any]:
        # /runsync holds the request while the job runs. RunPod answers by `wait` with the job still in progress (and
        # its id, to poll or cancel): asked to answer a second before the deadline, it always leaves one to cancel.
        sync = route == "runsync"
        url = endpoint.url(route)
        if sync:
            url += f"?wait={int(min(max(deadline.remaining() - 1, 1), 300) * 1000)}"
        response = self.transport.once(
            "POST",
            url,
            deadline,
            headers=endpoint.headers,
            json=body,
            read_timeout_s=deadline.remaining() if sync else None,
        )
        answer = _json(response)
        if not response.ok:
            raise _Refused(f"HTTP {response.status_code}: {_brief(answer or response.text)}")
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise _Refused(f"answered without a job id: {_brief(answer or response.text)}")
        return answer

    def _wait(self, endpoint: Endpoint, answer: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
        """Polls the job's status until it is no longer queued or running, more slowly as it goes on."""
        job_id = answer["id"]
        delay = POLL_FIRST_S
        seen: tuple[Any, ...] = ()
        while answer.get("status") not in FINISHED:
            progress = (answer.get("status"), answer.get("output"))
            if progress != seen:
                log.info("job %s: %s%s", job_id, progress[0], f" {_brief(progress[1])}" if progress[1] else "")
                seen = progress
            deadline.sleep(delay)
            delay = min(delay * 1.5, POLL_MOST_S)
            answer = self._status(endpoint, job_id, deadline)
        log.info("job %s: %s", job_id, answer.get("status"))
        return answer

    def _status(self, endpoint: Endpoint, job_id: str, deadline: Deadline) -> dict[str, Any]:
        method = endpoint.status_method
        # The local server's POST runs the job inside the request: that answer takes as long as the job.
        read_timeout_s = deadline.remaining() if method == "POST" else None
        request = {"headers": endpoint.headers, "read_timeout_s": read_timeout_s}
        try:
            response = self.transport.with_retries(method, endpoint.url(f"status/{job_id}"), deadline, **request)
            if response.status_code == 405 and method == "GET":
                endpoint.status_method = "POST"
                return self._status(endpoint, job_id, deadline)
        except Unavailable as failure:
            raise NoEndpointReachable({str(endpoint): f"stopped answering about job {job_id} ({failure})"}) from None
        answer = _json(response)
        if not response.ok or not isinstance(answer, dict):
            detail = _brief(answer or response.text)
            raise JobFailed(f"HTTP_{response.status_code}", f"status of job {job_id}: {detail}")
        return answer

    def _cancel(self, endpoint: Endpoint, job_id: str) -> bool:
        """Asks the endpoint to stop the job; False where it could not (no such route, no answer)."""
        try:
            response = self.transport.once(
                "POST", endpoint.url(f"cancel/{job_id}"), Deadline(CANCEL_BUDGET_S), headers=endpoint.headers
            )
        except (Unavailable, DeadlinePassed) as failure:
            log.warning("could not cancel job %s on %s: %s", job_id, endpoint, str(failure) or "no answer in time")
            return False
        # The SDK's local server has no /cancel route (404, or 405 behind some proxies): nothing to stop there.
        if response.status_code in (404, 405):
            return False
        if not response.ok:
            log.warning("cancelling job %s on %s: HTTP %d", job_id, endpoint, response.status_code)
        return response.ok

    def _download(self, url: str, deadline: Deadline) -> bytes:
        """A result's bytes from its link. No credentials go with it: the link carries its own signature."""
        try:
            response = self.transport.with_retries("GET", url, deadline, read_timeout_s=deadline.remaining())
        except Unavailable as failure:
            raise DownloadFailed(f"{without_query(url)}: {failure}") from None
        if not response.ok:
            raise DownloadFailed(f"{without_query(url)}: HTTP {response.status_code}")
        return response.content


class _Refused(Exception):
    """An endpoint's answer that asking again would not change: a 4xx, or no job id."""


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_code(answer: dict[str, Any]) -> str:
    output = answer.get("output")
    if isinstance(output, dict) and isinstance(output.get("error_code"), str):
        return output["error_code"]
    match = ERROR_CODE.match(str(answer.get("error") or ""))
    return match.group(1) if match else str(answer.get("status"))


def _brief(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"
