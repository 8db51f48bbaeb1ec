"""builder/fetch_models.py: the tiny build is deterministic, resumable and loads with the real consumers; the
download path fetches exactly what the tiny build imitates."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_worker.manifest import COMPLETE_MARKER, load_manifest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "builder"))
import fetch_models  # noqa: E402
import hub_files  # noqa: E402

MANIFEST = load_manifest(fetch_models.MANIFEST)


def digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


# --- building ---------------------------------------------------------------------------------------------------


def test_tiny_build_is_byte_identical_across_processes(tmp_path: Path, tiny_models_dir: Path) -> None:
    # tiny_models_dir was built by the CLI in another process (conftest): same bytes, whatever the hash seed.
    fetch_models.build_tiny(tmp_path)
    assert digests(tmp_path) == digests(tiny_models_dir)


def test_every_role_and_lora_of_the_manifest_is_built(tiny_models_dir: Path) -> None:
    for role in MANIFEST.roles.values():
        assert role.is_complete(tiny_models_dir), role.name
    for lora in MANIFEST.loras.values():
        assert lora.path(tiny_models_dir).is_file(), lora.name


def test_tiny_folders_hold_exactly_the_files_the_real_download_would_fetch(tiny_models_dir: Path) -> None:
    for role in MANIFEST.roles.values():
        folder = role.path(tiny_models_dir)
        names = sorted(name for name in digests(folder) if name != COMPLETE_MARKER)
        index = folder / hub_files.MODEL_INDEX
        model_index = json.loads(index.read_text()) if index.is_file() else None
        listing = [hub_files.RemoteFile(name) for name in names]
        selected = hub_files.select(listing, model_index, role.variant, role.skip_components)
        assert [file.path for file in selected] == names, role.name


def test_wan_roles_store_their_identical_components_once(tiny_models_dir: Path) -> None:
    t2v, i2v = (MANIFEST.role(name).path(tiny_models_dir) for name in ("wan_t2v", "wan_i2v"))
    linked = {path.relative_to(i2v).as_posix() for path in i2v.rglob("*") if path.is_symlink()}
    assert {"text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= linked
    assert not any(path.is_symlink() for path in t2v.rglob("*"))
    for name in linked:
        # Relative links, so they resolve wherever the models folder is mounted; the marker records the digests.
        assert not (i2v / name).readlink().is_absolute()
        assert (i2v / name).resolve() == (t2v / name).resolve()
    recorded = [json.loads((folder / COMPLETE_MARKER).read_text())["files"] for folder in (t2v, i2v)]
    assert recorded[1]["text_encoder/model.safetensors"] == recorded[0]["text_encoder/model.safetensors"]


def test_second_run_skips_present_roles_and_loras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetch_models.build_tiny(tmp_path, ["sdxl_vae", "wan_t2v"])
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    import tiny

    def refuse(*args: object) -> None:
        raise AssertionError("a present role or LoRA was built again")

    monkeypatch.setattr(tiny, "build_role", refuse)
    monkeypatch.setattr(tiny, "write_lora", refuse)
    fetch_models.build_tiny(tmp_path, ["sdxl_vae", "wan_t2v"])
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()} == before
    # Only the selected roles' LoRA families, and no scratch folders left beside the LoRA files.
    assert sorted(path.name for path in (tmp_path / "loras").iterdir()) == ["wan_t2v"]
    assert [path.name for path in (tmp_path / "loras" / "wan_t2v").iterdir()] == ["causvid.safetensors"]


def test_cli_second_run_skips_without_building(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "builder" / "fetch_models.py"), "--tiny", "--models-dir", str(tmp_path)]
    command += ["--roles", "depth_estimator"]
    subprocess.run(command, check=True, capture_output=True)
    before = digests(tmp_path)
    second = subprocess.run(command, check=True, capture_output=True, text=True)
    assert "depth_estimator: present" in second.stderr
    assert digests(tmp_path) == before


@pytest.mark.parametrize("marker", [None, "another revision"])
def test_incomplete_or_outdated_role_is_rebuilt_from_scratch(tmp_path: Path, marker: str | None) -> None:
    fetch_models.build_tiny(tmp_path, ["sdxl_vae"])
    folder = MANIFEST.role("sdxl_vae").path(tmp_path)
    complete = digests(folder)
    # What a build killed halfway leaves (no marker), or one made for another revision: stray and stale files.
    (folder / COMPLETE_MARKER).unlink()
    if marker:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"revision": marker, "tiny": True}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    (folder / "stray.tmp").write_bytes(b"x")
    fetch_models.build_tiny(tmp_path, ["sdxl_vae"])
    assert digests(folder) == complete


def test_tiny_build_never_replaces_downloaded_weights(tmp_path: Path) -> None:
    role = MANIFEST.role("sdxl_vae")
    role.path(tmp_path).mkdir(parents=True)
    (role.path(tmp_path) / COMPLETE_MARKER).write_text(fetch_models.marker_text(role, tiny=False, files={}))
    with pytest.raises(RuntimeError, match="downloaded weights"):
        fetch_models.build_tiny(tmp_path, ["sdxl_vae"])


def test_unknown_role_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fetch_models.main(["--tiny", "--models-dir", str(tmp_path), "--roles", "sdxl,flux"])
    assert exit_info.value.code == 2


# --- consumers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tiny_models_dir: Path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    base = MANIFEST.role("sdxl")
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        base.path(tiny_models_dir),
        vae=AutoencoderKL.from_pretrained(MANIFEST.role("sdxl_vae").path(tiny_models_dir)),
        # The tiny folder has the real repo's files: fp16-variant names only.
        variant=base.variant,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sdxl_image(pipeline) -> np.ndarray:
    output = pipeline(
        prompt="a photo of a cat",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=generator(),
        output_type="np",
    )
    return output.images[0]


def test_sdxl_generates_a_varied_image(sdxl) -> None:
    image = sdxl_image(sdxl)
    assert image.shape == (64, 64, 3)
    assert not np.isnan(image).any()
    assert image.std() > 0.05
    assert sdxl.tokenizer.model_max_length == 77
    assert sdxl.unet.config.sample_size * sdxl.vae_scale_factor == 256


def test_sdxl_loras_change_the_image_and_unload_to_the_base(sdxl, tiny_models_dir: Path) -> None:
    base = sdxl_image(sdxl)
    names = [lora.name for lora in MANIFEST.loras.values() if lora.family == "sdxl"]
    images = []
    try:
        for name in names:
            sdxl.load_lora_weights(str(MANIFEST.loras[name].path(tiny_models_dir)), adapter_name=name)
        # The tiny LoRAs adapt the text encoders as well as the UNet, like real SDXL LoRAs often do.
        assert any("lora" in parameter for parameter, _ in sdxl.text_encoder_2.named_parameters())
        for name in names:
            sdxl.set_adapters([name], adapter_weights=[1.0])
            images.append(sdxl_image(sdxl))
    finally:
        sdxl.unload_lora_weights()
    for image in images:
        assert np.abs(image - base).max() > 0.05
    assert np.abs(images[0] - images[1]).max() > 0.05
    assert np.array_equal(sdxl_image(sdxl), base)


def test_controlnet_matches_the_unet_and_follows_its_control_image(sdxl, tiny_models_dir: Path) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    role = MANIFEST.role("controlnet_depth")
    controlnet = ControlNetModel.from_pretrained(role.path(tiny_models_dir), variant=role.variant)
    pipeline = StableDiffusionXLControlNetPipeline.from_pipe(sdxl, controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))).convert("RGB")
    images = [
        pipeline(
            prompt="a house",
            image=control,
            width=64,
            height=64,
            num_inference_steps=2,
            generator=generator(),
            output_type="np",
        ).images[0]
        for control in (gradient, Image.new("RGB", (64, 64)))
    ]
    assert np.abs(images[0] - images[1]).max() > 0.01


def test_depth_estimator_returns_a_depth_map_of_the_input_size(tiny_models_dir: Path) -> None:
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=str(MANIFEST.role("depth_estimator").path(tiny_models_dir)))
    depth = estimator(Image.new("RGB", (96, 64), (200, 120, 40)))["depth"]
    assert (depth.mode, depth.size) == ("L", (96, 64))


def wan_video(pipeline, **inputs: object) -> np.ndarray:
    output = pipeline(
        num_frames=5,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=generator(),
        output_type="np",
        **inputs,
    )
    return output.frames[0]


def test_wan_t2v_generates_and_its_lora_changes_the_video(tiny_models_dir: Path) -> None:
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(MANIFEST.role("wan_t2v").path(tiny_models_dir))
    pipeline.set_progress_bar_config(disable=True)
    base = wan_video(pipeline, prompt="a cat")
    assert base.shape == (5, 64, 64, 3)
    assert not np.isnan(base).any()
    (lora,) = (lora for lora in MANIFEST.loras.values() if lora.family == "wan_t2v")
    pipeline.load_lora_weights(str(lora.path(tiny_models_dir)), adapter_name=lora.name)
    assert np.abs(wan_video(pipeline, prompt="a cat") - base).max() > 0.01


def test_wan_i2v_generates_from_an_image(tiny_models_dir: Path) -> None:
    from diffusers import WanImageToVideoPipeline

    pipeline = WanImageToVideoPipeline.from_pretrained(MANIFEST.role("wan_i2v").path(tiny_models_dir))
    pipeline.set_progress_bar_config(disable=True)
    # Prompt embeddings are passed in: diffusers 0.42.1's I2V prompt cleaning calls ftfy even when it is absent.
    tokens = pipeline.tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        embeddings = pipeline.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    video = wan_video(
        pipeline,
        image=Image.new("RGB", (64, 64), (30, 90, 200)),
        prompt_embeds=embeddings,
        negative_prompt_embeds=embeddings,
    )
    assert video.shape == (5, 64, 64, 3)
    assert not np.isnan(video).any()
