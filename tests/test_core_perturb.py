"""The weight-perturbation mechanism: exact = inplace = a clone-and-add reference; W never written."""
import copy

import pytest
import torch

from helpers import make_conv_lora, make_gpt2_lora, make_linear_lora
from flatlora import PerturbationError, SeededGaussian, lora_layers, perturbed


def _inputs(model):
    g = torch.Generator().manual_seed(7)
    name = type(model.base_model.model).__name__
    if name == "GPT2LMHeadModel":
        ids = torch.randint(0, 50, (3, 8), generator=g)
        return lambda m: m(input_ids=ids, labels=ids).loss
    if name == "ConvNet":
        x, y = torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 5, (4,), generator=g)
    else:
        x, y = torch.randn(6, 12, generator=g), torch.randint(0, 4, (6,), generator=g)
    x = x.to(next(model.parameters()).dtype)
    return lambda m: torch.nn.functional.cross_entropy(m(x), y)


def _deltas(views, kind, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "seeded":
        return {v.name: SeededGaussian(torch.rand(v.shape[0], generator=g) * 0.05, seed=100 + i) for i, v in enumerate(views)}
    return {v.name: torch.randn(v.shape, generator=g) * 0.02 for v in views}


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [make_linear_lora, make_gpt2_lora, make_conv_lora])
@pytest.mark.parametrize("kind", ["seeded", "tensor"])
def test_exact_and_inplace_match_reference(make, kind):
    model = make()
    loss_fn = _inputs(model)
    views = lora_layers(model)
    deltas = _deltas(views, kind)
    before = {n: t.clone() for n, t in model.state_dict().items()}

    reference = copy.deepcopy(model)  # the naive way: write W + ΔW into a copy
    with torch.no_grad():
        for v in lora_layers(reference):
            d = deltas[v.name]
            d = d.materialize(v) if isinstance(d, SeededGaussian) else d
            v.weight_param.add_(v.to_stored(d))
    ref_loss, ref_grads = _loss_and_grads(reference, loss_fn)

    for mode in ("exact", "inplace"):
        for _ in range(3):
            with perturbed(views, deltas, mode=mode):
                loss, grads = _loss_and_grads(model, loss_fn)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            for n in ref_grads:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)
        after = model.state_dict()
        for n, t in before.items():
            if mode == "exact":  # W never written: bit-identical
                assert torch.equal(after[n], t), n
            else:  # the inplace round trip W + ΔW − ΔW is exact only up to rounding
                torch.testing.assert_close(after[n], t, rtol=0, atol=1e-6)


def test_differentiable_delta_gets_the_full_weight_gradient(linear_lora):
    loss_fn = _inputs(linear_lora)
    views = lora_layers(linear_lora)
    deltas = {v.name: torch.zeros(v.shape, requires_grad=True) for v in views}
    with perturbed(views, deltas):
        loss_fn(linear_lora).backward()
    reference = copy.deepcopy(linear_lora)
    for v in lora_layers(reference):
        v.weight_param.requires_grad_(True)
    loss_fn(reference).backward()
    for v, rv in zip(views, lora_layers(reference)):
        torch.testing.assert_close(deltas[v.name].grad, rv.to_matrix(rv.weight_param.grad))


def test_differentiable_delta_supports_double_backward(linear_lora):
    """Hessian-vector products through ΔW: compare with finite differences of the gradient."""
    loss_fn = _inputs(linear_lora.double())
    views = lora_layers(linear_lora)
    v0 = views[0]
    vec = torch.randn(v0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grad_at(eps):
        d = (eps * vec).clone().requires_grad_(True)
        with perturbed(views, {v0.name: d}):
            (g,) = torch.autograd.grad(loss_fn(linear_lora), d, create_graph=True)
        return g, d

    g, d = grad_at(0.0)
    (hv,) = torch.autograd.grad((g * vec).sum(), d)
    h = 1e-5
    fd = (grad_at(h)[0] - grad_at(-h)[0]) / (2 * h)
    torch.testing.assert_close(hv, fd.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("trainable_w", [False, True])
def test_exact_mode_stores_no_weight_sized_tensor(linear_lora, trainable_w):
    """exact + seeded ΔW: autograd keeps no W + ΔW (regenerated in backward), and keeps the layer
    input only when ∂W is needed (a frozen W — LoRA — needs none)."""
    v = lora_layers(linear_lora)[0]
    v.weight_param.requires_grad_(trainable_w)
    x = torch.randn(5, v.shape[1], requires_grad=True)
    noise = SeededGaussian(torch.full((v.shape[0],), 0.1), 0)
    saved = []
    with perturbed([v], {v.name: noise}):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = v.base_layer(x)
        y.sum().backward()
    assert saved == ([tuple(x.shape)] if trainable_w else [])
    assert torch.equal(x.grad, torch.ones(5, v.shape[0]) @ (v.weight + noise.materialize(v)))
    if trainable_w:
        torch.testing.assert_close(v.weight_param.grad, torch.ones(5, v.shape[0]).t() @ x.detach())


def test_bf16_autocast(linear_lora):
    loss_fn = _inputs(linear_lora)
    views = lora_layers(linear_lora)
    deltas = _deltas(views, "seeded")
    with perturbed(views, deltas):
        loss32, grads32 = _loss_and_grads(linear_lora, loss_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16), perturbed(views, deltas):
        loss16, grads16 = _loss_and_grads(linear_lora, loss_fn)
    torch.testing.assert_close(loss16.float(), loss32, rtol=3e-2, atol=3e-2)
    for n in grads32:
        assert grads16[n].dtype == torch.float32
        torch.testing.assert_close(grads16[n], grads32[n], rtol=0.1, atol=2e-2)


def test_misuse_is_an_error(linear_lora):
    views = lora_layers(linear_lora)
    v = views[0]
    with pytest.raises(ValueError, match="mode"):
        with perturbed(views, {}, mode="sideways"):
            pass
    with pytest.raises(KeyError, match="not LoRA layers"):
        with perturbed(views, {"nope": torch.zeros(v.shape)}):
            pass
    with perturbed(views, {v.name: torch.zeros(v.shape)}):
        with pytest.raises(PerturbationError, match="do not nest"):
            with perturbed(views, {v.name: torch.zeros(v.shape)}):
                pass
    with pytest.raises(PerturbationError, match="exact"):
        with perturbed(views, {v.name: torch.zeros(v.shape, requires_grad=True)}, mode="inplace"):
            pass
    with pytest.raises(ValueError, match="shape"):
        with perturbed(views, {v.name: torch.zeros(2, 2)}, mode="inplace"):
            pass
    assert "forward" not in vars(v.base_layer)  # every context cleaned up after the errors
