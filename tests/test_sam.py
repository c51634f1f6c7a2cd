"""The SAM family (flatlora.sam, the SAM methods, the runner): formulas, spaces, exactness, accumulation,
mixed precision, BatchNorm, errors — on a toy MLP with LoRA on two layers and a trainable head."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from flatlora import SAM, MergedSAM, UnsupportedAdapterError, batch_loss, get_method

LORA_METHODS = ["sam-lora", "asam-lora", "sam-full", "asam-full"]
ETA = 0.01


class Net(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.bn(self.fc1(x))))))


def lora_net(seed=0, bn=False):
    """LoRA r=2 on fc1, fc2 (B non-zero, so that col(B) is a real subspace), the head trainable."""
    torch.manual_seed(seed)
    model = get_peft_model(Net(bn), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                               modules_to_save=["head"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def model_for(method, seed=0, bn=False):
    if get_method(method).uses_lora:
        return lora_net(seed, bn)
    torch.manual_seed(seed)
    return Net(bn)


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def frozen_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def runner(method, model, rho=0.05, lr=0.1, **kw):
    opt = torch.optim.SGD(trainable(model), lr=lr, momentum=0.9)
    return get_method(method).build(model, opt, {"rho": rho}, **kw)


def adapted(model):
    """(W, B, A, s) of every LoRA layer, straight from peft's attributes (independent of lora_view)."""
    return [(m.base_layer.weight, m.lora_B["default"].weight, m.lora_A["default"].weight, m.scaling["default"])
            for m in model.modules() if isinstance(m, LoraLayer)]


def hand_epsilon(grads, rho, points=None):
    """ε = ρ g/‖g‖ (SAM) or ρ T²g/‖Tg‖ with T = |θ| + η (ASAM), in float64."""
    g = [t.double() for t in grads]
    T = [torch.ones_like(t) for t in g] if points is None else [p.double().abs() + ETA for p in points]
    norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(T, g)))
    return [rho * t * t * gi / norm for t, gi in zip(T, g)]


def merged_grads(model, batch):
    """g_W = ∂L/∂W per adapted layer, by making the base weights of a copy trainable."""
    ref = copy.deepcopy(model)
    for W, *_ in adapted(ref):
        W.requires_grad_(True)
    batch_loss(ref, batch).backward()
    return [W.grad for W, *_ in adapted(ref)]


def naive_sam_step(model, opt, batch, rho, adaptive, merged):
    """The reference: clone θ, write θ + ε into the model, take the gradient, write θ back, step."""
    space = [W for W, *_ in adapted(model)] if merged else trainable(model)
    for x in space:
        x.requires_grad_(True)
    opt.zero_grad()
    batch_loss(model, batch).backward()
    with torch.no_grad():
        points = [W + s * B @ A for W, B, A, s in adapted(model)] if merged else space
        eps = hand_epsilon([x.grad for x in space], rho, points if adaptive else None)
    if merged:
        for x in space:
            x.requires_grad_(False)
            x.grad = None
    opt.zero_grad()
    saved = [x.detach().clone() for x in space]
    with torch.no_grad():
        for x, e in zip(space, eps):
            x.add_(e.to(x.dtype))
    batch_loss(model, batch).backward()
    with torch.no_grad():
        for x, s in zip(space, saved):
            x.copy_(s)
    opt.step()


# ----------------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_epsilon_on_parameters(adaptive):
    model = lora_net()
    params = trainable(model)
    sam = SAM(params, torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=ETA, lr=0.1)
    batch_loss(model, data()).backward()
    theta = [p.detach().clone() for p in params]
    expected = hand_epsilon([p.grad for p in params], 0.05, theta if adaptive else None)
    assert sam.first_step()
    for p, t, e in zip(params, theta, expected):
        torch.testing.assert_close((p.detach() - t).double(), e, rtol=1e-4, atol=1e-7)
    sam.restore()
    assert all(torch.equal(p, t) for p, t in zip(params, theta))


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_epsilon_on_merged_weights(adaptive):
    model, batch = lora_net(), data()
    g_w = merged_grads(model, batch)
    with torch.no_grad():
        points = [W + s * B @ A for W, B, A, s in adapted(model)]
    expected = hand_epsilon(g_w, 0.05, points if adaptive else None)
    sam = MergedSAM(model, torch.optim.SGD, rho=0.05, adaptive=adaptive, eta=ETA, lr=0.1)
    with sam.first_pass():
        batch_loss(model, batch).backward()
    assert sam.first_step()
    assert list(sam.epsilon) == [v.name for v in sam.layers]
    for eps, e in zip(sam.epsilon.values(), expected):
        torch.testing.assert_close(eps.double(), e, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------ tangent and normal space
def normal_part(X, B, A):
    """(I − P_T) X with P_T(X) = P_U X + X P_V − P_U X P_V, U, V orthonormal bases of col(B), row(A)."""
    U, V = torch.linalg.qr(B.double()).Q, torch.linalg.qr(A.double().T).Q
    PU, PV = U @ U.T, V @ V.T
    X = X.double()
    return X - (PU @ X + X @ PV - PU @ X @ PV)


def test_sam_full_epsilon_has_a_normal_component():
    model = lora_net()
    sam = MergedSAM(model, torch.optim.SGD, rho=0.05, lr=0.1)
    with sam.first_pass():
        batch_loss(model, data()).backward()
    sam.first_step()
    for (_, B, A, _), eps in zip(adapted(model), sam.epsilon.values()):
        assert normal_part(eps, B, A).norm() > 0.3 * eps.norm()


def lora_step_change(rho):
    """ΔW' = s(B'A' − BA) per layer, made by sam-lora's ε (first step only), and the factors before."""
    model = lora_net()
    sam = SAM(trainable(model), torch.optim.SGD, rho=rho, lr=0.1)
    before = [(B.detach().clone(), A.detach().clone()) for _, B, A, _ in adapted(model)]
    batch_loss(model, data()).backward()
    sam.first_step()
    return [(s * (B.detach().double() @ A.detach().double() - B0.double() @ A0.double()), B0, A0)
            for (_, B, A, s), (B0, A0) in zip(adapted(model), before)]


def test_sam_lora_moves_merged_weights_in_the_tangent_space_up_to_rho_squared():
    rho = 0.05
    for (d1, B, A), (d2, _, _) in zip(lora_step_change(rho), lora_step_change(rho / 2)):
        n1, n2 = normal_part(d1, B, A).norm(), normal_part(d2, B, A).norm()
        assert n1 < 0.1 * d1.norm()  # mostly tangent
        assert float(n1 / n2) == pytest.approx(4.0, rel=1e-3)  # and the normal part is exactly second order


# ------------------------------------------------------------------ exactness against a reference
@pytest.mark.parametrize("method", LORA_METHODS)
def test_update_matches_naive_reference_and_base_weights_stay_bit_identical(method):
    model, batch = lora_net(), data()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(trainable(reference), lr=0.1, momentum=0.9)
    run = runner(method, model, rho=0.05)
    frozen = frozen_state(model)
    for t in range(3):
        run.step([batch], t)
        naive_sam_step(reference, ref_opt, batch, 0.05, adaptive=method.startswith("asam"),
                       merged=method.endswith("full"))
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
        for p, q in zip(trainable(model), trainable(reference)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", LORA_METHODS[::2])
def test_step_with_closure_equals_the_runner(method):
    model, batch = lora_net(), data()
    twin = copy.deepcopy(model)
    runner(method, model).step([batch], 0)
    opt = torch.optim.SGD(trainable(twin), lr=0.1, momentum=0.9)
    sam = MergedSAM(twin, opt, rho=0.05) if method.endswith("full") else SAM(trainable(twin), opt, rho=0.05)

    def closure():
        loss = batch_loss(twin, batch)
        loss.backward()
        return loss

    sam.step(closure)
    for p, q in zip(trainable(model), trainable(twin)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# --------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("method", LORA_METHODS + ["sam"])
def test_two_micro_batches_give_the_update_of_one_batch_twice_the_size(method):
    x, y = data(16)
    whole, split = model_for(method), model_for(method)
    runner(method, whole).step([(x, y)], 0)
    runner(method, split).step([(x[:8], y[:8]), (x[8:], y[8:])], 0)
    for p, q in zip(trainable(whole), trainable(split)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("method", LORA_METHODS)
def test_grad_scaler_under_bf16_autocast_matches_fp32(method):
    batch = data()
    exact, mixed = lora_net(), lora_net()
    frozen = frozen_state(mixed)
    scaler = torch.amp.GradScaler("cpu")
    fp32 = runner(method, exact, lr=0.05)
    bf16 = runner(method, mixed, lr=0.05, scaler=scaler, autocast_dtype=torch.bfloat16)
    for t in range(3):
        fp32.step([batch], t)
        bf16.step([batch], t)
    assert scaler.get_scale() == 2.0**16  # no step was skipped
    assert all(torch.equal(p, frozen[n]) for n, p in mixed.named_parameters() if not p.requires_grad)
    for p, q in zip(trainable(exact), trainable(mixed)):
        torch.testing.assert_close(p, q, rtol=0.05, atol=2e-2)


def overflowing(at_call):
    """A loss that is inf on its ``at_call``-th evaluation (0: the first pass, 1: the second)."""
    calls = []

    def loss_fn(model, batch):
        calls.append(None)
        loss = batch_loss(model, batch)
        return loss * 1e39 if len(calls) - 1 == at_call else loss

    return loss_fn


@pytest.mark.parametrize("method", ["sam-lora", "sam-full"])
@pytest.mark.parametrize("at_call", [0, 1])
def test_an_overflow_in_either_pass_skips_the_step_and_lowers_the_scale(method, at_call):
    model = lora_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu")
    run = runner(method, model, scaler=scaler, autocast_dtype=torch.bfloat16, loss_fn=overflowing(at_call))
    run.step([data()], 0)
    assert scaler.get_scale() < 2.0**16
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_non_finite_gradient_without_scaler_is_an_error():
    with pytest.raises(FloatingPointError, match="not finite"):
        runner("sam-lora", lora_net(), loss_fn=overflowing(0)).step([data()], 0)


# ---------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("method", ["sam-lora", "sam-full"])
def test_batchnorm_running_statistics_are_updated_once_per_micro_batch(method):
    x, y = data(16)
    model = lora_net(bn=True)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():  # what plain training's forward passes do to the statistics
        reference(x[:8]), reference(x[8:])
    runner(method, model).step([(x[:8], y[:8]), (x[8:], y[8:])], 0)
    bn, ref_bn = model.base_model.model.bn, reference.base_model.model.bn
    assert int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-7)
    assert bn.track_running_stats


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("rho", [-0.01, float("nan")])
def test_negative_or_nan_rho_is_rejected(rho):
    model = lora_net()
    with pytest.raises(ValueError, match="rho"):
        SAM(trainable(model), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        MergedSAM(model, torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        runner("asam-full", model, rho=rho)


def test_sam_full_on_a_model_without_lora_layers_is_an_error():
    model = Net()
    with pytest.raises(UnsupportedAdapterError, match="needs LoRA layers"):
        MergedSAM(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(UnsupportedAdapterError, match="method 'sam'"):
        runner("sam-full", model)


@pytest.mark.parametrize("cls", [SAM, MergedSAM])
def test_a_closure_that_never_calls_backward_is_an_error(cls):
    model = lora_net()
    sam = (cls(model, torch.optim.SGD, lr=0.1) if cls is MergedSAM
           else cls(trainable(model), torch.optim.SGD, lr=0.1))
    with pytest.raises(RuntimeError, match="backward"):
        sam.step(lambda: batch_loss(model, data()))
    with pytest.raises(TypeError, match="closure"):
        sam.step()


def test_merged_sam_first_pass_outside_its_context_is_an_error():
    model = lora_net()
    sam = MergedSAM(model, torch.optim.SGD, lr=0.1)
    batch_loss(model, data()).backward()
    with pytest.raises(RuntimeError, match="first_pass"):
        sam.first_step()
    with pytest.raises(RuntimeError, match="first_step"):
        sam.second_pass()


def test_base_optimizer_must_be_an_optimizer_over_the_same_parameters():
    model = lora_net()
    params = trainable(model)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params, "adamw")
    with pytest.raises(ValueError, match="exactly the parameters"):
        SAM(params, torch.optim.SGD(params[:1], lr=0.1))
    with pytest.raises(TypeError, match="constructor"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.2)


def test_state_dict_is_the_base_optimizers():
    model = lora_net()
    sam = SAM(trainable(model), torch.optim.AdamW, lr=1e-3)

    def closure():
        loss = batch_loss(model, data())
        loss.backward()
        return loss

    sam.step(closure)
    state = sam.state_dict()
    assert sorted(state["state"]) == list(range(len(trainable(model)))) and "exp_avg" in state["state"][0]
    twin = SAM(trainable(model), torch.optim.AdamW, lr=1e-3)
    twin.load_state_dict(state)
    assert torch.equal(twin.base_optimizer.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
