"""Start-up as RunPod runs it: the fitness check that ends a worker which cannot serve (run on CPU here: the CUDA
probe itself needs a GPU), and models read from a network volume mounted read-only, which nothing writes to."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from diffusion_worker.config import Settings
from diffusion_worker.fitness import UnfitWorker, check_fitness, cuda_problems
from diffusion_worker.manifest import load_manifest
from diffusion_worker.runtime import Worker

MANIFEST = load_manifest()


def chmod_tree(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | 0o200 if writable else mode & ~0o222)


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry under `root`, links as links: a new, changed or removed file changes it."""
    return {
        path.relative_to(root).as_posix(): (path.is_symlink(), path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def volume(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny models as a network volume mounted read-only: a copy with its links, write permission removed."""
    root = tmp_path_factory.mktemp("runpod-volume") / "models"
    shutil.copytree(tiny_models_dir, root, symlinks=True)
    chmod_tree(root, writable=False)
    yield root
    chmod_tree(root, writable=True)


def test_a_read_only_volume_serves_and_is_never_written(volume: Path) -> None:
    before = snapshot(volume)
    # img2video loads the I2V role, whose shared components are links into the T2V role's folder.
    env = {"MODELS_DIR": str(volume), "WORKER_TASKS": "txt2img,img2video"}
    worker = Worker.load(Settings.from_env(env))
    assert worker.tasks == ["img2video", "txt2img"]
    check_fitness(worker)
    assert worker.info()["tasks"] == ["img2video", "txt2img"]
    # As root the permissions do not stop a write, so the tree itself is compared: no lock, cache or marker added.
    assert snapshot(volume) == before


def test_the_handler_registers_the_fitness_check_and_a_healthy_worker_passes(handler_module: ModuleType) -> None:
    from runpod.serverless.modules.rp_fitness import _fitness_checks

    assert handler_module.gpu_and_models_ready in _fitness_checks
    # DEVICE=auto on a CPU machine: nothing is expected of CUDA, and every model loaded.
    handler_module.gpu_and_models_ready()


@pytest.fixture
def sdxl_worker(tiny_models_dir: Path, tmp_path: Path) -> Worker:
    for name in ("sdxl", "sdxl_vae"):
        shutil.copytree(MANIFEST.role(name).path(tiny_models_dir), MANIFEST.role(name).path(tmp_path))
    return Worker.load(Settings.from_env({"MODELS_DIR": str(tmp_path), "WORKER_TASKS": "txt2img"}))


def test_the_fitness_check_fails_a_worker_whose_models_went_missing(sdxl_worker: Worker) -> None:
    check_fitness(sdxl_worker)
    # A network volume that was not mounted, or lost a file after the load.
    shutil.rmtree(MANIFEST.role("sdxl_vae").path(sdxl_worker.settings.models_dir))
    with pytest.raises(UnfitWorker, match="model sdxl_vae is missing or incomplete"):
        check_fitness(sdxl_worker)


def test_the_fitness_check_fails_a_worker_whose_weights_did_not_load(sdxl_worker: Worker) -> None:
    sdxl_worker.families["txt2img"].base.unet.to("meta")
    with pytest.raises(UnfitWorker, match=r"UNet2DConditionModel \(txt2img\) has weights that did not load"):
        check_fitness(sdxl_worker)


def test_cuda_is_expected_only_when_device_is_cuda(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = dataclasses.replace(worker.settings, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_problems(dataclasses.replace(worker.settings, device="auto"), worker.placement) == []
    assert cuda_problems(cuda, worker.placement) == [
        "DEVICE=cuda, but torch sees no CUDA device (no GPU, driver or container runtime)"
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_problems(cuda, worker.placement) == ["DEVICE=cuda, but the pipelines were loaded on cpu"]


# A fresh process, whose imports are the worker's cold start: which cpuinfo probes run, and what the collector does.
QUICK_IMPORTS = """
import gc, json, subprocess
import cpuinfo
probes = []
popen = subprocess.Popen
def counted(command, *args, **kwargs):
    probes.extend([command] if "cpuinfo" in str(command) else [])
    return popen(command, *args, **kwargs)
subprocess.Popen = counted
from diffusion_worker.startup import quick_imports
with quick_imports():
    paused = not gc.isenabled()
    import runpod
from runpod.serverless.utils import rp_debugger
print(json.dumps({
    "paused": paused, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "probes": len(probes),
    "runpod_cpu": rp_debugger.PROCESSOR, "cpu": cpuinfo.get_cpu_info()["brand_raw"],
}))
"""


def test_imports_run_without_the_collector_and_runpod_asks_for_the_cpu_once_in_the_background() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", QUICK_IMPORTS], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert seen["paused"] and seen["enabled"]
    # What runpod's import made is frozen, out of every later collection.
    assert seen["frozen"] > 50_000
    # One probe, the background one, answered runpod's import and answers later questions.
    assert seen["probes"] == 1
    assert seen["runpod_cpu"] == seen["cpu"] != ""
