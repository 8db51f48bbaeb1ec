"""Returning the worker to a clean state between jobs, and the figures that show it is clean."""

from __future__ import annotations

import gc
import hashlib
import logging
import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch

from .errors import GpuStateLost, Internal, OutOfMemory, WorkerError

log = logging.getLogger(__name__)
# What CUDA, cuBLAS and cuDNN failures say: the device may be corrupt (an illegal address, a failed kernel), and
# every later CUDA call may fail again. Allocation failures among them are out-of-memory, which the job's clean-up
# recovers from.
GPU_FAILURE_MARKERS = ("cuda error", "cublas", "cudnn", "device-side assert", "illegal memory access")
OUT_OF_MEMORY_MARKERS = ("out of memory", "alloc_failed")
# The hooks of the components the memory plan offloads (pipelines/memory.py): each job ends with them in host memory.
OFFLOAD_HOOKS: list[Any] = []
# More objects than this surviving a collection are not a job's: they are what loading and warm-up made, or what the
# worker made once it began serving (the SDK's event loop and sessions, modules imported on first use), and they live
# as long as the worker. They are frozen out of every later collection, which would otherwise scan them all again
# after each job, with the GIL held while the job's last image is encoded (in the benchmark, 50,000 objects made
# after warm-up cost 30 ms a job). A job leaves a few hundred.
LATE_LONG_LIVED = 10_000


def classify_failure(error: BaseException) -> WorkerError:
    """An unexpected exception as the contract's error: out-of-memory anywhere (torch's own type, or a CUDA,
    cuBLAS or cuDNN error that says so) is retryable on this worker; any other CUDA, cuBLAS or cuDNN failure loses
    the GPU's trust; anything else is internal."""
    text = str(error).lower()
    if isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(marker in text for marker in OUT_OF_MEMORY_MARKERS)
    ):
        return OutOfMemory("the GPU ran out of memory; the worker freed it, retry or lower the size")
    if isinstance(error, RuntimeError) and any(marker in text for marker in GPU_FAILURE_MARKERS):
        return GpuStateLost("the GPU reported an error; this worker will be replaced")
    return Internal("unexpected error; the worker log has the details")


def release_memory() -> BaseException | None:
    """Frees what a finished job held: offloaded components back to host memory, then Python garbage, so that the
    CUDA allocator's blocks are really free, then the allocator's cache. Long-lived objects found meanwhile are
    frozen out of later collections (`_collect_garbage`).

    Never raises: it runs in `finally`, after the job's answer is made, and an error here would replace that answer.
    After a sticky CUDA error (an illegal address) every CUDA call fails again: the first failure is returned, for
    the worker to judge whether the GPU can still be trusted."""
    failure = None
    for step in [*(hook.offload for hook in OFFLOAD_HOOKS), _collect_garbage, _empty_cuda_cache]:
        try:
            step()
        except Exception as error:
            log.warning("clean-up step %s failed: %s", getattr(step, "__qualname__", step), error)
            failure = failure or error
    return failure


def _collect_garbage() -> None:
    """A full collection, then the survivors frozen if they are many (LATE_LONG_LIVED)."""
    gc.collect()
    # Frozen objects are not listed, so this costs little once the long-lived are frozen.
    if len(gc.get_objects()) > LATE_LONG_LIVED:
        gc.freeze()


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def memory_figures() -> dict[str, float]:
    """Memory in MiB: the process's peak resident size and, on CUDA, the device's use and capacity."""
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    peak_rss_mib = peak_rss_kib / 1024 if sys.platform != "darwin" else peak_rss_kib / 2**20
    figures = {"process_peak_rss_mib": round(peak_rss_mib, 1)}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        figures.update(
            cuda_allocated_mib=round(torch.cuda.memory_allocated() / 2**20, 1),
            cuda_reserved_mib=round(torch.cuda.memory_reserved() / 2**20, 1),
            cuda_free_mib=round(free / 2**20, 1),
            cuda_total_mib=round(total / 2**20, 1),
        )
    return figures


def weights_digest(modules: Iterable[torch.nn.Module]) -> str:
    """A sha256 over every parameter and buffer, by name: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
