"""Data layer of fedvlsm: dataset formats, the tensor dataset, synthetic sites, checks.

See docs/architecture.md (data contract) for what the model side may rely on.
Exports resolve lazily (common/_lazy.py) so that `fedvlsm data ...` and
`fedvlsm --help` do not import torch (SegDataset needs it).
"""

from common._lazy import lazy_exports

_EXPORTS = {
    "Problem": "common.data.formats", "DataError": "common.data.formats", "Item": "common.data.formats",
    "load_items": "common.data.formats",
    "check_dataset": "common.data.check", "ensure_valid": "common.data.check",
    "SiteCheck": "common.data.check", "site_data_check": "common.data.check",
    "SegDataset": "common.data.dataset", "collate_fn": "common.data.dataset",
    "synthesize": "common.data.synth",
}
__all__ = sorted(_EXPORTS)
lazy_exports(__name__, _EXPORTS)
