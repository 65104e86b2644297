"""How many bytes an in-process store may hold: one rule for every cache that keeps tensors in memory.

Used by the activation cache (common/activation_cache.py), the resident
pixels (common/resident_pixels.py) and the decoded site-cache tier
(common/data/dataset.py): an environment variable in GiB if set, else a
share of the GPU's memory on CUDA, else a fixed size.
"""

from __future__ import annotations

import os

import torch


def device_budget(env: str, device: torch.device, gpu_fraction: float, other_bytes: int) -> int:
    """Bytes a store on `device` may hold: $`env` in GiB if set, else `gpu_fraction` of the GPU's
    memory on CUDA, `other_bytes` elsewhere; a bad $`env` is an error that names it."""
    value = os.environ.get(env)
    if value:
        try:
            return int(float(value) * 2**30)
        except ValueError:
            raise ValueError(f"{env} must be a number of GiB, got {value!r}") from None
    if device.type == "cuda":
        return int(gpu_fraction * torch.cuda.get_device_properties(device).total_memory)
    return other_bytes
