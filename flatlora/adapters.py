"""A LoRA adapter saved anywhere (peft's ``save_pretrained``), loaded onto a local Hugging Face base
model folder — checked against it first.

    model = load_adapter("path/to/base-model", "path/to/adapter")     # PeftModel, eval mode

The adapter folder's ``adapter_config.json`` names the peft type, the task type (which decides the
model class: ``SEQ_CLS`` → ``AutoModelForSequenceClassification``, ``CAUSAL_LM``, ``SEQ_2_SEQ_LM``,
…), the target modules and the modules saved in full (a classifier head, whose saved shape gives the
number of labels). Before anything is loaded into the base model, every saved tensor is matched to
a module of the base model by name and shape; a base model the adapter was not trained on is an
error that says which module does not fit. Nothing is downloaded: both folders are local.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = ["AdapterError", "adapter_config", "adapter_shapes", "adapter_labels", "load_adapter", "MODEL_CLASSES",
           "LABELS_FILE"]

#: peft task type → transformers auto class that builds the base model
MODEL_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    None: "AutoModel",
}
_PREFIX = "base_model.model."
#: class names by id, ``{"labels": [name of id 0, name of id 1, …]}``: in a run folder (train.py) or an adapter folder
LABELS_FILE = "labels.json"


class AdapterError(ValueError):
    """An adapter folder that is not a LoRA adapter, or does not fit the base model."""


def adapter_config(adapter: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a LoRA adapter."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adapter} is not a peft adapter folder (no adapter_config.json); save an adapter "
                           "with model.save_pretrained(DIR)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter} holds a {cfg.get('peft_type')} adapter; only LoRA adapters can be probed")
    if cfg.get("task_type") not in MODEL_CLASSES:
        raise AdapterError(f"{adapter}: task type {cfg.get('task_type')!r} is not supported "
                           f"(supported: {sorted(t for t in MODEL_CLASSES if t)})")
    return cfg


def adapter_shapes(adapter: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor saved in the adapter (read without loading the tensors)."""
    adapter = Path(adapter)
    if (adapter / "adapter_model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if (adapter / "adapter_model.bin").is_file():
        state = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    raise AdapterError(f"{adapter} holds no adapter weights (adapter_model.safetensors or adapter_model.bin)")


def adapter_labels(adapter: str | os.PathLike) -> Optional[list[str]]:
    """The class names by id from ``labels.json`` in the adapter folder or the run folder above it
    (train.py writes one); None when there is none (the data's labels are then the class ids)."""
    for folder in (Path(adapter), Path(adapter).parent):
        if (folder / LABELS_FILE).is_file():
            return [str(v) for v in json.loads((folder / LABELS_FILE).read_text())["labels"]]
    return None


def _num_labels(shapes: dict[str, tuple[int, ...]], modules_to_save: list[str]) -> Optional[int]:
    """Rows of the saved classifier head (a module saved in full), if there is one."""
    for key, shape in shapes.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith(".weight") and any(name.split(".")[0] == m or f".{m}." in f".{name}" for m in modules_to_save):
            return shape[0]
    return None


def _check_fits(base: nn.Module, shapes: dict[str, tuple[int, ...]], adapter: Path, cfg: dict) -> None:
    """Every saved LoRA factor matches a module of ``base`` in name and shape (A: r × in, B: out × r)."""
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    origin = f" (its adapter_config.json names the base model {cfg.get('base_model_name_or_path')!r})"
    for key, shape in shapes.items():
        name = key.removeprefix(_PREFIX)
        for factor in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(factor):
                target = name.removesuffix(factor)
                module = modules.get(target)
                if module is None:
                    raise AdapterError(f"the adapter {adapter} adapts {target!r}, which the base model does not "
                                       f"have: the adapter does not belong to this base model{origin}")
                weight = getattr(module, "weight", None)
                if weight is None or weight.dim() != 2:
                    continue  # a conv or an embedding: left to peft's own checks
                out_f, in_f = weight.shape if not cfg.get("fan_in_fan_out") else weight.shape[::-1]
                expected = in_f if factor == ".lora_A.weight" else out_f
                got = shape[1] if factor == ".lora_A.weight" else shape[0]
                if got != expected:
                    raise AdapterError(f"the adapter {adapter} has {factor[1:7]} of shape {shape} for {target!r}, "
                                       f"whose weight in the base model is {tuple(weight.shape)}: the adapter does not "
                                       f"belong to this base model{origin}")
                break
        else:
            if name.removeprefix("modules_to_save.") in params and tuple(params[name].shape) != shape:
                raise AdapterError(f"the adapter {adapter} saves {name!r} with shape {shape}, the base model's is "
                                   f"{tuple(params[name].shape)}{origin}")


def load_adapter(base_model: str | os.PathLike, adapter: str | os.PathLike) -> nn.Module:
    """``PeftModel`` of ``adapter`` on the base model in the local folder ``base_model``, in eval mode,
    with eager attention (double backward for the Hessian probes). Raises :class:`AdapterError` for
    a folder that is not a LoRA adapter or an adapter that does not fit the base model."""
    import transformers
    from peft import PeftModel

    base_model, adapter = Path(base_model), Path(adapter)
    if not (base_model / "config.json").is_file():
        raise AdapterError(f"{base_model} is not a local Hugging Face model folder (no config.json)")
    cfg = adapter_config(adapter)
    shapes = adapter_shapes(adapter)
    kwargs = {"attn_implementation": "eager"}
    num_labels = _num_labels(shapes, cfg.get("modules_to_save") or [])
    if cfg.get("task_type") == "SEQ_CLS" and num_labels is not None:
        # the head comes from the adapter: a base saved with another head size is fine
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    auto = getattr(transformers, MODEL_CLASSES[cfg.get("task_type")])
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a new head is expected to be missing: the adapter brings it
    try:
        base = auto.from_pretrained(str(base_model), **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    _check_fits(base, shapes, adapter, cfg)
    return PeftModel.from_pretrained(base, str(adapter)).eval()
