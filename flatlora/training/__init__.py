"""Training: settings (:mod:`.config`), the loop (:mod:`.loop`) and whole runs with outputs,
checkpoints and resumption (:mod:`.runs`)."""
from .config import ConfigError, RunExistsError, TrainConfig, check_device
from .loop import micro_batches, train_loop
from .runs import load_run, prepare_model, run, save_model

__all__ = ["TrainConfig", "RunExistsError", "ConfigError", "check_device", "micro_batches", "train_loop",
           "prepare_model", "run", "load_run", "save_model"]
