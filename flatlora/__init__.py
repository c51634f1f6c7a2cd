"""flatlora — train LoRA adapters with Flat-LoRA and SAM variants (training core of flatlora-landscape).

The pieces, one module each:

* :func:`lora_layers` — one view of every LoRA layer: W (out × in), A, B, s, W' = W + s·B·A;
* :func:`perturbed` — the one weight-perturbation mechanism (``exact`` / ``inplace``);
* :class:`FlatLoRA`, :func:`filter_noise_std` — Flat-LoRA's filter-wise noise and σ schedule;
* :data:`METHODS` — the training methods; :func:`train_loop`, :func:`run` — the plain loop and a
  whole run with outputs; :class:`FlatLoRATrainer` — the Hugging Face ``Trainer`` subclass;
* :func:`get_task` — real tasks available offline (``rt-minilm``, ``r8-minilm``, ``digits-mlp``,
  ``tiny-t5-repeat``, ``custom``).
"""
from .batches import batch_loss, batch_size
from .flat_lora import FlatLoRA, filter_noise_std, noise_seed, sigma_schedule
from .lora_view import LoRALayerView, UnsupportedAdapterError, lora_layers
from .methods import METHODS, Method, MethodError, StepRunner, get_method, register_method
from .perturb import DeltaSource, PerturbationError, SeededGaussian, perturbed
from .tasks import TASKS, Task, TaskError, get_task
from .training import TrainConfig, load_run, prepare_model, run, train_loop

__version__ = "0.1.0"


def __getattr__(name):  # the Trainer subclass imports transformers' Trainer: load it on first use
    if name == "FlatLoRATrainer":
        from .trainer import FlatLoRATrainer

        return FlatLoRATrainer
    raise AttributeError(f"module 'flatlora' has no attribute {name!r}")
