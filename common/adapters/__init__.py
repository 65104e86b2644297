"""VLSM-Adapters and baselines behind one interface (see registry.py).

Exports resolve lazily (common/_lazy.py): `AdapterSpec` and `VARIANTS` are
needed by the CLI's parser, which must not import torch.
"""

from common._lazy import lazy_exports

_EXPORTS = {
    "AdapterSet": "common.adapters.base",
    "Adapter": "common.adapters.block",
    "build_adapter_set": "common.adapters.registry",
    "VARIANTS": "common.adapters.spec", "AdapterSpec": "common.adapters.spec",
}
__all__ = sorted(_EXPORTS)
lazy_exports(__name__, _EXPORTS)
