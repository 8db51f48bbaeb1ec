"""Puts the manifest's models into the models folder: pinned downloads for the Docker image, or tiny random-weight
stand-ins, built offline in the same layout, for tests and local runs.

    python builder/fetch_models.py [--models-dir DIR] [--preset image-only | --roles sdxl,...] [--loras causvid]
    python builder/fetch_models.py --tiny [--models-dir DIR] [--roles ...]                           # offline

A download takes only the files the worker loads (builder/hub_files.py), checks each against the size and SHA-256
the hub records, and checks every component folder for its weights. A role folder counts as present once its
completion marker is written, which happens last: an interrupted download or build lacks it and is redone. A file
byte-identical to one of a role fetched before it (the WAN repos share their UMT5 encoder, tokenizer and VAE) is a
relative symlink to that file, so it is stored, and downloaded, once.

LoRA files are renamed into place whole, so a LoRA file that exists is complete. LoRAs are fetched for the families
whose role is selected: by default those pinned to a commit and free for commercial use; --loras names others.
The tiny build makes every LoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from hub_files import MODEL_INDEX, RemoteFile, select, sha256_of, verify

from diffusion_worker.manifest import COMPLETE_MARKER, LoraSource, Manifest, ModelRole, load_manifest
from diffusion_worker.sizes import component_bytes

REPO = Path(__file__).resolve().parents[1]
# The manifest beside this script's folder: /app/models/manifest.toml in the image, models/ in a checkout.
MANIFEST = REPO / "models" / "manifest.toml"
# The manifest's component sizes come from parameter counts given to three digits: a file off by more is another
# model or another precision than the manifest says.
SIZE_TOLERANCE = 0.03
# The images CI builds, by the roles they bake (README, "Deploy": image sizes and GPU memory). None: every role;
# "none" bakes nothing, for an image that reads its models from a network volume.
PRESETS: dict[str, tuple[str, ...] | None] = {
    "image-only": ("sdxl", "sdxl_vae", "controlnet_depth", "depth_estimator"),
    "video-only": ("wan_t2v",),
    "all": None,
    "none": (),
}

log = logging.getLogger("fetch_models")


def source_of(role: ModelRole, tiny: bool) -> dict:
    """Where a folder's files came from: a folder built for another revision, or tiny instead of real, is not
    present."""
    return {"repo_id": role.repo_id, "revision": role.revision, "variant": role.variant, "tiny": tiny}


def marker_text(role: ModelRole, tiny: bool, files: dict[str, dict]) -> str:
    return json.dumps({"source": source_of(role, tiny), "files": files}, indent=1, sort_keys=True) + "\n"


def select_roles(manifest: Manifest, names: Iterable[str] | None) -> list[ModelRole]:
    if names is None:
        return list(manifest.roles.values())
    names = list(names)
    unknown = [name for name in names if name not in manifest.roles]
    if unknown:
        raise ValueError(f"unknown roles {', '.join(unknown)}; the manifest has {', '.join(manifest.roles)}")
    return [manifest.roles[name] for name in names]


def hub_listing(role: ModelRole) -> list[RemoteFile]:
    """Every file of the role's repo at its pinned revision, with the sizes and digests the hub records."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    entries = HfApi().list_repo_tree(role.repo_id, revision=role.revision, recursive=True)
    return [
        RemoteFile(entry.path, entry.size, entry.lfs.sha256 if entry.lfs else None, entry.blob_id)
        for entry in entries
        if isinstance(entry, RepoFile)
    ]


def download_role(role: ModelRole, folder: Path, stored: dict[str, Path]) -> dict[str, dict]:
    """Downloads the files the worker loads of `role` into `folder`, linking those already `stored` (by SHA-256)
    instead; returns the verified files' sizes and digests."""
    from huggingface_hub import hf_hub_download

    def download(path: str) -> Path:
        # Into the folder itself, not the hub cache: the worker reads it with local_files_only, and a rerun after an
        # interruption resumes the files already there.
        return Path(hf_hub_download(role.repo_id, path, revision=role.revision, local_dir=folder))

    listing = hub_listing(role)
    model_index = None
    if any(file.path == MODEL_INDEX for file in listing):
        model_index = json.loads(download(MODEL_INDEX).read_text(encoding="utf-8"))
    selected = select(listing, model_index, role.variant, role.skip_components)
    for file in selected:
        twin = stored.get(file.sha256) if file.sha256 else None
        if twin is not None:
            _link(folder / file.path, twin)
        elif file.path != MODEL_INDEX:
            download(file.path)
    # huggingface_hub's bookkeeping for resuming; once the marker is written nothing reads it.
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    return verify(folder, selected)


def select_loras(manifest: Manifest, names: Iterable[str]) -> set[str]:
    """The LoRAs named to be fetched beyond the default ones; raises ValueError for a name the manifest lacks."""
    names = set(names)
    unknown = names - set(manifest.loras)
    if unknown:
        raise ValueError(f"unknown LoRAs {', '.join(sorted(unknown))}; the manifest has {', '.join(manifest.loras)}")
    return names


def download_lora(lora: LoraSource, scratch: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(lora.repo_id, lora.filename, revision=lora.revision, local_dir=scratch))


def build_tiny_role(role: ModelRole, folder: Path, stored: dict[str, Path]) -> dict[str, dict]:
    """Builds the tiny stand-in of `role`, with the real download's layout: the same skipped components, and files
    identical to ones already `stored` linked to them."""
    # torch and diffusers are imported for the tiny build only: a download needs nothing but huggingface_hub.
    import tiny

    tiny.build_role(role, folder)
    for component in role.skip_components:
        shutil.rmtree(folder / component)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = sha256_of(path)
            if digest in stored:
                _link(path, stored[digest])
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": digest}
    return files


def build_tiny_lora(lora: LoraSource, scratch: Path) -> Path:
    import tiny

    path = scratch / f"{lora.name}.safetensors"
    tiny.write_lora(lora.family, lora.name, path)
    return path


def provide(
    models_dir: Path, manifest: Manifest, selected: list[ModelRole], tiny: bool, extra_loras: Iterable[str] = ()
) -> None:
    """Downloads (or, with `tiny`, builds) every selected role that is not present, then their families' LoRAs:
    every one when tiny, else those baked by default and `extra_loras`."""
    extra = select_loras(manifest, extra_loras)
    get_role, get_lora = (build_tiny_role, build_tiny_lora) if tiny else (download_role, download_lora)
    # Files already in the models folder by SHA-256, from the markers of the roles before: what a later role
    # links to rather than stores again.
    stored: dict[str, Path] = {}
    for role in selected:
        folder = role.path(models_dir)
        if _is_present(role, models_dir, tiny):
            log.info("%s: present in %s, skipped", role.name, folder)
        else:
            log.info("%s: %s %s@%s", role.name, "building tiny" if tiny else "downloading", role.repo_id, role.revision)
            started = time.perf_counter()
            files = get_role(role, folder, stored)
            if not tiny:
                check_sizes(role, models_dir)
            _write_atomically(folder / COMPLETE_MARKER, marker_text(role, tiny, files))
            log.info("%s: %s in %.1f s", role.name, "built" if tiny else "downloaded", time.perf_counter() - started)
        for name, facts in json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"].items():
            stored.setdefault(facts["sha256"], folder / name)
    check_shared(manifest, models_dir, selected)

    families = {role.name for role in selected}
    for lora in manifest.loras.values():
        if lora.family not in families:
            continue
        if not (tiny or lora.baked_by_default or lora.name in extra):
            log.info("LoRA %s: not baked (unpinned or non-commercial); --loras %s bakes it", lora.name, lora.name)
            continue
        path = lora.path(models_dir)
        if path.is_file():
            log.info("LoRA %s: present, skipped", lora.name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fetched into a scratch folder beside the target, then renamed: same filesystem, so the rename is atomic
        # and a LoRA file is either whole or absent.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{lora.name}-") as scratch:
            os.replace(get_lora(lora, Path(scratch)), path)
        log.info("LoRA %s: written to %s", lora.name, path)


def check_sizes(role: ModelRole, models_dir: Path) -> None:
    """Refuses files whose size at the manifest's dtype is not what the manifest records for the component, which
    the memory plan relies on where it plans without the weights."""
    for component in role.components:
        if component.same_as:
            continue
        found = component_bytes(role.component_path(models_dir, component), role.variant, component.dtype)
        if abs(found - component.nbytes) > SIZE_TOLERANCE * component.nbytes:
            raise RuntimeError(
                f"{role.name}/{component.name}: the manifest records {component.nbytes} bytes at {component.dtype}, "
                f"the downloaded files hold {found}; correct models/manifest.toml"
            )


def check_shared(manifest: Manifest, models_dir: Path, selected: list[ModelRole]) -> None:
    """Refuses a component the manifest calls the same as another role's when both are present and differ: the
    worker would load it once where it needs two."""
    for role in selected:
        for component in role.components:
            other = manifest.roles[component.same_as] if component.same_as else None
            if other is None or not other.is_complete(models_dir):
                continue
            mine = role.recorded_digests(models_dir).get(component.name)
            if mine is None or mine != other.recorded_digests(models_dir).get(component.name):
                raise RuntimeError(
                    f"{role.name}/{component.name} is not byte-identical to {other.name}'s, as the manifest says"
                )


def build_tiny(models_dir: Path, roles: Iterable[str] | None = None, manifest_path: Path = MANIFEST) -> None:
    """Builds tiny stand-ins for `roles` (default: all) and their families' LoRAs; what is present is kept."""
    manifest = load_manifest(manifest_path)
    provide(models_dir, manifest, select_roles(manifest, roles), tiny=True)


def fetch(
    models_dir: Path,
    roles: Iterable[str] | None = None,
    manifest_path: Path = MANIFEST,
    extra_loras: Iterable[str] = (),
) -> None:
    """Downloads the pinned revisions of `roles` (default: all) and their families' LoRAs (those baked by default and
    `extra_loras`); what is present is kept."""
    manifest = load_manifest(manifest_path)
    provide(models_dir, manifest, select_roles(manifest, roles), tiny=False, extra_loras=extra_loras)


def _is_present(role: ModelRole, models_dir: Path, tiny: bool) -> bool:
    """Whether the models folder already holds this role; if not, clears what should not be built upon."""
    folder = role.path(models_dir)
    marker = folder / COMPLETE_MARKER
    if marker.is_file():
        try:
            source = json.loads(marker.read_text(encoding="utf-8")).get("source")
        except ValueError:
            source = None
        if source == source_of(role, tiny) and role.is_complete(models_dir):
            return True
        if tiny and isinstance(source, dict) and source.get("tiny") is False:
            raise RuntimeError(f"{folder} holds downloaded weights; refusing to replace them with tiny ones")
        # Complete, but for another revision or the other kind of weights: start afresh.
        shutil.rmtree(folder)
    elif tiny and folder.exists():
        # An interrupted tiny build is redone from nothing (an interrupted download is resumed instead).
        shutil.rmtree(folder)
    return False


def _link(path: Path, target: Path) -> None:
    """Makes `path` a relative symlink to `target`: it resolves wherever the models folder is mounted or copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="build tiny random-weight models offline")
    parser.add_argument(
        "--models-dir",
        type=Path,
        # The builder is a separate program from the worker, so it reads the variable itself; same default.
        default=Path(os.environ.get("MODELS_DIR") or REPO / "models"),
        help="target folder (default: $MODELS_DIR, else models/ in the repository)",
    )
    parser.add_argument("--roles", help="comma-separated manifest roles (default: the preset's)")
    parser.add_argument("--preset", choices=PRESETS, default="all", help="roles by image preset (default: all)")
    parser.add_argument(
        "--loras", default="", help="comma-separated LoRAs to fetch beyond those baked by default (pinned, commercial)"
    )
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=f"model manifest (default: {MANIFEST})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [name.strip() for name in args.roles.split(",") if name.strip()] if args.roles else PRESETS[args.preset]
    loras = [name.strip() for name in args.loras.split(",") if name.strip()]
    manifest = load_manifest(args.manifest)
    try:
        roles = select_roles(manifest, names)
        select_loras(manifest, loras)
    except ValueError as error:
        parser.error(str(error))
    provide(args.models_dir, manifest, roles, tiny=args.tiny, extra_loras=loras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
