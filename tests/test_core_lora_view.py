"""The LoRA layer view: out × in weights for Linear, Conv1D (fan_in_fan_out) and Conv2d; clear errors."""
import copy

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn

from helpers import TwoLayer, make_conv_lora, make_gpt2_lora, make_linear_lora
from flatlora import UnsupportedAdapterError, lora_layers


@pytest.mark.parametrize("make", [make_linear_lora, make_gpt2_lora, make_conv_lora])
def test_merged_weight_matches_peft_merge(make):
    model = make()
    views = lora_layers(model)
    merged = {v.name: v.merged_weight().detach().clone() for v in views}
    reference = copy.deepcopy(model)
    reference.merge_adapter()  # peft writes W + sBA into the base weight
    for v in views:
        ref_module = reference.get_submodule(v.name)
        ref_w = ref_module.get_base_layer().weight.detach()
        ref_matrix = ref_w.t() if v.kind == "conv1d" else ref_w.flatten(1)
        torch.testing.assert_close(merged[v.name], ref_matrix, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [make_linear_lora, make_gpt2_lora, make_conv_lora])
def test_view_shapes_and_storage(make):
    model = make()
    for v in lora_layers(model):
        m, n = v.shape
        assert v.lora_A.shape == (v.rank, n) and v.lora_B.shape == (m, v.rank)
        assert v.weight.data_ptr() == v.weight_param.data_ptr()  # a view, never a copy
        assert torch.equal(v.to_stored(v.weight), v.weight_param)
        assert v.scaling == pytest.approx(model.peft_config["default"].lora_alpha / v.rank)


def test_conv1d_is_out_by_in(gpt2_lora):
    views = {v.name: v for v in lora_layers(gpt2_lora)}
    c_attn = next(v for k, v in views.items() if k.endswith("attn.c_attn"))
    assert c_attn.kind == "conv1d"
    assert c_attn.shape == (3 * 24, 24)  # out × in, although Conv1D stores in × out
    x = torch.randn(5, 24)
    torch.testing.assert_close(c_attn.base_forward(x, c_attn.weight), c_attn.base_layer(x))


def test_conv2d_base_forward(conv_lora):
    v = next(v for v in lora_layers(conv_lora) if v.kind == "conv2d")
    assert v.shape == (6, 3 * 3 * 3)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(v.base_forward(x, v.weight), v.base_layer(x))


def test_no_lora_layer_is_an_error():
    with pytest.raises(UnsupportedAdapterError, match="no active LoRA layer"):
        lora_layers(TwoLayer())


def test_adalora_is_an_error():
    model = get_peft_model(TwoLayer(), AdaLoraConfig(target_modules=["fc1"], total_step=10, init_r=4, target_r=2))
    with pytest.raises(UnsupportedAdapterError, match="AdaLoRA"):
        lora_layers(model)


def test_dora_is_an_error():
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        lora_layers(model)


def test_several_active_adapters_is_an_error():
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, target_modules=["fc1"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["fc1"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(UnsupportedAdapterError, match="several active adapters"):
        lora_layers(model)


def test_unsupported_layer_type_is_an_error():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x):
            return self.emb(x)

    model = get_peft_model(Emb(), LoraConfig(r=2, target_modules=["emb"]))
    with pytest.raises(UnsupportedAdapterError, match="Embedding"):
        lora_layers(model)
