"""Training: the trainer, checkpoints, distributed helpers, cross-validation, ensembles.

Examples
--------
>>> from milcell.train import Trainer
>>> Trainer.__name__
'Trainer'
"""

from milcell.train.callbacks import Callback, LambdaCallback
from milcell.train.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from milcell.train.crossval import CVResult, OOFPredictions, cross_validate, feature_subset
from milcell.train.distributed import cleanup_distributed, init_distributed, make_loader
from milcell.train.ensemble import predict_ensemble, vote
from milcell.train.features import extract_features
from milcell.train.noisy_student import NoisyStudentResult, PseudoLabelledDataset, noisy_student
from milcell.train.trainer import MILModelLike, MILOutputLike, Predictions, Trainer, write_history_csv

__all__ = [
    "CVResult",
    "Callback",
    "Checkpoint",
    "LambdaCallback",
    "MILModelLike",
    "MILOutputLike",
    "NoisyStudentResult",
    "OOFPredictions",
    "Predictions",
    "PseudoLabelledDataset",
    "Trainer",
    "cleanup_distributed",
    "cross_validate",
    "extract_features",
    "feature_subset",
    "init_distributed",
    "load_checkpoint",
    "load_weights",
    "make_loader",
    "noisy_student",
    "predict_ensemble",
    "save_checkpoint",
    "vote",
    "write_history_csv",
]
