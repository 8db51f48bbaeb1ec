"""RunPod serverless entry point. Importing this module loads every pipeline and warms it up (the cold start); the
worker loop starts only when it runs as a script, so tests and tools can import `handler` without starting it."""

from __future__ import annotations

import logging
from typing import Any

from diffusion_worker.startup import quick_imports

with quick_imports():
    from diffusion_worker.config import Settings
    from diffusion_worker.fitness import check_fitness
    from diffusion_worker.runtime import Worker

    # isort: split
    # After the worker's modules, torch first: runpod asks for the CPU's name (startup.py), found meanwhile.
    import runpod

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
worker = Worker.load(settings)
worker.warm_up()


@runpod.serverless.register_fitness_check
def gpu_and_models_ready() -> None:
    """Run by the SDK on RunPod before the first job: an unusable GPU or a model that did not load ends the worker."""
    check_fitness(worker)


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    # Async, so that RunPod's cancel reaches the job and WORKER_CONCURRENCY jobs overlap their I/O with the GPU.
    return await worker.run(job)


def concurrency(current: int) -> int:
    return settings.worker_concurrency


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency})
