"""Training: the trainer, checkpoints, distributed helpers, cross-validation, ensembles.

Examples
--------
>>> from milcell.train import Trainer
>>> Trainer.__name__
'Trainer'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milcell import _lazy

# Imported on first access, so ``import milcell.train`` loads none of its submodules. ``noisy_student``
# is both a submodule and the function defined in it; the attribute is always the function.
_LAZY_NAMES = {
    "Callback": "milcell.train.callbacks",
    "LambdaCallback": "milcell.train.callbacks",
    "Checkpoint": "milcell.train.checkpoint",
    "load_checkpoint": "milcell.train.checkpoint",
    "load_weights": "milcell.train.checkpoint",
    "save_checkpoint": "milcell.train.checkpoint",
    "CVResult": "milcell.train.crossval",
    "OOFPredictions": "milcell.train.crossval",
    "cross_validate": "milcell.train.crossval",
    "feature_subset": "milcell.train.crossval",
    "cleanup_distributed": "milcell.train.distributed",
    "init_distributed": "milcell.train.distributed",
    "make_loader": "milcell.train.distributed",
    "predict_ensemble": "milcell.train.ensemble",
    "vote": "milcell.train.ensemble",
    "extract_features": "milcell.train.features",
    "FitResult": "milcell.train.fit",
    "fit_model": "milcell.train.fit",
    "predict": "milcell.train.inference",
    "CSVLogger": "milcell.train.loggers",
    "MLflowLogger": "milcell.train.loggers",
    "RunLogger": "milcell.train.loggers",
    "TensorBoardLogger": "milcell.train.loggers",
    "make_loggers": "milcell.train.loggers",
    "NoisyStudentResult": "milcell.train.noisy_student",
    "PseudoLabelledDataset": "milcell.train.noisy_student",
    "noisy_student": "milcell.train.noisy_student",
    "MILModelLike": "milcell.train.trainer",
    "MILOutputLike": "milcell.train.trainer",
    "Predictions": "milcell.train.inference",
    "Trainer": "milcell.train.trainer",
    "write_history_csv": "milcell.train.trainer",
}
_SUBMODULES = (
    "callbacks",
    "checkpoint",
    "crossval",
    "distributed",
    "ensemble",
    "features",
    "fit",
    "inference",
    "loggers",
    "noisy_student",
    "trainer",
)
__getattr__, __dir__ = _lazy.attach(__name__, _LAZY_NAMES, _SUBMODULES)

if TYPE_CHECKING:
    # (``noisy_student`` is the function: the public name wins over its submodule, see milcell._lazy.)
    from milcell.train import callbacks as callbacks
    from milcell.train import checkpoint as checkpoint
    from milcell.train import crossval as crossval
    from milcell.train import distributed as distributed
    from milcell.train import ensemble as ensemble
    from milcell.train import features as features
    from milcell.train import fit as fit
    from milcell.train import inference as inference
    from milcell.train import loggers as loggers
    from milcell.train import trainer as trainer
    from milcell.train.callbacks import Callback, LambdaCallback
    from milcell.train.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
    from milcell.train.crossval import CVResult, OOFPredictions, cross_validate, feature_subset
    from milcell.train.distributed import cleanup_distributed, init_distributed, make_loader
    from milcell.train.ensemble import predict_ensemble, vote
    from milcell.train.features import extract_features
    from milcell.train.fit import FitResult, fit_model
    from milcell.train.inference import Predictions, predict
    from milcell.train.loggers import CSVLogger, MLflowLogger, RunLogger, TensorBoardLogger, make_loggers
    from milcell.train.noisy_student import NoisyStudentResult, PseudoLabelledDataset, noisy_student
    from milcell.train.trainer import MILModelLike, MILOutputLike, Trainer, write_history_csv

__all__ = [
    "CSVLogger",
    "CVResult",
    "Callback",
    "Checkpoint",
    "FitResult",
    "LambdaCallback",
    "MILModelLike",
    "MILOutputLike",
    "MLflowLogger",
    "NoisyStudentResult",
    "OOFPredictions",
    "Predictions",
    "PseudoLabelledDataset",
    "RunLogger",
    "TensorBoardLogger",
    "Trainer",
    "cleanup_distributed",
    "cross_validate",
    "extract_features",
    "feature_subset",
    "fit_model",
    "init_distributed",
    "load_checkpoint",
    "load_weights",
    "make_loader",
    "make_loggers",
    "noisy_student",
    "predict",
    "predict_ensemble",
    "save_checkpoint",
    "vote",
    "write_history_csv",
]
