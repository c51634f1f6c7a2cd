"""Spaces: the contract, offsets against a clone-and-write reference, gradients into δ only,
tangent / normal geometry, vectorized = looped evaluation, and errors before any work."""
import copy

import numpy as np
import pytest
import torch

from helpers import TwoLayer, make_conv_lora, make_gpt2_lora, make_linear_lora
from flatlora import UnsupportedAdapterError, lora_layers
from landscape import Loss, SpaceError, space
from landscape.evaluate import PointEvaluator, value_and_grad

KINDS = ["lora", "merged", "all", "tangent", "normal"]


def _data(seed=7, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _random(sp, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in sp.shapes.items()}


def _reference(model, sp, delta):
    """A deep copy with θ + Pδ written into it: merged coordinates into the base weight W."""
    ref = copy.deepcopy(model)
    delta = sp.project(delta)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for v in lora_layers(ref):
            if v.name in delta:
                v.weight_param.add_(v.to_stored(delta[v.name]))
        for n, d in delta.items():
            if n in params:
                params[n].add_(d)
    return ref


def test_contract_and_vectors():
    model = make_linear_lora()
    for kind in KINDS:
        sp = space(model, kind)
        assert sp.kind == kind and len(sp.names) == len(set(sp.names)) == len(sp.shapes)
        assert sp.dim == sum(s.numel() for s in sp.shapes.values())
        point, zeros = sp.point(), sp.zeros()
        assert all(point[n].shape == sp.shapes[n] and not point[n].requires_grad for n in sp.names)
        assert all(torch.count_nonzero(zeros[n]) == 0 for n in sp.names)
        d = _random(sp)
        v = sp.to_vector(d)
        assert v.shape == (sp.dim,)
        assert all(torch.equal(sp.from_vector(v)[n], d[n]) for n in sp.names)
    views = lora_layers(model)
    assert space(model, "merged").shapes == {v.name: torch.Size(v.shape) for v in views}
    assert space(model, "lora").dim == sum(v.lora_A.numel() + v.lora_B.numel() for v in views)
    assert space(model, "all").dim == sum(p.numel() for p in model.parameters())
    custom = space(model, lambda n, p: n.endswith("base_layer.bias"))
    assert custom.kind == "custom" and len(custom.names) == 2
    assert space(model, custom.names).names == custom.names


def test_include_trainable_adds_the_head():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["fc2"]))
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(head) == 2  # the trainable copy of fc2: weight and bias
    for kind in ["lora", "merged", "tangent", "normal"]:
        plain, with_head = space(model, kind), space(model, kind, include_trainable=True)
        assert not set(head) & set(plain.names)
        assert set(with_head.names) == set(plain.names) | set(head)
        d = _random(with_head)
        assert all(torch.equal(with_head.project(d)[n], d[n]) for n in head)  # never projected


@pytest.mark.parametrize("make", [make_linear_lora, make_gpt2_lora, make_conv_lora])
@pytest.mark.parametrize("kind", KINDS)
def test_at_equals_writing_the_weights(make, kind):
    model = make()
    sp = space(model, kind)
    delta = _random(sp, scale=0.1)
    name = type(model.base_model.model).__name__
    g = torch.Generator().manual_seed(3)
    if name == "GPT2LMHeadModel":
        ids = torch.randint(0, 50, (2, 6), generator=g)
        run = lambda m: m(input_ids=ids).logits
    elif name == "ConvNet":
        x = torch.randn(3, 3, 4, 4, generator=g)
        run = lambda m: m(x)
    else:
        x = torch.randn(5, 12, generator=g)
        run = lambda m: m(x)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad(), sp.at(delta):
        out = run(model)
    expected = run(_reference(model, sp, delta))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, run(model))  # the offset did something
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_into_delta_only_and_twice(kind):
    model = make_linear_lora()
    loss = Loss([_data()])
    sp = space(model, kind)
    base = _random(sp, seed=1)
    _, grad = value_and_grad(sp, loss, base)
    assert all(p.grad is None for p in model.parameters())
    # central finite differences of L along a random direction v match ⟨∇, v⟩
    v, h = _random(sp, seed=2), 1e-3
    plus = {n: base[n] + h * v[n] for n in sp.names}
    minus = {n: base[n] - h * v[n] for n in sp.names}
    fd = (value_and_grad(sp, loss, plus)[0] - value_and_grad(sp, loss, minus)[0]) / (2 * h)
    assert abs(fd - float(sp.inner(grad, v))) < 2e-3 * max(1.0, abs(fd))
    # double backward: the Hessian-vector product matches finite differences of the gradient
    leaves = {n: t.clone().requires_grad_() for n, t in base.items()}
    with loss.mode(model), sp.at(leaves):
        value = loss.value(model)
    first = torch.autograd.grad(value, list(leaves.values()), create_graph=True)
    hv = torch.autograd.grad(sum((a * v[n]).sum() for a, n in zip(first, sp.names)), list(leaves.values()))
    g_plus, g_minus = value_and_grad(sp, loss, plus)[1], value_and_grad(sp, loss, minus)[1]
    hv_fd = torch.cat([((g_plus[n] - g_minus[n]) / (2 * h)).flatten() for n in sp.names])
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv]), hv_fd, rtol=2e-2, atol=2e-3)
    if kind in ("tangent", "normal"):  # the gradient lives in the space
        assert all(torch.allclose(sp.project(grad)[n], grad[n], atol=1e-6) for n in sp.names)


def _tangent_setup(seed=0):
    model = make_linear_lora(seed)
    return model, space(model, "tangent"), space(model, "normal"), lora_layers(model)


def test_tangent_projector_is_an_orthogonal_projection():
    model, tan, nor, views = _tangent_setup()
    x, y = _random(tan, seed=1), _random(tan, seed=2)
    px, py = tan.project(x), tan.project(y)
    for n in tan.names:
        torch.testing.assert_close(tan.project(px)[n], px[n], atol=1e-6, rtol=1e-5)  # idempotent
        torch.testing.assert_close(nor.project(nor.project(x))[n], nor.project(x)[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(px[n] + nor.project(x)[n], x[n], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tan.inner(px, y), tan.inner(x, py), atol=1e-6, rtol=1e-5)  # symmetric
    assert abs(float(tan.inner(px, nor.project(y)))) < 1e-6  # normal ⟂ tangent
    assert tan.subspace_dim + nor.subspace_dim == tan.dim
    assert tan.subspace_dim == sum(v.rank * (v.shape[0] + v.shape[1]) - v.rank ** 2 for v in views)


def test_lora_updates_lie_in_the_tangent_space():
    model, tan, nor, views = _tangent_setup()
    g = torch.Generator().manual_seed(5)
    for v in views:
        db, da = torch.randn(v.lora_B.shape, generator=g), torch.randn(v.lora_A.shape, generator=g)
        z = v.scaling * (db @ v.lora_A + v.lora_B @ da).detach()
        d = {n: torch.zeros(s) for n, s in tan.shapes.items()}
        d[v.name] = z
        torch.testing.assert_close(tan.project(d)[v.name], z, atol=1e-5, rtol=1e-5)
        assert float(nor.project(d)[v.name].norm()) < 1e-5 * float(z.norm())


def test_tangent_space_is_gauge_invariant_and_handles_b_zero():
    model, tan, _, views = _tangent_setup()
    x = _random(tan, seed=4)
    rescaled = copy.deepcopy(model)
    with torch.no_grad():
        for v in lora_layers(rescaled):
            v.lora_B_param.mul_(7.0)
            v.lora_A_param.div_(7.0)
    other = space(rescaled, "tangent")
    for n in tan.names:
        torch.testing.assert_close(other.project(x)[n], tan.project(x)[n], atol=1e-5, rtol=1e-4)
    # peft's initial B = 0: T = { s·δB·A } = matrices whose rows lie in row(A), P_T(X) = X P_V
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    fresh = get_peft_model(TwoLayer(), LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"]))
    t0 = space(fresh, "tangent")
    assert t0.subspace_dim == sum(v.rank * v.shape[0] for v in lora_layers(fresh))
    y = _random(t0, seed=6)
    for v in lora_layers(fresh):
        a = v.lora_A.detach()
        expected = y[v.name] @ a.t() @ torch.linalg.solve(a @ a.t(), a)  # X P_V
        torch.testing.assert_close(t0.project(y)[v.name], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_vectorized_equals_loop(kind):
    model = make_linear_lora()
    loss = Loss([_data(n=10), _data(seed=8, n=6)])
    sp = space(model, kind)
    offsets = {n: torch.stack([_random(sp, seed=s)[n] for s in range(5)]) for n in sp.names}
    with PointEvaluator(sp, loss, batch_points=5) as vec, PointEvaluator(sp, loss, batch_points=1) as loop:
        lv, av = vec(offsets)
        ll, al = loop(offsets)
    assert vec.vectorized and not loop.vectorized
    with pytest.raises(RuntimeError, match="inside"):
        vec(offsets)
    torch.testing.assert_close(torch.from_numpy(lv), torch.from_numpy(ll), rtol=1e-5, atol=1e-6)
    assert (av == al).all()


def test_falls_back_to_a_loop_where_vmap_fails():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    loss = Loss([_data()], train_mode=True)  # BatchNorm updates its statistics in place: not vmappable
    sp = space(model, "all")
    offsets = {n: torch.stack([_random(sp, seed=s)[n] for s in range(3)]) for n in sp.names}
    with PointEvaluator(sp, loss, batch_points=3) as asked, PointEvaluator(sp, loss, batch_points=1) as loop:
        values, _ = asked(offsets)
        expected, _ = loop(offsets)
    assert asked.vectorized is False and asked.fallback_reason
    np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_errors_name_what_is_wrong():
    model = make_linear_lora()
    sp = space(model, "merged")
    with pytest.raises(SpaceError, match="unknown space 'full'"):
        space(model, "full")
    with pytest.raises(SpaceError, match="unknown parameter name"):
        space(model, ["nope.weight"])
    with pytest.raises(SpaceError, match="include_trainable"):
        space(model, "all", include_trainable=True)
    with pytest.raises(UnsupportedAdapterError):
        space(TwoLayer(), "lora")
    good = sp.zeros()
    bad_key = dict(good, **{"base_model.model.fc3": torch.zeros(2, 2)})
    with pytest.raises(SpaceError, match="fc3"):
        sp.check(bad_key)
    missing = dict(good)
    missing.pop(sp.names[0])
    with pytest.raises(SpaceError, match="lacks"):
        sp.check(missing)
    wrong_shape = dict(good, **{sp.names[0]: torch.zeros(3, 3)})
    with pytest.raises(SpaceError, match=r"has shape \(3, 3\), expected \(10, 12\)"):
        with sp.at(wrong_shape):
            pytest.fail("entered the context with a wrong shape")
    with pytest.raises(SpaceError, match="1-D with"):
        sp.from_vector(torch.zeros(3))
