"""Data layer of fedvlsm: dataset formats, the tensor dataset, synthetic sites, checks.

See docs/architecture.md (data contract) for what the model side may rely on.
"""

from .check import Problem, check_dataset, ensure_valid
from .dataset import SegDataset, collate_fn
from .formats import DataError, Item, load_items
from .synth import synthesize

__all__ = [
    "DataError",
    "Item",
    "Problem",
    "SegDataset",
    "check_dataset",
    "collate_fn",
    "ensure_valid",
    "load_items",
    "synthesize",
]
