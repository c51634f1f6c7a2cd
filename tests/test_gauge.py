"""The balanced gauge (landscape.gauge): same function, balanced factors, a LoRA-space spectrum that no
rescaling (A·c, B/c) changes, and the model never written."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from flatlora import UnsupportedAdapterError, lora_layers
from landscape import Loss, balanced_copy, dense_hessian
from landscape.gauge import balance_factors, gauge_imbalance


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))]


def _rescaled(model, c):
    """The same function in another gauge: (A·c, B/c) in every layer."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for view in lora_layers(out):
            view.lora_A_param.mul_(c)
            view.lora_B_param.div_(c)
    return out


def _lambda_max(model, loss):
    h = dense_hessian(model, loss, "lora", progress=False).numpy()
    return np.linalg.eigvalsh((h + h.T) / 2)[-1]


@pytest.mark.parametrize("fixture", ["linear_lora", "conv_lora", "gpt2_lora"])
def test_balanced_copy_keeps_merged_weights(fixture, request):
    model = request.getfixturevalue(fixture).double()
    before = [v.merged_weight().detach() for v in lora_layers(model)]
    after = [v.merged_weight().detach() for v in lora_layers(balanced_copy(model))]
    for w, w_hat in zip(before, after):
        torch.testing.assert_close(w_hat, w, rtol=1e-12, atol=1e-14)


def test_balanced_copy_keeps_loss(linear_lora):
    model, loss = linear_lora.double(), Loss(_data())
    assert loss(balanced_copy(model)) == pytest.approx(loss(model), rel=1e-6)


def test_balanced_factors_satisfy_btb_equal_aat(linear_lora):
    for view in lora_layers(balanced_copy(linear_lora.double())):
        a, b = view.lora_A.detach(), view.lora_B.detach()
        torch.testing.assert_close(b.t() @ b, a @ a.t(), rtol=0, atol=1e-12)


def test_balance_factors_pads_rank_above_min_dimension():
    """r = 6 > min(m, n) = 3: B·A has rank ≤ 3 and the balanced factors' extra rows / columns are zero."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    a_hat, b_hat = balance_factors(a, b)
    assert (a_hat.shape, b_hat.shape) == (a.shape, b.shape)
    torch.testing.assert_close(b_hat @ a_hat, b @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b_hat.t() @ b_hat, a_hat @ a_hat.t(), rtol=0, atol=1e-12)


def test_balanced_lambda_max_is_gauge_free_and_as_trained_is_not(linear_lora):
    model, loss = linear_lora.double(), Loss(_data())
    gauges = [_rescaled(model, c) for c in (0.5, 1.0, 2.0)]
    balanced = [_lambda_max(balanced_copy(m), loss) for m in gauges]
    as_trained = [_lambda_max(m, loss) for m in gauges]
    np.testing.assert_allclose(balanced, balanced[1], rtol=1e-9)
    assert min(abs(as_trained[0] - as_trained[1]), abs(as_trained[2] - as_trained[1])) > 0.05 * as_trained[1]


def test_balanced_copy_leaves_model_bitwise(linear_lora):
    model = linear_lora.double().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    balanced_copy(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())


def test_gauge_imbalance_is_one_at_peft_init_and_zero_balanced():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(5, 4)), LoraConfig(r=2, target_modules=["0"])).double()
    assert gauge_imbalance(model) == 1.0  # B = 0: ‖0 − AAᵀ‖ / ‖AAᵀ‖
    with torch.no_grad():
        lora_layers(model)[0].lora_B_param.normal_()
    assert gauge_imbalance(balanced_copy(model)) < 1e-14


def test_balanced_copy_of_a_model_without_lora_raises():
    with pytest.raises(UnsupportedAdapterError, match="no active LoRA layer"):
        balanced_copy(nn.Linear(3, 2))


def test_the_probe_suite_probes_the_lora_space_in_the_balanced_gauge(linear_lora):
    """probe_model's ``lora-balanced`` rows are the same for every gauge (A·c, B/c) — λ₁ equal to the
    dense balanced Hessian's — while its ``lora`` (as trained) rows change with c; the model is not
    written; the worst case comes with its first-order term ρ‖∇L‖."""
    from landscape.study.suite import ProbeSettings, probe_model

    model, loss = linear_lora.double(), Loss(_data())
    settings = ProbeSettings(spaces=("lora-balanced", "lora"), eig_tol=1e-8, sigmas=(0.05,), noise_max_samples=2,
                             noise_min_samples=2, num_directions=1, alphas=3, rhos=(0.05,), worst_case_steps=1)
    eig = {}
    for c in (0.5, 2.0):
        m = _rescaled(model, c)
        before = {n: p.clone() for n, p in m.state_dict().items()}
        rows, _ = probe_model(m, loss, settings)
        assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())
        eig[c] = rows[rows["measure"] == "eigenvalue"].set_index("space")["value"]
        worst = rows.set_index(["space", "measure"])["value"]
        assert worst[("lora", "worst_case")] == pytest.approx(worst[("lora", "worst_case_first_order")], rel=0.05)
    assert eig[0.5]["lora-balanced"] == pytest.approx(eig[2.0]["lora-balanced"], rel=1e-6)
    assert eig[0.5]["lora-balanced"] == pytest.approx(_lambda_max(balanced_copy(model), loss), rel=1e-6)
    assert abs(eig[0.5]["lora"] / eig[2.0]["lora"] - 1) > 0.1
