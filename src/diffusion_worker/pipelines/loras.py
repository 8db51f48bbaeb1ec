"""LoRA adapters: a registry of the files a worker may load, a small in-memory cache of them, and a per-job
application that always ends with the base weights restored bit for bit.

Restoring uses `unload_lora_weights()`, which removes the adapter layers and leaves the original tensors
untouched. Fusing is never used: fuse then unfuse rounds the weights (see docs), so the base output would drift.

The cache holds each file's tensors as read and hands every load a copy: diffusers' converters change tensors of the
dict they are given (the ComfyUI/Kijai WAN converter rescales cross-attention and FFN weights in place when alpha is
not the rank), and peft may adopt the tensors it is given as the adapter's own. A cached tensor handed out once
would drift from job to job.
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
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import Internal, InvalidInput, StateLost, UnknownLora
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
        """The file's tensors for one load: a copy, which the loader may change as it likes."""
        return {key: tensor.clone() for key, tensor in self._cached(name).items()}

    def _cached(self, name: str) -> StateDict:
        """The file's tensors as read, never handed to a loader. The file is the worker's own: one that can't be read
        is the worker's fault, not the request's."""
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None:
                self._cache.move_to_end(name)
                return cached
        try:
            loaded = load_file(self.files[name])
        except (OSError, SafetensorError) as error:
            raise Internal(f"loras: {name!r} can't be read on this worker ({error})") from error
        with self._lock:
            if self._cache_size:
                self._cache[name] = loaded
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return loaded

    @contextmanager
    def applied(self, pipeline: LoraBaseMixin, refs: Sequence[LoraRef]) -> Iterator[None]:
        """Loads the job's adapters with their scales into the shared model, and removes them however the job ends.

        A model that still holds adapters (an earlier removal failed) serves no job, with LoRAs or without: its
        outputs would not be the base model's. Every file is read before the model is touched."""
        _check_no_adapters(pipeline)
        if not refs:
            yield
            return
        self.check(refs)
        for ref in refs:
            self._cached(ref.name)
        adapter_names = [f"job_{index}" for index in range(len(refs))]
        try:
            for ref, adapter_name in zip(refs, adapter_names, strict=True):
                try:
                    pipeline.load_lora_weights(self.state_dict(ref.name), adapter_name=adapter_name)
                # The model is checked above to hold no adapter, so no name clashes: a ValueError here is diffusers'
                # or peft's verdict on the file (keys it can't convert, modules the model lacks).
                except ValueError as error:
                    raise InvalidInput(f"loras: {ref.name!r} does not fit this model ({error})") from None
            pipeline.set_adapters(adapter_names, adapter_weights=[ref.scale for ref in refs])
            log.info("applied LoRAs %s", ", ".join(f"{ref.name}@{ref.scale:g}" for ref in refs))
            yield
        finally:
            # Also after a load that failed halfway: what it left in the model goes with the rest.
            _unload(pipeline)


def _check_no_adapters(pipeline: LoraBaseMixin) -> None:
    left = {component: names for component, names in pipeline.get_list_adapters().items() if names}
    if left:
        raise StateLost(f"LoRA adapters {left} are still loaded from an earlier job; this worker will be replaced")


def _unload(pipeline: LoraBaseMixin) -> None:
    """Removes every adapter. A failure leaves the shared model in an unknown state: the worker asks to be replaced.
    The job's own error, if it had one, is chained to this one and logged with it, never replaced unseen."""
    try:
        pipeline.unload_lora_weights()
    # Whatever it is: the shared model may still hold adapters, and nothing narrower says so.
    except Exception as error:
        log.error("removing the job's LoRAs failed", exc_info=True)
        raise StateLost("the job's LoRAs could not be removed; this worker will be replaced") from error
