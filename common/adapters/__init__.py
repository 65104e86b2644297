"""VLSM-Adapters and baselines behind one interface (see registry.py)."""

from common.adapters.base import AdapterSet
from common.adapters.block import Adapter
from common.adapters.registry import build_adapter_set
from common.adapters.spec import VARIANTS, AdapterSpec

__all__ = ["Adapter", "AdapterSet", "AdapterSpec", "VARIANTS", "build_adapter_set"]
