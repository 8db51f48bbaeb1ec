"""LoRA adapters: a registry of the files a worker may load, a small in-memory cache of them, and a per-job
application that always ends with the base weights restored bit for bit.

Restoring uses `unload_lora_weights()`, which removes the adapter layers and leaves the original tensors
untouched. Fusing is never used: fuse then unfuse rounds the weights (see docs), so the base output would drift.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from safetensors.torch import load_file

from ..errors import InvalidInput, UnknownLora
from ..manifest import lora_dir
from ..schema import LoraRef

log = logging.getLogger(__name__)
# transformers 5 reports every text-encoder adapter key as MISSING when diffusers loads a LoRA from a state dict,
# though the weights do load (tests/test_sdxl_family.py compares them with the file): a false alarm of some twenty
# lines per encoder and job. Real loading errors still raise.
logging.getLogger("transformers.integrations.peft").setLevel(logging.ERROR)
StateDict = dict[str, torch.Tensor]


class LoraRegistry:
    """The `.safetensors` files under `<models>/loras/<family>/`, by file stem; found once, at start.

    A request names a LoRA; the name is looked up here and never joined into a path, so `../x` is simply unknown.
    Only safetensors are listed: a pickle file could run code when loaded.
    """

    def __init__(self, family: str, files: dict[str, Path], cache_size: int) -> None:
        self.family = family
        self.files = files
        self._cache: OrderedDict[str, StateDict] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def scan(cls, models_dir: Path, family: str, cache_size: int) -> LoraRegistry:
        folder = lora_dir(models_dir, family)
        files = {path.stem: path for path in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}
        return cls(family, files, cache_size)

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def check(self, refs: Sequence[LoraRef]) -> None:
        """Refuses unknown names before any GPU work starts."""
        unknown = [ref.name for ref in refs if ref.name not in self.files]
        if unknown:
            available = ", ".join(self.names) or "none on this worker"
            raise UnknownLora(f"loras: {', '.join(map(repr, unknown))} not available for {self.family} ({available})")

    def state_dict(self, name: str) -> StateDict:
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None:
                self._cache.move_to_end(name)
                return cached
        try:
            loaded = load_file(self.files[name])
        except Exception as error:
            raise InvalidInput(f"loras: {name!r} is not a readable safetensors file ({error})") from None
        with self._lock:
            if self._cache_size:
                self._cache[name] = loaded
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return loaded

    @contextmanager
    def applied(self, pipeline: LoraBaseMixin, refs: Sequence[LoraRef]) -> Iterator[None]:
        """Loads the job's adapters with their scales into the shared model, and removes them however the job ends."""
        if not refs:
            yield
            return
        self.check(refs)
        adapter_names = [f"job_{index}" for index in range(len(refs))]
        try:
            for ref, adapter_name in zip(refs, adapter_names, strict=True):
                try:
                    pipeline.load_lora_weights(self.state_dict(ref.name), adapter_name=adapter_name)
                except ValueError as error:
                    raise InvalidInput(f"loras: {ref.name!r} does not fit this model ({error})") from None
            pipeline.set_adapters(adapter_names, adapter_weights=[ref.scale for ref in refs])
            log.info("applied LoRAs %s", ", ".join(f"{ref.name}@{ref.scale:g}" for ref in refs))
            yield
        finally:
            pipeline.unload_lora_weights()
