"""Frozen-activation cache of shallow-* adapters: after an item's first pass, only adapters + decoder run.

Shallow adapters sit beside the towers (common/adapters/shallow.py): the
towers run unchanged, so what they give an item is a pure function of

- the frozen base (a hash of all its towers' weights, ``bases.weights_digest``:
  the adapters' sampled fingerprint could not tell apart checkpoints that
  differ outside its slices, and of the towers' configs: ``trunk_identity``),
  the dtype the features are kept in and
  the model's extracted layers and image size: the *namespace*;
- the item's preprocessed pixels: ``SegDataset.cache_key`` (files, mtimes,
  sizes, image size, preprocessing version), the key the site's npz cache
  already uses;
- for the text side, the prompt string (and the tokenizer).

Vision features (the extracted layers' activations, plus the resized mask)
are kept per item in a process-wide memory store (LRU, byte budget:
``FEDVLSM_ACTIVATION_CACHE_GB``, default 30% of the GPU's memory on CUDA,
2 GiB on CPU) and, when the dataset has a site cache folder, on disk in
``<site cache>/activations/<namespace>/<item key>.safetensors``, so a new
process (a deployment's next round) starts warm. Any change of base, dtype,
preprocessing or data changes a namespace or key: the old entry is simply
never read again (a miss recomputes it; a damaged file is a miss). Text
features are kept per prompt in memory only (small; the text tower is ~8%
of the step); an epoch's new prompts are encoded together before its steps
(``warm_text``).

On CPU the features are kept in fp32, so the cached path gives the plain
path's loss (tests/test_fast_path.py); on a GPU in the autocast dtype
(bf16: 2.2 MB per item for the full-size model at 352 px).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path
from common.bases import weights_digest
from common.budget import device_budget

ACT_VERSION = 1  # bump when what the trunks compute changes


def budget_bytes(device: torch.device) -> int:
    return device_budget("FEDVLSM_ACTIVATION_CACHE_GB", device, 0.3, 2 * 2**30)


class _Store:
    """Process-wide LRU of tensors dicts with a byte budget (shared by every site of the process)."""

    def __init__(self) -> None:
        self.data: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def size(entry: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in entry.values())

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        entry = self.data.get(key)
        if entry is not None:
            self.data.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: dict[str, torch.Tensor], budget: int) -> bool:
        size = self.size(entry)
        if size > budget:
            return False
        if key in self.data:
            self.bytes -= self.size(self.data.pop(key))
        while self.data and self.bytes + size > budget:
            _, old = self.data.popitem(last=False)
            self.bytes -= self.size(old)
        self.data[key] = entry
        self.bytes += size
        return True

    def clear(self) -> None:
        self.data.clear()
        self.bytes = 0


_VISION = _Store()
_TEXT: dict[tuple, dict[str, torch.Tensor]] = {}
_TEXT_MAX = 200_000


def clear_memory() -> None:
    """Forget every in-memory entry of this process (disk entries stay)."""
    _VISION.clear()
    _TEXT.clear()


def trunk_identity(model: Any) -> str:
    """What the frozen towers compute with: all their weights, and their configs.

    The weights alone are not enough: a base folder whose config.json differs (a layer-norm
    eps, an activation) with the same weights computes other activations, and was served
    the first one's cached features. Where a config was loaded from is left out.
    """
    config = model.clipseg.config
    towers = {name: {k: v for k, v in getattr(config, name).to_dict().items()
                     if not k.startswith("_") and k != "transformers_version"}
              for name in ("vision_config", "text_config")}
    text = json.dumps(towers, sort_keys=True, default=str)
    return f"{weights_digest(model.clipseg)}|{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def namespace(fingerprint: str, dtype: torch.dtype, extract_layers: list[int], image_size: int) -> str:
    key = f"v{ACT_VERSION}|{fingerprint}|{dtype}|{list(extract_layers)}|{image_size}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class ShallowFeatures:
    """The frozen trunks' outputs for one site's training set, from cache or computed once."""

    def __init__(self, model: Any, ds: Any, tokens: Any, device: torch.device, amp: torch.dtype | None,
                 folder: Path | None, budget: int) -> None:
        self.model, self.ds, self.tokens, self.device, self.amp = model, ds, tokens, device, amp
        self.dtype = amp or torch.float32
        self.ns = namespace(trunk_identity(model), self.dtype, model.extract_layers, model.image_size)
        tok = tokens.tokenizer
        # Whether the text taps were collected is part of an entry: a shallow-v(c) model stores none,
        # and a shallow-vl(c) model sharing the process must not take those (its text adapters
        # would get no input, or the batch would mix entries with and without taps).
        self.text_ns = (self.ns, getattr(tok, "name_or_path", ""), len(tok), bool(model.adapters.needs_text_taps))
        self.folder = folder
        self.budget = budget
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "disk_writes": 0,
                      "text_hits": 0, "text_misses": 0}

    @classmethod
    def for_site(cls, model: Any, ds: Any, tokens: Any, device: torch.device,
                 amp: torch.dtype | None) -> "ShallowFeatures | None":
        """A cache for `ds`, or None when it could hold neither in memory nor on disk."""
        cache_dir = getattr(ds, "cache_dir", None)
        folder = None
        budget = budget_bytes(device)
        if cache_dir is not None:
            folder = Path(cache_dir) / "activations" / namespace(
                trunk_identity(model), amp or torch.float32, model.extract_layers, model.image_size)
        else:
            vc = model.clipseg.config.vision_config
            tokens_per_image = (model.image_size // vc.patch_size) ** 2 + 1
            per_item = len(model.extract_layers) * tokens_per_image * vc.hidden_size * (2 if amp else 4)
            # An entry also holds its uint8 mask: left out, a site within a few % of the budget
            # evicted its own entries while filling and failed with "item vanished".
            per_item += int(getattr(ds, "image_size", model.image_size)) ** 2
            if per_item * len(ds) > budget:
                return None  # would thrash: train without the cache
        return cls(model, ds, tokens, device, amp, folder, budget)

    # ------------------------------------------------------------- vision
    def _key(self, index: int) -> tuple:
        return (self.ns, self.ds.cache_key(index))

    def _path(self, key: tuple) -> Path | None:
        return self.folder / f"{key[1]}.safetensors" if self.folder is not None else None

    def _lookup(self, index: int, count: bool) -> dict[str, torch.Tensor] | None:
        key = self._key(index)
        entry = _VISION.get(key)
        if entry is not None:
            if count:
                self.stats["memory_hits"] += 1
            return entry
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                entry = load_file(str(path), device=str(self.device))
            except (SafetensorError, OSError, RuntimeError):
                entry = None  # damaged: recomputed as a miss
            if entry is not None and set(entry) == {"acts", "mask"} and entry["acts"].dtype == self.dtype:
                if count:
                    self.stats["disk_hits"] += 1
                _VISION.put(key, entry, self.budget)
                return entry
        return None

    def fill(self, batches: list[list[int]], loader: Callable[[list[list[int]]], Any]) -> None:
        """Make sure every item of `batches` has its features (computing the misses, batch by batch)."""
        missing = [[i for i in b if self._lookup(i, count=True) is None] for b in batches]
        missing = [b for b in missing if b]
        if not missing:
            return
        from common.fast import normalize

        nb = self.device.type == "cuda"
        for index, images, masks in loader(missing):
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                acts = self.model.vision_trunk(normalize(images.to(self.device, non_blocking=nb)))
            stacked = torch.stack(acts, dim=1).to(self.dtype)  # (B, L, N, D)
            masks = masks.to(self.device, non_blocking=nb)
            host = stacked.cpu() if self.folder is not None else None
            for j, i in enumerate(index.tolist()):
                key = self._key(i)
                entry = {"acts": stacked[j].clone(), "mask": masks[j].clone()}
                self.stats["misses"] += 1
                path = self._path(key)
                if path is not None:
                    with atomic_path(path) as tmp:
                        save_file({"acts": host[j].contiguous(), "mask": masks[j].cpu().contiguous()}, str(tmp))
                    self.stats["disk_writes"] += 1
                if not _VISION.put(key, entry, self.budget) and path is None:
                    raise RuntimeError("activation cache: an entry fits neither memory nor disk")

    def _entry(self, index: int) -> dict[str, torch.Tensor]:
        entry = self._lookup(index, count=False)
        if entry is None:  # evicted and not on disk: cannot happen after fill unless the budget is tiny
            raise RuntimeError(f"activation cache: item {index} vanished; raise FEDVLSM_ACTIVATION_CACHE_GB")
        return entry

    # --------------------------------------------------------------- text
    def warm_text(self, prompts: list[str], chunk: int = 256) -> None:
        """Encode the prompts not yet cached, `chunk` at a time, before an epoch's steps.

        An epoch draws new prompt variants; encoded batch by batch, every batch
        that met a new one ran the whole text trunk (a dozen layers of small
        launches on a host-bound GPU step). Here they cost one pass per chunk.
        """
        todo = sorted({p for p in prompts if (self.text_ns, p) not in _TEXT})
        for start in range(0, len(todo), chunk):
            self._encode_text(todo[start:start + chunk])

    def _encode_text(self, todo: list[str]) -> None:
        self.stats["text_misses"] += len(todo)
        ids = self.tokens(todo).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            cond, taps = self.model.text_trunk(ids, None)
        taps_t = torch.stack(taps, dim=1) if taps else cond.new_zeros(len(todo), 0, 1)
        if len(_TEXT) + len(todo) > _TEXT_MAX:
            _TEXT.clear()
        for j, p in enumerate(todo):
            _TEXT[(self.text_ns, p)] = {"cond": cond[j].to(self.dtype).clone(),
                                        "taps": taps_t[j].to(self.dtype).clone()}

    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        todo = sorted({p for p in prompts if (self.text_ns, p) not in _TEXT})
        self.stats["text_hits"] += len(prompts) - sum(1 for p in prompts if p in todo)
        if todo:  # none after warm_text, unless the store was cleared meanwhile
            self._encode_text(todo)
        rows = [_TEXT[(self.text_ns, p)] for p in prompts]
        cond = torch.stack([r["cond"] for r in rows])
        taps = torch.stack([r["taps"] for r in rows])  # (B, T, D)
        return cond, (list(taps.unbind(1)) if taps.shape[1] and taps.shape[2] else [])

    def batch(self, indices: list[int], prompts: list[str]):
        """(activations per extracted layer, cond, text taps, uint8 masks) of one batch, on the device."""
        entries = [self._entry(i) for i in indices]
        acts = torch.stack([e["acts"] for e in entries])  # (B, L, N, D)
        masks = torch.stack([e["mask"] for e in entries])
        cond, taps = self._text(prompts)
        return list(acts.unbind(1)), cond, taps, masks
