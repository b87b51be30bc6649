"""Training: labelled data → statistics → losses → a trained model file.

>>> from pes_calc.train import train, load_config
>>> result = train(load_config("config.yaml"), "out/")   # doctest: +SKIP
"""

from pes_calc.train.config import (
    TRAINING_DEFAULTS,
    TrainingConfigError,
    load_config,
    normalise_config,
)
from pes_calc.train.data import (
    DatasetError,
    LabelKeys,
    batch_order,
    extract_labels,
    iterate_batches,
    labelled_graphs,
    load_graphs,
    read_structures,
    species_in,
)
from pes_calc.train.evaluation import Evaluation, evaluate, measure_errors, parity_plot
from pes_calc.train.loop import TrainResult, train
from pes_calc.train.losses import (
    MAE,
    MSE,
    RMSE,
    Loss,
    PerAtomEnergyLoss,
    PropertyLoss,
    TotalLoss,
    loss_from_config,
)
from pes_calc.train.stats import (
    STAT_NAMES,
    composition_energies,
    resolve_stats,
    training_data_stats,
)

__all__ = [
    "DatasetError",
    "LabelKeys",
    "batch_order",
    "extract_labels",
    "iterate_batches",
    "labelled_graphs",
    "load_graphs",
    "read_structures",
    "species_in",
    "Evaluation",
    "evaluate",
    "measure_errors",
    "parity_plot",
    "MAE",
    "MSE",
    "RMSE",
    "Loss",
    "PerAtomEnergyLoss",
    "PropertyLoss",
    "TotalLoss",
    "loss_from_config",
    "STAT_NAMES",
    "composition_energies",
    "resolve_stats",
    "training_data_stats",
    "TRAINING_DEFAULTS",
    "TrainingConfigError",
    "TrainResult",
    "load_config",
    "train",
    "normalise_config",
]
