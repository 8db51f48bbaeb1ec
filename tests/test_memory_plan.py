"""The memory plan: placements for common GPU sizes from the manifest's real sizes, the sizes themselves read from
the weight files' headers, and the builder's checks of both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion_worker.config import Settings
from diffusion_worker.hygiene import OFFLOAD_HOOKS
from diffusion_worker.manifest import COMPLETE_MARKER, DEFAULT_MANIFEST, load_manifest
from diffusion_worker.pipelines.wan import WanFamily
from diffusion_worker.placement import Placement
from diffusion_worker.plan import (
    GIB,
    NOT_SERVED,
    OFFLOADED,
    RESERVE_BYTES,
    RESIDENT,
    STREAMED,
    TASK_ROLES,
    make_plan,
    peak_bytes,
    weights_from_manifest,
)
from diffusion_worker.schema import parse_input
from diffusion_worker.sizes import component_bytes, read_header, weight_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "builder"))
import fetch_models  # noqa: E402

MANIFEST = load_manifest()
ALL_TASKS = tuple(TASK_ROLES)
# What the default Docker image bakes: every role but the 14B image-to-video model.
IMAGE_TASKS = ("txt2img", "img2img", "controlnet_depth", "txt2video")
GPUS_GIB = (16, 24, 48, 80, 141)


def plan_for(gib: float, tasks: tuple[str, ...]):
    return make_plan(round(gib * GIB), weights_from_manifest(MANIFEST, tasks), tasks)


# --- the decision ------------------------------------------------------------------------------------------------


def test_the_issues_weight_totals() -> None:
    def total(tasks: tuple[str, ...]) -> int:
        return sum(w.nbytes for w in weights_from_manifest(MANIFEST, tasks))

    # The UMT5 encoder and VAE shared by the two WAN models count once: 71.4 GB less 11.87 GB. The SDXL refiner adds
    # its UNet (4.52 GB) and nothing else: it runs on the base's text encoder 2 and VAE.
    refiner = 4_520_000_000
    assert total(IMAGE_TASKS) == 24_246_000_000 + refiner
    assert total(ALL_TASKS) == 71_428_000_000 - 11_868_000_000 + refiner


@pytest.mark.parametrize("tasks", [ALL_TASKS, IMAGE_TASKS], ids=["all-roles", "default-image"])
@pytest.mark.parametrize("gib", GPUS_GIB)
def test_every_plan_fits_its_gpu_with_the_margin_for_the_largest_job(gib: int, tasks: tuple[str, ...]) -> None:
    plan = plan_for(gib, tasks)
    assert plan.served == set(tasks)
    weights = {w.key: w for w in plan.weights}
    for task in tasks:
        assert peak_bytes(plan, task) <= plan.capacity - RESERVE_BYTES, task
    everything = sum(w.nbytes for w in weights.values())
    worst_job = max(max(plan.peaks[task].activations.values()) for task in tasks)
    if everything + worst_job <= plan.capacity - RESERVE_BYTES:
        assert set(plan.placements.values()) == {RESIDENT}
        assert all(how == "all resident" for how in plan.tasks.values())
    else:
        assert RESIDENT in plan.placements.values() or gib <= 16
        assert plan.margin >= 0


def test_all_resident_where_it_fits() -> None:
    assert set(plan_for(80, ALL_TASKS).placements.values()) == {RESIDENT}
    assert set(plan_for(48, IMAGE_TASKS).placements.values()) == {RESIDENT}


def test_on_a_24_gib_card_the_text_encoder_goes_first_and_the_denoisers_stay() -> None:
    # The default image's roles: the optional SDXL refiner is not among them.
    manifest = replace(MANIFEST, roles={name: role for name, role in MANIFEST.roles.items() if name != "sdxl_refiner"})
    plan = make_plan(24 * GIB, weights_from_manifest(manifest, IMAGE_TASKS), IMAGE_TASKS)
    assert plan.placement_of("wan_t2v", "text_encoder") == OFFLOADED
    for role, name in [("sdxl", "unet"), ("wan_t2v", "transformer"), ("controlnet_depth", "controlnet")]:
        assert plan.placement_of(role, name) == RESIDENT
    assert plan.tasks["txt2img"] == "all resident"
    assert "wan_t2v/text_encoder offloaded" in plan.tasks["txt2video"]


def test_a_task_whose_largest_job_cannot_fit_is_not_served_and_says_why() -> None:
    plan = plan_for(8, ALL_TASKS)
    assert plan.served == {"txt2img", "img2img"}
    assert plan.tasks["img2video"].startswith(f"{NOT_SERVED}: its largest job (1280×720×81) needs ")
    assert plan.placement_of("wan_i2v", "transformer") == NOT_SERVED
    assert peak_bytes(plan, "txt2img") <= 8 * GIB - RESERVE_BYTES


def test_without_a_gpu_everything_is_resident_on_the_cpu() -> None:
    plan = make_plan(None, weights_from_manifest(MANIFEST, ALL_TASKS), ALL_TASKS)
    assert set(plan.placements.values()) == {RESIDENT} and plan.served == set(ALL_TASKS)
    assert plan.as_dict()["margin_bytes"] is None


def test_shared_components_are_one_copy_in_the_plan() -> None:
    plan = plan_for(141, ALL_TASKS)
    assert plan.shared_with("wan_i2v", "text_encoder") == "wan_t2v"
    assert plan.shared_with("wan_i2v", "vae") == "wan_t2v"
    assert plan.shared_with("wan_i2v", "transformer") is None
    [encoder] = [w for w in plan.weights if w.name == "text_encoder" and w.role.startswith("wan")]
    assert encoder.tasks == {"txt2video", "img2video"}


# --- the command line --------------------------------------------------------------------------------------------


def run_cli(*arguments: str) -> str:
    command = [sys.executable, "-m", "diffusion_worker.plan", *arguments]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def test_cli_prints_the_plan_as_json_and_text_without_torch() -> None:
    plan = json.loads(run_cli("--gpu-gib", "24", "--tasks", "txt2img,txt2video", "--json"))
    assert plan["gpu_bytes"] == 24 * GIB
    # The manifest's every role, the SDXL refiner's UNet (4.2 GiB) included: encoders and VAEs make room for it.
    assert {task: facts["served"] for task, facts in plan["tasks"].items()} == {
        "txt2img": "sdxl/text_encoder offloaded, sdxl/text_encoder_2 offloaded",
        "txt2video": "wan_t2v/text_encoder offloaded, wan_t2v/vae offloaded",
    }
    assert [c["component"] for c in plan["components"]][:3] == ["unet", "text_encoder", "text_encoder_2"]
    text = run_cli("--gpu-gib", "8")
    assert "img2video          1280×720×81" in text and "not served" in text
    # The plan is made without torch: a process that refuses to import it prints it all the same.
    guard = "import sys; sys.modules['torch'] = None; from diffusion_worker.plan import main; main(['--gpu-gib', '24'])"
    assert "margin" in subprocess.run([sys.executable, "-c", guard], check=True, capture_output=True, text=True).stdout


def test_the_readme_shows_the_plan_table_the_cli_prints() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for tasks in (",".join(IMAGE_TASKS), ",".join(ALL_TASKS)):
        table = run_cli("--gpu-gib", *map(str, GPUS_GIB), "--tasks", tasks, "--markdown")
        assert table.strip() in readme


# --- sizes from the files ----------------------------------------------------------------------------------------


def loaded_modules(worker) -> dict[tuple[str, str], torch.nn.Module]:
    sdxl = worker.families["txt2img"]
    wan = worker.families["txt2video"]
    modules = {("sdxl_vae", "vae"): sdxl.base.vae, ("controlnet_depth", "controlnet"): sdxl.controlnet}
    modules[("depth_estimator", "depth_estimator")] = sdxl.depth.model
    modules[("sdxl_refiner", "unet")] = sdxl.refiner_unet
    for name in ("unet", "text_encoder", "text_encoder_2"):
        modules[("sdxl", name)] = getattr(sdxl.base, name)
    for task, role in (("txt2video", "wan_t2v"), ("img2video", "wan_i2v")):
        for component in MANIFEST.role(role).components:
            modules[(role, component.name)] = getattr(wan.pipelines[task], component.name)
    return modules


def state_bytes(module: torch.nn.Module) -> int:
    # Tied weights (UMT5's shared embedding) appear under two names and take memory once.
    tensors = {tensor.data_ptr(): tensor for tensor in module.state_dict().values()}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def test_sizes_read_from_the_headers_equal_the_loaded_modules(worker, tiny_models_dir: Path) -> None:
    modules = loaded_modules(worker)
    assert len(modules) == sum(len(role.components) for role in MANIFEST.roles.values())
    for (role_name, name), module in modules.items():
        role = MANIFEST.role(role_name)
        folder = role.component_path(tiny_models_dir, role.component(name))
        assert component_bytes(folder, role.variant, "float32") == state_bytes(module), (role_name, name)
    # At half precision every floating tensor takes 2 bytes, as the loaded module's do.
    role = MANIFEST.role("sdxl")
    half = UNet2DConditionModel.from_pretrained(
        role.path(tiny_models_dir), subfolder="unet", variant=role.variant, dtype=torch.float16
    )
    assert component_bytes(role.path(tiny_models_dir) / "unet", role.variant, "float16") == state_bytes(half)


def test_a_header_is_read_without_the_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64)}, tmp_path / "model.safetensors")
    header = read_header(tmp_path / "model.safetensors")
    assert {name: (t["dtype"], t["shape"]) for name, t in header.items()} == {"a": ("F32", [3, 4]), "b": ("I64", [5])}
    # Floats at the runtime precision, integers as stored.
    assert component_bytes(tmp_path, None, "bfloat16") == 12 * 2 + 5 * 8
    (tmp_path / "model.fp16.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    assert component_bytes(tmp_path, "fp16", "float32") == 12 * 4 + 5 * 8
    with pytest.raises(ValueError, match="not a safetensors file"):
        component_bytes(tmp_path, None, "float32")


# --- the builder's checks ----------------------------------------------------------------------------------------


def test_the_tiny_wan_roles_share_byte_identical_encoder_tokenizer_and_vae(tiny_models_dir: Path) -> None:
    t2v, i2v = (MANIFEST.role(name).recorded_digests(tiny_models_dir) for name in ("wan_t2v", "wan_i2v"))
    for name in ("text_encoder", "tokenizer", "vae"):
        assert t2v[name] == i2v[name], name
    assert t2v["transformer"] != i2v["transformer"]
    assert MANIFEST.role("sdxl_vae").recorded_digests(tiny_models_dir).keys() == {"vae"}


def test_the_builder_checks_sizes_against_the_files(tiny_models_dir: Path, tmp_path: Path) -> None:
    role = MANIFEST.role("wan_t2v")
    # The real sizes do not match the tiny files: the check names the component and both sizes.
    with pytest.raises(RuntimeError, match=r"wan_t2v/transformer: the manifest records 2838000000 bytes at bfloat16"):
        fetch_models.check_sizes(role, tiny_models_dir)
    # A manifest that records the tiny sizes passes.
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8")
    for component in role.components:
        tiny = component_bytes(role.component_path(tiny_models_dir, component), role.variant, component.dtype)
        text = text.replace(
            f"{component.name} = {{ bytes = {component.nbytes:_}", f"{component.name} = {{ bytes = {tiny}"
        )
    (tmp_path / "manifest.toml").write_text(text, encoding="utf-8")
    fetch_models.check_sizes(load_manifest(tmp_path / "manifest.toml").role("wan_t2v"), tiny_models_dir)


def test_the_builder_refuses_a_shared_component_that_differs(tiny_models_dir: Path, tmp_path: Path) -> None:
    for name in ("wan_t2v", "wan_i2v"):
        shutil.copytree(MANIFEST.role(name).path(tiny_models_dir), MANIFEST.role(name).path(tmp_path), symlinks=True)
    selected = [MANIFEST.role("wan_i2v")]
    fetch_models.check_shared(MANIFEST, tmp_path, selected)
    marker = MANIFEST.role("wan_i2v").path(tmp_path) / COMPLETE_MARKER
    recorded = json.loads(marker.read_text())
    recorded["files"]["vae/config.json"]["sha256"] = "0" * 64
    marker.write_text(json.dumps(recorded))
    with pytest.raises(RuntimeError, match="wan_i2v/vae is not byte-identical to wan_t2v's"):
        fetch_models.check_shared(MANIFEST, tmp_path, selected)


def test_a_manifest_naming_a_missing_shared_component_is_refused(tmp_path: Path) -> None:
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8").replace(
        'vae = { same_as = "wan_t2v"', 'vae = { same_as = "sdxl"'
    )
    (tmp_path / "manifest.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="role 'wan_i2v': component 'vae' is the same as no other role's"):
        load_manifest(tmp_path / "manifest.toml")


def test_info_reports_the_plan_in_force(run_job) -> None:
    plan = run_job({"task": "info"})["memory_plan"]
    assert plan["gpu_bytes"] is None
    assert {facts["served"] for facts in plan["tasks"].values()} == {"all resident"}
    assert {component["placement"] for component in plan["components"]} == {RESIDENT}


# --- one copy of what two roles share ----------------------------------------------------------------------------

COUNT_MODULES = """
import gc, json, sys
from pathlib import Path
from diffusers import AutoencoderKLWan
from transformers import UMT5EncoderModel
from diffusion_worker.config import Settings
from diffusion_worker.runtime import Worker

worker = Worker.load(Settings(models_dir=Path(sys.argv[1]), worker_tasks=frozenset({"txt2video", "img2video"})))
gc.collect()
every = gc.get_objects()
counts = {cls.__name__: sum(isinstance(o, cls) for o in every) for cls in (UMT5EncoderModel, AutoencoderKLWan)}
print(json.dumps({"tasks": worker.tasks, **counts}))
"""


def test_both_wan_tasks_hold_one_umt5_encoder_and_one_vae_in_the_process(tiny_models_dir: Path) -> None:
    answer = subprocess.run(
        [sys.executable, "-c", COUNT_MODULES, str(tiny_models_dir)], check=True, capture_output=True, text=True
    )
    assert json.loads(answer.stdout.splitlines()[-1]) == {
        "tasks": ["img2video", "txt2video"],
        "UMT5EncoderModel": 1,
        "AutoencoderKLWan": 1,
    }


def test_the_video_pipelines_share_the_encoder_tokenizer_and_vae(worker) -> None:
    family = worker.families["txt2video"]
    t2v, i2v = family.pipelines["txt2video"], family.pipelines["img2video"]
    for name in ("text_encoder", "tokenizer", "vae"):
        assert getattr(t2v, name) is getattr(i2v, name), name
        assert getattr(family.pipeline_for("img2video", 64, 64), name) is getattr(t2v, name)
    assert t2v.transformer is not i2v.transformer


def test_offloaded_and_streamed_components_give_the_same_video(worker, tiny_models_dir: Path) -> None:
    """The plan's hooks, wired on the CPU: an offloaded text encoder and VAE, a streamed transformer, and the same
    frames as the resident worker's."""
    settings = Settings(models_dir=tiny_models_dir)
    placement = Placement.from_settings(settings).planned(MANIFEST, tiny_models_dir, ["txt2video"])
    placements = dict(placement.plan.placements)
    for w in placement.plan.weights:
        placements[w.key] = STREAMED if w.name == "transformer" else OFFLOADED
    forced = replace(placement, plan=replace(placement.plan, placements=placements))
    hooks_before = len(OFFLOAD_HOOKS)
    try:
        family = WanFamily.load(settings, MANIFEST, forced, frozenset({"txt2video"}))
        pipeline = family.pipelines["txt2video"]
        assert hasattr(pipeline.text_encoder, "_hf_hook") and hasattr(pipeline.vae, "_hf_hook")
        assert len(OFFLOAD_HOOKS) == hooks_before + 2
        job = {"task": "txt2video", "prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64}
        request = family.resolve(parse_input({**job, "num_frames": 5}), {})
        [offloaded] = family.generate(request, 3, {})
        [resident] = worker.families["txt2video"].generate(request, 3, {})
        assert np.array_equal(offloaded.frames, resident.frames)
    finally:
        del OFFLOAD_HOOKS[hooks_before:]


@pytest.mark.parametrize("role_name", ["sdxl", "depth_estimator", "wan_i2v"])
def test_the_manifests_sizes_agree_with_the_hubs_recorded_files(role_name: str, tmp_path: Path) -> None:
    """The hub's listings (tests/data/hub_listings) give the real weight files' sizes: each component's manifest
    size is theirs at the stored precision, or half or twice it where the runtime's precision differs."""
    role = MANIFEST.role(role_name)
    listing = json.loads((REPO / "tests" / "data" / "hub_listings" / f"{role_name}.json").read_text())
    for component in role.components:
        if component.same_as:
            continue
        folder = tmp_path / component.name
        folder.mkdir()
        prefix = "" if len(role.components) == 1 else f"{component.name}/"
        sizes = {}
        for entry in listing["files"]:
            name = entry["path"].removeprefix(prefix)
            if entry["path"].startswith(prefix) and "/" not in name and name.endswith(".safetensors"):
                sizes[name] = entry["size"]
                (folder / name).touch()
        stored = sum(sizes[path.name] for path in weight_files(folder, role.variant))
        ratio = component.nbytes / stored
        assert any(abs(ratio - scale) < 0.01 * scale for scale in (0.5, 1, 2)), (component.name, ratio)
