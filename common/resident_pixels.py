"""A site's preprocessed uint8 training pixels, held on the training device across epochs and fits.

Without it, the fast dense epoch reads every item from the site's npz cache
again each epoch, through loader workers and pinned memory. On a GPU the
step is host-bound (the launching thread is the bottleneck), so that
loading is not free: on an H200 a whole epoch ran at 0.79 of the pure
step's throughput (bench/results/h200-gpu_sh-run1-table.txt), the first
batch of each epoch waiting on the workers, and their pinning and copies
competing with the launching thread. A site's arrays are small next to a
GPU's memory (322 items at 352 px: 160 MB in uint8), so when they fit the
budget, the first epoch trains on the loader's batches as before and keeps
them, and every later epoch indexes them on the device: no loader, no host
copy but the prompt ids.

The store is process-wide (LRU, byte budget), keyed by the device, the
image size and every item's ``SegDataset.cache_key`` (files, mtimes, sizes,
preprocessing version), so a warm process (the deployment's site worker,
a simulation actor) starts its next round's fit resident, and any change
of data gives a new key. Budget: ``FEDVLSM_RESIDENT_PIXELS_GB`` (0 turns
the store off), default 10% of the GPU's memory on CUDA, 1 GiB elsewhere.
A site that does not fit trains from the loader as before. Items are pure
functions of their files (no augmentation), so the resident copy is what
the loader would give.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

from common.budget import device_budget


def budget_bytes(device: torch.device) -> int:
    return device_budget("FEDVLSM_RESIDENT_PIXELS_GB", device, 0.1, 2**30)


def site_key(ds: Any) -> str:
    """What a training set's pixels depend on: image size and each item's cache key, in order."""
    h = hashlib.sha256(f"{int(ds.image_size)}|{len(ds)}".encode())
    for i in range(len(ds)):
        h.update(ds.cache_key(i).encode())
    return h.hexdigest()[:32]


class ResidentPixels:
    """uint8 images (N, S, S, 3) and masks (N, S, S) of one training set on one device."""

    def __init__(self, n: int, size: int, device: torch.device) -> None:
        self.device = device
        self.images = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
        self.masks = torch.empty((n, size, size), dtype=torch.uint8, device=device)
        self.filled = torch.zeros(n, dtype=torch.bool)  # host: which rows hold their item

    @staticmethod
    def nbytes(n: int, size: int) -> int:
        return n * size * size * 4

    @property
    def size_bytes(self) -> int:
        return self.nbytes(len(self.filled), self.images.shape[1])

    @classmethod
    def for_site(cls, ds: Any, device: torch.device) -> "ResidentPixels | None":
        """The store of `ds` (the one already held for the same pixels, if any), or None when
        they exceed the budget (the loader is used instead)."""
        n, size = len(ds), int(ds.image_size)
        budget = budget_bytes(device)
        if n == 0 or cls.nbytes(n, size) > budget:
            return None
        key = (str(device), site_key(ds))
        held = _HELD.get(key)
        if held is not None:
            _HELD.move_to_end(key)
            return held
        while _HELD and sum(p.size_bytes for p in _HELD.values()) + cls.nbytes(n, size) > budget:
            _HELD.popitem(last=False)
        _HELD[key] = store = cls(n, size, device)
        return store

    def holds(self, batches: list[list[int]]) -> bool:
        return all(bool(self.filled[b].all()) for b in batches if b)

    def put(self, index: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> None:
        """Keep one loader batch (already on the device) at rows `index` (host tensor)."""
        rows = index.to(self.device, non_blocking=self.device.type == "cuda")
        self.images.index_copy_(0, rows, images)
        self.masks.index_copy_(0, rows, masks)
        self.filled[index] = True

    def order(self, batches: list[list[int]]) -> torch.Tensor:
        """The epoch's item order as one device tensor (one copy per epoch; steps slice it)."""
        flat = torch.tensor([i for b in batches for i in b], dtype=torch.long)
        if self.device.type == "cuda":
            return flat.pin_memory().to(self.device, non_blocking=True)
        return flat.to(self.device)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, masks) of the items at device index `rows`."""
        return self.images.index_select(0, rows), self.masks.index_select(0, rows)


_HELD: OrderedDict[tuple, ResidentPixels] = OrderedDict()


def clear() -> None:
    """Forget every held site (tests; a process that needs the memory back)."""
    _HELD.clear()
