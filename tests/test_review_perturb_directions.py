"""Review fixes (issue 11) to the perturbation mechanism and the filter-wise directions: every ΔW is
checked on entry, W + ΔW is rounded once on every path, nesting is found by the mechanism's own marker
(accelerate's hooks keep working inside), a filter is an output unit whatever the storage, and Li et
al.'s reference 1-D policy is offered."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module, remove_hook_from_module
from transformers.pytorch_utils import Conv1D

from helpers import make_gpt2_lora, make_linear_lora
from flatlora import PerturbationError, SeededGaussian, lora_layers, perturbed
from landscape import directions as D
from landscape import space


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _input(view, seed=5, dtype=torch.float32):
    return torch.randn(5, view.shape[1], generator=_gen(seed)).to(dtype)


class _Recording(ModelHook):
    """An accelerate hook that records its calls and changes nothing."""

    def __init__(self):
        self.calls = []

    def pre_forward(self, module, *args, **kwargs):
        self.calls.append("pre")
        return args, kwargs

    def post_forward(self, module, output):
        self.calls.append("post")
        return output


# ---------------------------------------------------------------- 1. ΔW shapes on entry, one rounding
@pytest.mark.parametrize("mode,kind", [("exact", "tensor"), ("exact", "seeded"), ("inplace", "tensor"),
                                       ("inplace", "seeded")])
def test_a_wrong_shaped_delta_raises_on_entry_and_changes_nothing(mode, kind):
    model = make_linear_lora()
    first, second = lora_layers(model)
    m, n = second.shape
    wrong = (SeededGaussian(torch.full((1,), 0.1), seed=0) if kind == "seeded"
             else torch.ones(1, n, requires_grad=mode == "exact"))  # (1, n) would broadcast against m × n
    before = {k: t.clone() for k, t in model.state_dict().items()}
    attributes = [dict(vars(v.base_layer)) for v in (first, second)]
    entered = False
    given = "1 row stds" if kind == "seeded" else f"shape (1, {n})"
    message = ".*".join(re.escape(part) for part in (second.name, given, f"({m}, {n})"))
    with pytest.raises(ValueError, match=message):
        with perturbed([first, second], {first.name: torch.full(first.shape, 0.1), second.name: wrong}, mode=mode):
            entered = True
            model(_input(first))
    assert not entered
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    assert [dict(vars(v.base_layer)) for v in (first, second)] == attributes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_exact_path_rounds_w_plus_delta_once(dtype):
    """ΔW not requiring grad (the autograd Function), under no_grad, requiring grad (plain ops), and
    inplace mode: all compute with round(W + ΔW), the sum in float32, bit for bit."""
    model = make_linear_lora().to(dtype)
    v = lora_layers(model)[0]
    x = _input(v, dtype=dtype)
    delta = torch.randn(v.shape, generator=_gen(1)) * 1e-2
    expected = F.linear(x, (v.weight.float() + delta).to(dtype), v.base_layer.bias)
    with perturbed([v], {v.name: delta}):
        by_function = v.base_layer(x)
    with torch.no_grad(), perturbed([v], {v.name: delta}):
        without_grad = v.base_layer(x)
    with perturbed([v], {v.name: delta.clone().requires_grad_()}):
        differentiable = v.base_layer(x)
    with perturbed([v], {v.name: delta}, mode="inplace"):
        written = v.base_layer(x)
    assert torch.equal(by_function, expected)
    assert torch.equal(without_grad, expected)
    assert torch.equal(differentiable, expected)
    assert torch.equal(written, expected)


# ---------------------------------------------------------------- 3. nesting marker, accelerate's hooks
def test_an_accelerate_hook_runs_around_the_perturbed_forward():
    v = lora_layers(make_linear_lora())[0]
    hook = _Recording()
    add_hook_to_module(v.base_layer, hook)
    x, delta = _input(v), torch.randn(v.shape, generator=_gen(1)) * 0.1
    with perturbed([v], {v.name: delta}):
        y = v.base_layer(x)
    assert hook.calls == ["pre", "post"]
    assert torch.equal(y, F.linear(x, v.weight + delta, v.base_layer.bias))


def test_exit_restores_a_hooked_layer_exactly():
    v = lora_layers(make_linear_lora())[0]
    add_hook_to_module(v.base_layer, _Recording())
    attributes = dict(vars(v.base_layer))
    with perturbed([v], {v.name: torch.zeros(v.shape)}):
        pass
    assert vars(v.base_layer).keys() == attributes.keys()
    assert all(vars(v.base_layer)[k] is attributes[k] for k in attributes)


def test_nesting_on_a_hooked_layer_is_still_an_error():
    v = lora_layers(make_linear_lora())[0]
    add_hook_to_module(v.base_layer, _Recording())
    with perturbed([v], {v.name: torch.zeros(v.shape)}):
        with pytest.raises(PerturbationError, match="do not nest"):
            with perturbed([v], {v.name: torch.zeros(v.shape)}):
                pass


def test_a_forward_left_by_a_removed_hook_is_no_obstacle():
    """accelerate's remove_hook_from_module leaves ``forward`` = the layer's own bound forward."""
    v = lora_layers(make_linear_lora())[0]
    add_hook_to_module(v.base_layer, _Recording())
    remove_hook_from_module(v.base_layer)
    x, delta = _input(v), torch.randn(v.shape, generator=_gen(1)) * 0.1
    with perturbed([v], {v.name: delta}):
        y = v.base_layer(x)
    assert torch.equal(y, F.linear(x, v.weight + delta, v.base_layer.bias))


def test_an_unknown_instance_forward_is_an_error_not_bypassed():
    v = lora_layers(make_linear_lora())[0]
    v.base_layer.forward = lambda x: x
    with pytest.raises(PerturbationError, match="instance `forward`"):
        with perturbed([v], {v.name: torch.zeros(v.shape)}):
            pass


@pytest.mark.parametrize("kind", ["seeded", "tensor"])
def test_backward_works_when_an_offload_hook_has_put_the_weight_away(kind):
    """accelerate's offloading moves W to the meta device after forward: backward uses the W of forward."""
    model, reference = make_linear_lora(), make_linear_lora()
    v, ref = lora_layers(model)[0], lora_layers(reference)[0]
    delta = (SeededGaussian(torch.full((v.shape[0],), 0.1), seed=4) if kind == "seeded"
             else torch.randn(v.shape, generator=_gen(1)) * 0.1)
    add_hook_to_module(v.base_layer, AlignDevicesHook(execution_device="cpu", offload=True))
    assert v.base_layer.weight.is_meta
    x, x_ref = _input(v).requires_grad_(), _input(v).requires_grad_()
    with perturbed([v], {v.name: delta}):
        v.base_layer(x).square().sum().backward()
    with perturbed([ref], {ref.name: delta}):
        ref.base_layer(x_ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_inplace_mode_refuses_an_offloaded_weight():
    v = lora_layers(make_linear_lora())[0]
    add_hook_to_module(v.base_layer, AlignDevicesHook(execution_device="cpu", offload=True))
    with pytest.raises(PerturbationError, match="offloaded.*mode='exact'"):
        with perturbed([v], {v.name: torch.zeros(v.shape)}, mode="inplace"):
            pass


# ---------------------------------------------------------------- 2. a filter is an output unit
def _conv1d_weights(model):
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)]


def test_filter_normalization_of_conv1d_weights_in_the_all_space_is_per_output_unit():
    model = make_gpt2_lora()
    sp = space(model, "all")
    names = _conv1d_weights(model)  # stored in × out: an output unit is a column
    assert any(".base_layer." in n for n in names) and any(".c_fc." in n for n in names)  # LoRA-wrapped or not
    theta, d = sp.point(), D.filter_normalized(sp, _gen())
    for n in names:
        torch.testing.assert_close(d[n].norm(dim=0), theta[n].norm(dim=0))


def test_flat_lora_noise_of_a_conv1d_weight_in_a_custom_space_is_per_output_unit():
    model = make_gpt2_lora()
    name = next(n for n in _conv1d_weights(model) if ".c_fc." in n)
    sp = space(model, [name])
    theta = sp.point()[name]
    fan_in = theta.shape[0]
    expected = torch.randn(theta.shape, generator=_gen(3)) * (0.05 * theta.norm(dim=0) / math.sqrt(fan_in))
    torch.testing.assert_close(D.flat_lora_noise(sp, _gen(3), sigma=0.05)[name], expected)


# ---------------------------------------------------------------- 4. Li et al.'s reference 1-D policy
def test_one_d_copy_sets_1d_coordinates_to_a_copy_of_theta():
    sp = space(make_linear_lora(), "all")
    theta, d = sp.point(), D.filter_normalized(sp, _gen(), one_d="copy")
    vectors = [n for n in sp.names if theta[n].dim() == 1]
    assert vectors
    for n in vectors:
        assert torch.equal(d[n], theta[n]) and d[n].data_ptr() != theta[n].data_ptr()


def test_flat_lora_noise_refuses_the_copy_policy():
    sp = space(make_linear_lora(), "all")
    with pytest.raises(ValueError, match="'copy'.*filter_normalize"):
        D.flat_lora_noise(sp, _gen(), one_d="copy")
