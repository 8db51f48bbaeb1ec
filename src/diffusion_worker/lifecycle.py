"""A job's lifecycle apart from its work: its deadline, its stop (a cancel, or a failure on the other side of the
GPU thread), its progress reports, and the threads it starts.

RunPod stops a job by cancelling the handler's asyncio task, but GPU work runs in a thread no cancel reaches. So
the job's `JobControl` is checked between stages and after every denoising step (the pipelines' step-end
callback): once the job is past its deadline or stopped, `check` raises out of the pipeline, the GPU is free within
one step, and nothing half-denoised is decoded or delivered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import runpod

from .errors import JobTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGES = ("queued", "denoising", "encoding", "uploading")
# Progress goes out at most this often, the first update only once the job has run this long: short jobs send none.
PROGRESS_INTERVAL_S = 1.0
# The SDK sends each update from a thread of its own, unordered with the result: a job whose last update went out
# more recently than this waits out the rest before it answers, so an update never lands after the result.
PROGRESS_SETTLE_S = 0.5
# How often a GPU thread waiting to hand over an output looks whether its job was stopped meanwhile.
HANDOFF_POLL_S = 0.1


class JobStopped(Exception):
    """Raised in the GPU thread once the job's coroutine has stopped it, cancelled or failed for a reason of its
    own. Never an answer: the coroutine answers with its own reason, or re-raises the cancel."""


@dataclass(frozen=True)
class Position:
    """How far a job got, as progress updates and a timeout's message tell it. `image` counts from 1."""

    stage: str = "queued"
    image: int = 1
    images: int = 1
    step: int = 0
    steps: int = 0
    kind: str = "image"

    def as_progress(self) -> dict[str, Any]:
        progress = asdict(self)
        del progress["kind"]
        return progress

    def describe(self) -> str:
        output = "the video" if self.kind == "video" else f"image {self.image} of {self.images}"
        if self.stage == "queued":
            return "while queued for the GPU"
        if self.stage == "denoising":
            if self.step == 0:
                return f"before the first step of {output}"
            return f"at step {self.step} of {self.steps} of {output}"
        if self.stage == "encoding":
            return f"before encoding {output}"
        return "before uploading the results"


class JobControl:
    """One job's deadline, stop flag and progress, shared by its coroutine and the GPU thread."""

    def __init__(
        self,
        job: dict[str, Any],
        started: float,
        timeout_s: float,
        limit_name: str,
        progress: bool,
        images: int = 1,
        kind: str = "image",
    ) -> None:
        self.job = job
        self.timeout_s = timeout_s
        self.limit_name = limit_name
        self.deadline = started + timeout_s
        self.position = Position(images=images, kind=kind)
        # The output the GPU thread is making; the coroutine may meanwhile be encoding the one before.
        self._denoising = 1
        self._stopped = threading.Event()
        self._progress = progress
        self._progress_lock = threading.Lock()
        self._last_update = started
        self._updates_sent = 0

    def check(self) -> None:
        """Raises JobStopped once the job was stopped, JobTimeout once it is past its deadline."""
        if self._stopped.is_set():
            raise JobStopped
        if time.monotonic() >= self.deadline:
            raise JobTimeout(
                f"the job passed its {self.timeout_s:g} s limit ({self.limit_name}) and was stopped "
                f"{self.position.describe()}"
            )

    def stop(self) -> None:
        """Tells the GPU thread to stop at its next step; safe from any thread, idempotent."""
        self._stopped.set()

    def wait_for_gpu(self) -> None:
        """The GPU is busy with another job: says so at once, as this job will wait at least that long."""
        self._report(self.position, at_once=True)

    def enter(self, stage: str, image: int | None = None) -> None:
        """The coroutine's side: the job reached `stage` (of output `image`, from 1), if it has time left."""
        self.check()
        self._move(replace(self.position, stage=stage, image=image or self.position.image))

    def begin_output(self, index: int) -> None:
        """The GPU thread's side, before it makes output `index` (from 0)."""
        self.check()
        self._denoising = min(index + 1, self.position.images)
        self._move(replace(self.position, stage="denoising", image=self._denoising, step=0, steps=0))

    def on_step(self, step: int, steps: int) -> None:
        """The pipelines' step-end callback: `step` of `steps` done. Raising here stops the pipeline before it
        decodes."""
        self._move(replace(self.position, stage="denoising", image=self._denoising, step=step, steps=steps))
        self.check()

    def _move(self, position: Position) -> None:
        # One assignment: a reader in the other thread sees the old position or the new one, never a mix.
        self.position = position
        self._report(position)

    def _report(self, position: Position, at_once: bool = False) -> None:
        if not self._progress or self._stopped.is_set():
            return
        now = time.monotonic()
        with self._progress_lock:
            if now - self._last_update < PROGRESS_INTERVAL_S and not at_once:
                return
            self._last_update = now
            self._updates_sent += 1
        try:
            # Looked up at each call, so that a test can record updates by replacing the SDK function.
            runpod.serverless.progress_update(self.job, position.as_progress())
        except Exception:
            log.warning("job %s: a progress update failed; the job goes on", self.job.get("id"), exc_info=True)

    async def settle_progress(self) -> None:
        """Waits until the last progress update has had time to land, so the result comes after it."""
        if self._updates_sent:
            await asyncio.sleep(max(0.0, self._last_update + PROGRESS_SETTLE_S - time.monotonic()))


class Handoff:
    """Outputs from the GPU thread to the job's coroutine, at most one waiting: the GPU makes output k+1 while k is
    encoded and delivered, and gets no further ahead, so a job's memory does not grow with its outputs."""

    _END = object()

    def __init__(self, control: JobControl) -> None:
        self.control = control
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.free = threading.Semaphore(1)

    def put(self, item: object) -> None:
        """GPU thread: hands `item` over, waiting while the one before still waits; raises if the job stops."""
        while not self.free.acquire(timeout=HANDOFF_POLL_S):
            self.control.check()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:
        """GPU thread, at its end whatever happened: no more outputs."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, self._END)

    async def get(self) -> Any | None:
        """The next output, or None when there are no more."""
        item = await self.queue.get()
        return None if item is self._END else item

    def taken(self) -> None:
        """The coroutine is done with an output: the GPU thread may hand over the next."""
        self.free.release()


class GpuThread:
    """The one thread GPU work runs in. A job's GPU work goes in as one task, so jobs never interleave on the GPU
    (the pipelines are shared and not thread-safe) and run in the order they asked."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        # Tasks submitted and not yet finished: counted up by event loops, down by the GPU thread.
        self.tasks = 0
        self.lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.tasks > 0

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        with self.lock:
            self.tasks += 1
        future = self.executor.submit(function, *args)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: Future[Any]) -> None:
        with self.lock:
            self.tasks -= 1


class Pending:
    """The threads and coroutines a job started: its GPU task, encodings, thumbnail deliveries, the upload wait,
    uploads. On the way out, whatever the reason, the job waits for them to end, through any further cancel, so that
    nothing of it runs or uploads afterwards and the next job never finds the GPU busy with this one."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []
        # Tasks of other threads' pools: cancelled on the way out if they have not begun.
        self.cancellable: list[Future[Any]] = []
        # Coroutines running beside the job's own: cancelled on the way out wherever they are.
        self.tasks: list[asyncio.Task[Any]] = []

    def track(self, future: Future[T]) -> asyncio.Future[T]:
        self.cancellable.append(future)
        wrapped = asyncio.wrap_future(future)
        self.futures.append(wrapped)
        return wrapped

    def offload(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Starts `function` in the loop's thread pool at once, and returns its result to await; a cancel stops the
        wait, not the thread, which `settle` then waits for."""
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self.futures.append(future)
        return asyncio.shield(future)

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Runs `coroutine` beside the caller, who awaits it; should the job end first, it is cancelled then."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.append(task)
        self.futures.append(task)
        return task

    async def settle(self) -> None:
        """Cancels what has not begun and waits for the rest; re-raises a cancel received meanwhile once all have
        ended. Their errors were either answered already or are moot."""
        for future in self.cancellable:
            # Only a task not yet begun is cancelled; a running one is waited for.
            future.cancel()
        for task in self.tasks:
            task.cancel()
        cancelled = False
        for future in self.futures:
            while not future.done():
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:
                    cancelled = True
            if not future.cancelled():
                future.exception()
        if cancelled:
            raise asyncio.CancelledError
