"""flatlora — train LoRA adapters with Flat-LoRA and SAM variants (training core of flatlora-landscape).

The pieces, one module each:

* :func:`lora_layers` — one view of every LoRA layer: W (out × in), A, B, s, W' = W + s·B·A;
* :func:`perturbed` — the one weight-perturbation mechanism (``exact`` / ``inplace``);
* :class:`FlatLoRA`, :func:`filter_noise_std` — Flat-LoRA's filter-wise noise and σ schedule;
* :class:`SAM`, :class:`MergedSAM` — SAM / ASAM on a parameter set and on the merged weights;
* :data:`METHODS` — the training methods, their options typed (:class:`PlainOptions`,
  :class:`FlatLoRAOptions`, :class:`SAMOptions`); :func:`train_loop`, :func:`run` — the plain loop and a
  whole run with outputs; :class:`FlatLoRATrainer`, :class:`SAMTrainer` — ``Trainer`` subclasses;
* :func:`get_task` — real tasks available offline (``rt-minilm``, ``r8-minilm``, ``digits-mlp``,
  ``tiny-t5-repeat``, ``custom``).
"""
from . import distributed
from .batches import batch_loss, batch_size
from .flat_lora import FlatLoRA, FlatLoRAOptions, filter_noise_std, noise_seed, sigma_schedule
from .lora_view import LoRALayerView, UnsupportedAdapterError, lora_layers
from .methods import METHODS, Method, MethodError, PlainOptions, SAMStep, StepRunner, get_method, register_method
from .perturb import DeltaSource, PerturbationError, SeededGaussian, perturbed
from .sam import SAM, SAM_VARIANTS, MergedSAM, SAMOptions, build_sam, running_stats_frozen, sam_epsilon
from .tasks import TASKS, Task, TaskError, get_task
from .training import TrainConfig, load_run, prepare_model, run, train_loop

__version__ = "0.1.0"


def __getattr__(name):  # the Trainer subclasses import transformers' Trainer: load them on first use
    if name in ("FlatLoRATrainer", "SAMTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flatlora' has no attribute {name!r}")
