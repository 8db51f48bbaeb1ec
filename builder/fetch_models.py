"""Puts the manifest's models into the models folder: pinned downloads for the Docker image, or tiny random-weight
stand-ins, built offline in the same layout, for tests and local runs.

    python builder/fetch_models.py [--models-dir DIR] [--roles sdxl,sdxl_vae]   # download (Docker build)
    python builder/fetch_models.py --tiny [--models-dir DIR] [--roles ...]      # build tiny models offline

A role folder counts as present once its completion marker is written, which happens last: an interrupted
download or build lacks it and is redone. LoRA files are renamed into place whole, so a LoRA file that exists is
complete. LoRAs are fetched for the families whose role is selected.
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

from diffusion_worker.manifest import COMPLETE_MARKER, LoraSource, Manifest, ModelRole, load_manifest

REPO = Path(__file__).resolve().parents[1]
# The manifest beside this script's folder: /app/models/manifest.toml in the image, models/ in a checkout.
MANIFEST = REPO / "models" / "manifest.toml"
# Weight files diffusers and transformers load, at the top of a repo or in a component folder. Single-file
# checkpoints some repos also keep at the top (sd_xl_base_1.0.safetensors, sdxl.vae.safetensors) do not match.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# Configs, model indexes, tokenizer.json/vocab.json, merges.txt, sentencepiece models.
SUPPORT_PATTERNS = ("*.json", "*.txt", "*.model")

log = logging.getLogger("fetch_models")


def allow_patterns(variant: str | None) -> list[str]:
    """What to download of a diffusers or transformers repo: its configs, tokenizers and one set of weights."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    weights = [f"{folder}{stem}*{suffix}" for stem in WEIGHT_STEMS for folder in ("", "*/")]
    return [*weights, *SUPPORT_PATTERNS]


def marker_text(role: ModelRole, tiny: bool) -> str:
    """What the marker records: a folder built for another revision, or tiny instead of real, is not present."""
    source = {"repo_id": role.repo_id, "revision": role.revision, "variant": role.variant, "tiny": tiny}
    return json.dumps(source, sort_keys=True) + "\n"


def select_roles(manifest: Manifest, names: Iterable[str] | None) -> list[ModelRole]:
    if names is None:
        return list(manifest.roles.values())
    names = list(names)
    unknown = [name for name in names if name not in manifest.roles]
    if unknown:
        raise ValueError(f"unknown roles {', '.join(unknown)}; the manifest has {', '.join(manifest.roles)}")
    return [manifest.roles[name] for name in names]


def download_role(role: ModelRole, folder: Path) -> None:
    from huggingface_hub import snapshot_download

    # Into the folder itself, not the hub cache: the worker reads it with local_files_only, and a rerun after an
    # interruption resumes the files already there.
    snapshot_download(
        role.repo_id,
        revision=role.revision,
        local_dir=folder,
        allow_patterns=allow_patterns(role.variant),
    )
    # huggingface_hub's bookkeeping for resuming; once the marker is written nothing reads it.
    shutil.rmtree(folder / ".cache", ignore_errors=True)


def download_lora(lora: LoraSource, scratch: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(lora.repo_id, lora.filename, revision=lora.revision, local_dir=scratch))


def build_tiny_role(role: ModelRole, folder: Path) -> None:
    # torch and diffusers are imported for the tiny build only: a download needs nothing but huggingface_hub.
    import tiny

    tiny.build_role(role, folder)


def build_tiny_lora(lora: LoraSource, scratch: Path) -> Path:
    import tiny

    path = scratch / f"{lora.name}.safetensors"
    tiny.write_lora(lora.family, lora.name, path)
    return path


def provide(models_dir: Path, manifest: Manifest, selected: list[ModelRole], tiny: bool) -> None:
    """Downloads (or, with `tiny`, builds) every selected role that is not present, then their families' LoRAs."""
    get_role, get_lora = (build_tiny_role, build_tiny_lora) if tiny else (download_role, download_lora)
    for role in selected:
        folder = role.path(models_dir)
        if _is_present(role, folder, tiny):
            log.info("%s: present in %s, skipped", role.name, folder)
            continue
        log.info("%s: %s %s@%s", role.name, "building tiny" if tiny else "downloading", role.repo_id, role.revision)
        started = time.perf_counter()
        get_role(role, folder)
        _write_atomically(folder / COMPLETE_MARKER, marker_text(role, tiny))
        log.info("%s: %s in %.1f s", role.name, "built" if tiny else "downloaded", time.perf_counter() - started)

    families = {role.name for role in selected}
    for lora in manifest.loras.values():
        if lora.family not in families:
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


def build_tiny(models_dir: Path, roles: Iterable[str] | None = None, manifest_path: Path = MANIFEST) -> None:
    """Builds tiny stand-ins for `roles` (default: all) and their families' LoRAs; what is present is kept."""
    manifest = load_manifest(manifest_path)
    provide(models_dir, manifest, select_roles(manifest, roles), tiny=True)


def fetch(models_dir: Path, roles: Iterable[str] | None = None, manifest_path: Path = MANIFEST) -> None:
    """Downloads the pinned revisions of `roles` (default: all) and their families' LoRAs; what is present is kept."""
    manifest = load_manifest(manifest_path)
    provide(models_dir, manifest, select_roles(manifest, roles), tiny=False)


def _is_present(role: ModelRole, folder: Path, tiny: bool) -> bool:
    """Whether `folder` already holds this role; if not, clears what should not be built upon."""
    marker = folder / COMPLETE_MARKER
    if marker.is_file():
        if marker.read_text(encoding="utf-8") == marker_text(role, tiny):
            return True
        if tiny and not json.loads(marker.read_text(encoding="utf-8"))["tiny"]:
            raise RuntimeError(f"{folder} holds downloaded weights; refusing to replace them with tiny ones")
        # Complete, but for another revision or the other kind of weights: start afresh.
        shutil.rmtree(folder)
    elif tiny and folder.exists():
        # An interrupted tiny build is redone from nothing (an interrupted download is resumed instead).
        shutil.rmtree(folder)
    return False


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
    parser.add_argument("--roles", help="comma-separated manifest roles (default: all)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=f"model manifest (default: {MANIFEST})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [name.strip() for name in args.roles.split(",") if name.strip()] if args.roles else None
    manifest = load_manifest(args.manifest)
    try:
        roles = select_roles(manifest, names)
    except ValueError as error:
        parser.error(str(error))
    provide(args.models_dir, manifest, roles, tiny=args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
