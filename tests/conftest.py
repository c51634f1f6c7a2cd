"""Shared fixtures: small real peft models of each supported layer type, and offline settings."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TwoLayer(nn.Module):
    def __init__(self, n_in=12, hidden=10, n_out=4):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _nonzero_B(model, seed=1):
    """peft initialises B = 0; give B values so that s·B·A is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_linear_lora(seed=0, r=3):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TwoLayer(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2"]))
    return _nonzero_B(model, seed + 1)


def make_gpt2_lora(seed=0):
    """A tiny GPT-2 from a config (random init): its attention uses transformers' Conv1D (fan_in_fan_out)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2, attn_pdrop=0.0,
                     embd_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True, lora_dropout=0.0))
    return _nonzero_B(model, seed + 1)


def make_conv_lora(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(ConvNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "fc"]))
    return _nonzero_B(model, seed + 1)


@pytest.fixture
def linear_lora():
    return make_linear_lora()


@pytest.fixture
def gpt2_lora():
    return make_gpt2_lora()


@pytest.fixture
def conv_lora():
    return make_conv_lora()
