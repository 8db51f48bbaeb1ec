"""How a job can end other than well, each with the exit code the command line gives it. Bad input is the worker's
own InvalidInput (exit 64), raised before anything is sent."""

from __future__ import annotations

from typing import Any, ClassVar

EXIT_USAGE = 64


class ClientError(Exception):
    exit_code: ClassVar[int] = 1


class JobFailed(ClientError):
    """The worker (or RunPod) answered the job with a failure: `error_code` is the contract's code where the worker
    gave one, else RunPod's status (`CANCELLED`, `TIMED_OUT`) or `HTTP_<status>` for a refused status request."""

    exit_code = 2

    def __init__(self, error_code: str, message: str, response: dict[str, Any] | None = None) -> None:
        super().__init__(f"{error_code}: {message}")
        self.error_code = error_code
        self.response = response


class DownloadFailed(JobFailed):
    """The job completed but a file could not be fetched, or its bytes did not match the response's sha256."""

    def __init__(self, message: str) -> None:
        super().__init__("DOWNLOAD_FAILED", message)


class JobTimedOut(ClientError):
    """The whole-job timeout passed; the job was cancelled where there was one to cancel and a route to do it."""

    exit_code = 3

    def __init__(self, message: str, job_id: str | None, cancelled: bool) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.cancelled = cancelled


class NoEndpointReachable(ClientError):
    """No endpoint accepted the job (or the one that did stopped answering): `reasons` names each one's failure."""

    exit_code = 4

    def __init__(self, reasons: dict[str, str]) -> None:
        super().__init__("no endpoint reachable: " + "; ".join(f"{where}: {why}" for where, why in reasons.items()))
        self.reasons = reasons
