"""Returning the worker to a clean state between jobs, and the figures that show it is clean."""

from __future__ import annotations

import gc
import hashlib
import resource
import sys
from collections.abc import Iterable

import torch


def release_memory() -> None:
    """Frees what a finished job held: Python garbage first, so the CUDA allocator's blocks are really free."""
    gc.collect()
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
