"""fedvlsm's plain-PyTorch core: bases, adapters, data, local training, evaluation.

Nothing here imports Flower; `client/` and `server/` are thin shells over it.
Public API (see README "Python API"):

    from common import load_base, build_model, AdapterSpec, TrainConfig
    from common import fit, evaluate, predict, save_adapter, load_adapter
    from common import api  # train_site / evaluate_adapter_dir / predict_to_files
"""

from common.adapter_io import load_adapter, save_adapter
from common.adapters import VARIANTS, AdapterSpec
from common.bases import Base, load_base
from common.config import TrainConfig
from common.evaluate import evaluate, predict
from common.model import AdaptedCLIPSeg, build_model
from common.train import FitResult, fit

__all__ = [
    "VARIANTS", "AdaptedCLIPSeg", "AdapterSpec", "Base", "FitResult", "TrainConfig",
    "build_model", "evaluate", "fit", "load_adapter", "load_base", "predict", "save_adapter",
]
