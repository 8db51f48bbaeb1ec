"""Errors as values with stable codes: the handler turns any of them into the contract's error dict."""

from __future__ import annotations

from typing import Any, ClassVar


class WorkerError(Exception):
    """Base of every error a job can answer with; `code` and `retryable` are part of the job contract."""

    code: ClassVar[str] = "INTERNAL"
    retryable: ClassVar[bool] = True
    # Set only where the GPU state can no longer be trusted, so that RunPod replaces the worker.
    refresh_worker: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_response(self) -> dict[str, Any]:
        response: dict[str, Any] = {
            "error": f"{self.code}: {self.message}",
            "error_code": self.code,
            "retryable": self.retryable,
        }
        if self.refresh_worker:
            response["refresh_worker"] = True
        return response


class InvalidInput(WorkerError):
    code = "INVALID_INPUT"
    retryable = False


class InputFetchFailed(WorkerError):
    code = "INPUT_FETCH_FAILED"


class UnknownLora(WorkerError):
    code = "UNKNOWN_LORA"
    retryable = False


class TaskUnavailable(WorkerError):
    code = "TASK_UNAVAILABLE"
    retryable = False


class OutOfMemory(WorkerError):
    code = "OUT_OF_MEMORY"


class JobTimeout(WorkerError):
    code = "TIMEOUT"


class UploadFailed(WorkerError):
    code = "UPLOAD_FAILED"


class ResultTooLarge(WorkerError):
    code = "RESULT_TOO_LARGE"
    retryable = False


class Internal(WorkerError):
    code = "INTERNAL"


class StateLost(Internal):
    """The shared models can no longer be trusted to be as loaded (LoRA adapters that could not be removed): the
    worker asks to be replaced rather than serve another job from them."""

    refresh_worker = True


class GpuStateLost(StateLost):
    """A CUDA error other than out-of-memory: the device may be corrupt, so the worker asks to be replaced."""


class ConfigError(Exception):
    """Bad settings found at start: the worker refuses to start rather than fail every job."""
