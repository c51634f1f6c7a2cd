"""Shared fixtures (models from :mod:`helpers`) and offline settings."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from helpers import make_conv_lora, make_gpt2_lora, make_linear_lora


@pytest.fixture
def linear_lora():
    return make_linear_lora()


@pytest.fixture
def gpt2_lora():
    return make_gpt2_lora()


@pytest.fixture
def conv_lora():
    return make_conv_lora()
