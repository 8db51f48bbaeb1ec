"""The real download, with the hub faked (this machine cannot reach it): which files of each repo are fetched, given
listings of the real repos recorded at the pinned revisions (tests/data/hub_listings, each naming its sources), and
that a folder is marked complete only when every file is there with the size and digest the hub records."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.hf_api import RepoFile

from diffusion_worker.manifest import COMPLETE_MARKER, load_manifest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "builder"))
import fetch_models  # noqa: E402
import hub_files  # noqa: E402

MANIFEST = load_manifest(fetch_models.MANIFEST)
LISTINGS = REPO / "tests" / "data" / "hub_listings"
TOKENIZER_FILES = ["special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]
UMT5 = [f"text_encoder/model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
WAN_SHARED = [
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    *UMT5,
    "text_encoder/model.safetensors.index.json",
    *(f"tokenizer/{name}" for name in TOKENIZER_FILES),
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
CLIP_TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
# What each pipeline loads, and so all the builder may fetch.
NEEDED = {
    "sdxl": [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        *(f"tokenizer/{name}" for name in CLIP_TOKENIZER_FILES),
        *(f"tokenizer_2/{name}" for name in CLIP_TOKENIZER_FILES),
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ],
    "sdxl_vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "controlnet_depth": ["config.json", "diffusion_pytorch_model.fp16.safetensors"],
    "depth_estimator": ["config.json", "model.safetensors", "preprocessor_config.json"],
    "wan_t2v": sorted(
        [
            "model_index.json",
            *WAN_SHARED,
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
        ]
    ),
    "wan_i2v": sorted(
        [
            "model_index.json",
            *WAN_SHARED,
            "image_encoder/config.json",
            "image_encoder/model.safetensors",
            "image_processor/preprocessor_config.json",
            "transformer/config.json",
            *(f"transformer/diffusion_pytorch_model-{k:05d}-of-00014.safetensors" for k in range(1, 15)),
            "transformer/diffusion_pytorch_model.safetensors.index.json",
        ]
    ),
}


def recorded(role_name: str) -> dict:
    return json.loads((LISTINGS / f"{role_name}.json").read_text())


def as_listing(entries: list[dict]) -> list[hub_files.RemoteFile]:
    return [hub_files.RemoteFile(entry["path"], entry.get("size"), entry.get("sha256")) for entry in entries]


# --- selection --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role_name", sorted(NEEDED))
def test_selection_from_the_recorded_listing_is_what_the_pipeline_loads(role_name: str) -> None:
    role = MANIFEST.role(role_name)
    listing = recorded(role_name)
    assert (listing["repo_id"], listing["revision"]) == (role.repo_id, role.revision)
    files = as_listing(listing["files"] + listing["unverified_files"])
    selected = hub_files.select(files, listing["model_index"], role.variant, role.skip_components)
    assert [file.path for file in selected] == NEEDED[role_name]


def test_sdxl_selection_leaves_the_replaced_vae_checkpoints_and_other_formats_on_the_hub() -> None:
    listing = recorded("sdxl")
    selected = hub_files.select(as_listing(listing["files"]), listing["model_index"], "fp16", ["vae"])
    # 6.77 GB of a 76.9 GB repo: no vae/, vae_1_0/, ONNX, Flax, OpenVINO, fp32 copies or single-file checkpoints.
    assert sum(file.size for file in selected) == 6_773_861_396
    assert sum(file.size for file in as_listing(listing["files"])) == 76_914_595_874


def test_sharded_variant_weights_are_selected_with_their_index() -> None:
    names = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.bin",
    ]
    model_index = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    selected = hub_files.select(as_listing([{"path": name} for name in names]), model_index, "fp16")
    # The fp16 shards where the folder has them; the plain weights where it has no fp16 ones.
    assert [file.path for file in selected] == [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        (["unet/config.json", "unet/diffusion_pytorch_model.bin"], "none in safetensors"),
        (["unet/config.json"], None),
        (
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model-00001-of-00003.safetensors",
                "unet/diffusion_pytorch_model-00003-of-00003.safetensors",
                "unet/diffusion_pytorch_model.safetensors.index.json",
            ],
            "do not form a set",
        ),
        (["unet/config.json", "unet/diffusion_pytorch_model-00001-of-00001.safetensors"], "without their index"),
        (["text_encoder/config.json"], "no files for this component"),
    ],
)
def test_a_component_without_loadable_weights_is_refused_before_any_download(
    names: list[str], complaint: str | None
) -> None:
    listing = as_listing([{"path": "model_index.json"}] + [{"path": name} for name in names])
    model_index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    if complaint is None:
        # A folder with a config and no weights of any kind is a component without weights (a scheduler's is).
        assert [file.path for file in hub_files.select(listing, model_index, None)][-1] == "unet/config.json"
        return
    if "no files" in complaint:
        model_index = {"unet": model_index["unet"], "tokenizer": ["transformers", "CLIPTokenizer"]}
        listing = as_listing([{"path": "model_index.json"}, {"path": "unet/config.json"}])
    with pytest.raises(hub_files.IncompleteError, match=complaint):
        hub_files.select(listing, model_index, None)


# --- downloading from a fake hub serving the tiny models' bytes --------------------------------------------------


class FakeHub:
    """Serves each role's tiny folder as its repo at the pinned revision, with the metadata the real hub lists (LFS
    SHA-256 for weights, git blob ids for small files) and files the worker does not load beside them."""

    def __init__(self, tiny_models_dir: Path) -> None:
        self.repos = {(role.repo_id, role.revision): role.path(tiny_models_dir) for role in MANIFEST.roles.values()}
        self.downloads: list[tuple[str, str]] = []
        self.corrupt: set[str] = set()
        self.lost: set[str] = set()

    def files(self, repo_id: str, revision: str) -> dict[str, bytes]:
        folder = self.repos[(repo_id, revision)]
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in folder.rglob("*")
            if path.is_file() and path.name != COMPLETE_MARKER
        }
        return {**files, "README.md": b"# model card", "single_file_checkpoint.safetensors": b"not loaded"}

    def list_repo_tree(self, repo_id: str, *, revision: str, recursive: bool) -> list[RepoFile]:
        assert recursive
        entries = []
        for path, data in self.files(repo_id, revision).items():
            entry = {"type": "file", "path": path, "size": len(data)}
            entry["oid"] = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
            if path.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(RepoFile(**entry))
        return entries

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str, local_dir: Path) -> str:
        self.downloads.append((repo_id, filename))
        data = self.files(repo_id, revision)[filename]
        target = Path(local_dir, filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Broken transfers: right name, wrong bytes; or reported done and nothing written.
        if filename not in self.lost:
            target.write_bytes(data[:-1] + b"x" if filename in self.corrupt else data)
        Path(local_dir, ".cache", "huggingface").mkdir(parents=True, exist_ok=True)
        return str(target)


@pytest.fixture
def hub(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(tiny_models_dir)
    # A bound method as a class attribute is called without the HfApi instance.
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", fake.list_repo_tree)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    # It serves the tiny models, not the real sizes the manifest records: the size check is tested on its own
    # (tests/test_memory_plan.py).
    monkeypatch.setattr(fetch_models, "check_sizes", lambda role, models_dir: None)
    return fake


def tree(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }


def test_download_fetches_only_what_loads_verifies_it_and_stores_shared_files_once(
    hub: FakeHub, tiny_models_dir: Path, tmp_path: Path
) -> None:
    fetch_models.fetch(tmp_path, ["wan_t2v", "wan_i2v"])
    for name in ("wan_t2v", "wan_i2v"):
        role = MANIFEST.role(name)
        # The same files and bytes as the tiny build, no README or single-file checkpoint, no resume bookkeeping.
        assert tree(role.path(tmp_path)) == tree(role.path(tiny_models_dir))
        assert not (role.path(tmp_path) / ".cache").exists()
        assert role.is_complete(tmp_path)
        assert json.loads((role.path(tmp_path) / COMPLETE_MARKER).read_text())["source"]["tiny"] is False
    i2v = MANIFEST.role("wan_i2v")
    folder = i2v.path(tmp_path)
    linked = {path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors") if path.is_symlink()}
    # The I2V repo's UMT5 and VAE weights are the T2V repo's bytes: linked, never downloaded.
    assert {"text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= linked
    assert not {(i2v.repo_id, name) for name in linked} & set(hub.downloads)
    # CausVid is unpinned and non-commercial: not baked unless named.
    (causvid,) = (lora for lora in MANIFEST.loras.values() if lora.family == "wan_t2v")
    assert not causvid.path(tmp_path).exists()


def test_a_lora_not_baked_by_default_is_fetched_when_named(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (causvid,) = (lora for lora in MANIFEST.loras.values() if lora.family == "wan_t2v")
    assert not causvid.baked_by_default
    assert all(lora.baked_by_default for lora in MANIFEST.loras.values() if lora.family == "sdxl")

    def download_lora(lora, scratch: Path) -> Path:
        assert (lora.repo_id, lora.revision) == (causvid.repo_id, causvid.revision)
        (scratch / "lora.safetensors").write_bytes(b"lora")
        return scratch / "lora.safetensors"

    monkeypatch.setattr(fetch_models, "download_lora", download_lora)
    fetch_models.main(["--models-dir", str(tmp_path), "--roles", "wan_t2v", "--loras", "causvid"])
    assert causvid.path(tmp_path).read_bytes() == b"lora"


@pytest.mark.parametrize("broken", ["transformer/diffusion_pytorch_model.safetensors", "transformer/config.json"])
def test_a_file_that_differs_from_the_hub_record_leaves_the_role_incomplete(
    hub: FakeHub, tmp_path: Path, broken: str
) -> None:
    hub.corrupt.add(broken)
    with pytest.raises(hub_files.IncompleteError, match=broken.split("/")[-1]):
        fetch_models.fetch(tmp_path, ["wan_t2v"])
    role = MANIFEST.role("wan_t2v")
    assert not (role.path(tmp_path) / COMPLETE_MARKER).exists()
    assert not role.is_complete(tmp_path)


def test_a_component_folder_missing_its_weights_is_not_marked_complete(hub: FakeHub, tmp_path: Path) -> None:
    hub.lost.add("vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(hub_files.IncompleteError, match="missing after download"):
        fetch_models.fetch(tmp_path, ["wan_t2v"])
    assert not MANIFEST.role("wan_t2v").is_complete(tmp_path)


def test_a_complete_folder_that_loses_a_file_is_no_longer_complete(tiny_models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models_dir, tmp_path / "models", symlinks=True)
    models = tmp_path / "models"
    t2v, i2v = MANIFEST.role("wan_t2v"), MANIFEST.role("wan_i2v")
    assert t2v.is_complete(models) and i2v.is_complete(models)
    # The I2V folder links to T2V's encoder: removing the T2V role breaks I2V too, and the check sees it.
    shutil.rmtree(t2v.path(models))
    assert not i2v.is_complete(models)


def test_a_preset_fetches_its_roles_only(hub: FakeHub, tmp_path: Path) -> None:
    fetch_models.main(["--models-dir", str(tmp_path), "--preset", "video-only"])
    assert sorted(role.name for role in MANIFEST.roles.values() if role.is_complete(tmp_path)) == ["wan_t2v"]
    assert {repo_id for repo_id, _ in hub.downloads} == {MANIFEST.role("wan_t2v").repo_id}
