"""The one place that maps an adapter variant to what builds it."""

from __future__ import annotations

from transformers import CLIPSegConfig

from common.adapters.base import AdapterSet
from common.adapters.dense import DenseAdapters
from common.adapters.shallow import ShallowAdapters
from common.adapters.spec import AdapterSpec


def build_adapter_set(spec: AdapterSpec, config: CLIPSegConfig) -> AdapterSet:
    if spec.family == "shallow":
        return ShallowAdapters(spec, config)
    if spec.family == "dense":
        return DenseAdapters(spec, config)
    return AdapterSet()  # baselines: no adapter modules, see baselines.py
