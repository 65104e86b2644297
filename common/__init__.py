"""fedvlsm's plain-PyTorch core: bases, adapters, data, local training, evaluation.

Nothing here imports Flower; `client/` and `server/` are thin shells over it.
Public API (see README "Python API"):

    from common import load_base, build_model, AdapterSpec, TrainConfig
    from common import fit, evaluate, predict, save_adapter, load_adapter
    from common import api  # train_site / evaluate_adapter_dir / predict_to_files

The names are resolved on first use (common/_lazy.py): `import common` (and
`fedvlsm --help`) must not pay for torch, transformers and MONAI.
"""

from common._lazy import lazy_exports

_EXPORTS = {
    "load_adapter": "common.adapter_io", "save_adapter": "common.adapter_io",
    "VARIANTS": "common.adapters.spec", "AdapterSpec": "common.adapters.spec",
    "Base": "common.bases", "load_base": "common.bases",
    "TrainConfig": "common.config",
    "evaluate": "common.evaluate", "predict": "common.evaluate",
    "AdaptedCLIPSeg": "common.model", "build_model": "common.model",
    "FitResult": "common.train", "fit": "common.train",
}
__all__ = sorted(_EXPORTS)
lazy_exports(__name__, _EXPORTS)
