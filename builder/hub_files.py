"""Which files of a hub repo the worker loads, and whether a folder holds all of them: decided from the repo's file
listing at the pinned revision, before anything is downloaded, and checked again on the files written.

A diffusers pipeline repo (one with model_index.json) is fetched as its model_index.json and the component folders
it names, minus those the manifest replaces (SDXL's own VAE); a single-model repo as its top-level files. In each
folder: the configs and tokenizer files, and one set of safetensors weights, the manifest's variant if the folder has
it, else the plain weights, with every shard and the shard index. Everything else stays on the hub: other variants,
.bin/ONNX/Flax/OpenVINO copies, single-file checkpoints, extra folders (vae_1_0/, vae_decoder/), READMEs, images.

Imports neither torch nor huggingface_hub: the Docker image's weights stage runs it with huggingface_hub alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

MODEL_INDEX = "model_index.json"
# The weight files diffusers and transformers load: <stem>[.<variant>][-<k>-of-<n>].safetensors.
WEIGHTS = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model)(?:\.(?P<variant>\w+))?(?:-(?P<shard>\d+)-of-(?P<shards>\d+))?"
    r"\.safetensors$"
)
# The shard index of a sharded set: <stem>.safetensors.index[.<variant>].json.
SHARD_INDEX = re.compile(r"^(?P<stem>diffusion_pytorch_model|model)\.safetensors\.index(?:\.(?P<variant>\w+))?\.json$")
# Files that make a folder hold weights of some kind, loadable by us or not.
ANY_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5")
# Configs (config.json, scheduler_config.json, preprocessor_config.json, tokenizer_config.json) and tokenizers.
SUPPORT = ("*config.json", "vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
SUPPORT += ("spiece.model", "sentencepiece.bpe.model")


class IncompleteError(RuntimeError):
    """A repo listing or a folder lacks what a component needs; nothing is marked complete."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a revision, as the hub lists it."""

    path: str
    size: int | None = None
    # The hub records a SHA-256 for every LFS file (all weights); small files are git blobs, named by blob_id.
    sha256: str | None = None
    blob_id: str | None = None

    @property
    def folder(self) -> str:
        parent = PurePosixPath(self.path).parent.as_posix()
        return "" if parent == "." else parent

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


def components(model_index: dict | None, skip: Iterable[str] = ()) -> list[str]:
    """The folders to fetch: a pipeline's components that have a class (None marks an absent optional one), or the
    repo's top level for a single model."""
    if model_index is None:
        return [""]
    named = [name for name, value in model_index.items() if isinstance(value, list) and value[0] is not None]
    return sorted(set(named) - set(skip))


def select(
    listing: Iterable[RemoteFile], model_index: dict | None, variant: str | None, skip: Iterable[str] = ()
) -> list[RemoteFile]:
    """The files of `listing` the worker loads; raises IncompleteError if a component lacks loadable weights."""
    by_folder: dict[str, list[RemoteFile]] = {}
    for file in listing:
        by_folder.setdefault(file.folder, []).append(file)
    chosen = [file for file in by_folder.get("", []) if file.path == MODEL_INDEX] if model_index is not None else []
    for folder in components(model_index, skip):
        files = by_folder.get(folder, [])
        if not files:
            raise IncompleteError(f"{_where(folder)}: the repo has no files for this component")
        chosen += [file for file in files if any(fnmatch(file.name, pattern) for pattern in SUPPORT)]
        chosen += _weights_of(folder, files, variant)
    return sorted(chosen, key=lambda file: file.path)


def _weights_of(folder: str, files: list[RemoteFile], variant: str | None) -> list[RemoteFile]:
    """One set of safetensors weights with its shard index: the variant's where the folder has it, else the plain."""
    sets: dict[str | None, list[RemoteFile]] = {}
    indexes: dict[str | None, RemoteFile] = {}
    for file in files:
        if match := WEIGHTS.match(file.name):
            sets.setdefault(match["variant"], []).append(file)
        elif match := SHARD_INDEX.match(file.name):
            indexes[match["variant"]] = file
    if not sets:
        if any(fnmatch(file.name, pattern) for file in files for pattern in ANY_WEIGHTS):
            raise IncompleteError(f"{_where(folder)}: weights, but none in safetensors the worker loads")
        # Tokenizers, schedulers and image processors have no weights.
        return []
    key = variant if variant in sets else None
    if key not in sets:
        raise IncompleteError(f"{_where(folder)}: no {variant or 'plain'} weights, only variants {sorted(sets)}")
    weights = sorted(sets[key], key=lambda file: file.name)
    shards = {int(match["shards"]) for file in weights if (match := WEIGHTS.match(file.name)) and match["shards"]}
    if not shards:
        if len(weights) != 1:
            raise IncompleteError(f"{_where(folder)}: {len(weights)} unsharded weight files")
        return weights
    numbers = sorted(int(WEIGHTS.match(file.name)["shard"]) for file in weights)
    if len(shards) != 1 or numbers != list(range(1, shards.pop() + 1)):
        raise IncompleteError(f"{_where(folder)}: shards {numbers} of {sorted(shards)} do not form a set")
    if key not in indexes:
        raise IncompleteError(f"{_where(folder)}: sharded weights without their index")
    return [*weights, indexes[key]]


def _where(folder: str) -> str:
    return folder or "the top level"


def verify(folder: Path, selected: Iterable[RemoteFile]) -> dict[str, dict]:
    """Checks every selected file under `folder` against the listing (size, then the hub's digest) and every shard
    index against its shards; returns what the completion marker records of each file."""
    recorded: dict[str, dict] = {}
    for file in selected:
        path = folder / file.path
        if not path.is_file():
            raise IncompleteError(f"{path}: missing after download")
        size = path.stat().st_size
        if file.size is not None and size != file.size:
            raise IncompleteError(f"{path}: {size} bytes, the hub lists {file.size}")
        digest = sha256_of(path)
        if file.sha256 is not None and digest != file.sha256:
            raise IncompleteError(f"{path}: sha256 {digest}, the hub records {file.sha256}")
        if file.sha256 is None and file.blob_id is not None and git_blob_id(path) != file.blob_id:
            raise IncompleteError(f"{path}: differs from the hub's git blob {file.blob_id}")
        recorded[file.path] = {"size": size, "sha256": digest}
    for index in (file for file in selected if SHARD_INDEX.match(file.name)):
        shards = set(json.loads((folder / index.path).read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(name for name in shards if f"{index.folder}/{name}".lstrip("/") not in recorded)
        if missing:
            raise IncompleteError(f"{folder / index.path}: names shards that were not fetched: {missing}")
    return recorded


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """The id git (and so the hub) gives a small file: SHA-1 of a header and the bytes."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
