"""The cold start's imports: what they cost beyond the libraries' own import time, cut without changing what gets
imported.

- The collector is paused while they run. Importing makes half a million objects that live as long as the worker
  (modules, classes, functions), and as they pile up the collector scans them again and again: 1.2 s of 5.8 s here.
  Afterwards they are frozen, out of every later collection's way; the few thousand objects of import-time cycles
  that died meanwhile stay with them rather than cost a full collection to find.
- runpod's debugger asks py-cpuinfo for the CPU's name when runpod is imported, and py-cpuinfo finds it in a Python
  process it starts for the purpose: 1.1 s. Asked in a thread of its own from the start, it runs while torch
  imports, and runpod's question is answered from there.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import cpuinfo


@contextmanager
def quick_imports() -> Iterator[None]:
    """Imports in its body run without the collector, with the CPU's name asked for in the background; what they
    made is frozen at its end."""
    probe = ThreadPoolExecutor(1, thread_name_prefix="cpuinfo")
    cpu_info = probe.submit(cpuinfo.get_cpu_info)
    # The thread ends once it has answered.
    probe.shutdown(wait=False)
    cpuinfo.get_cpu_info = cpu_info.result
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
