"""Every Hessian operator against its dense matrix (curvlinops' habit), in every space and backend.

The reference is computed independently of the operator: ``torch.func.hessian`` of the loss as a
function of the flattened parameters (``functional_call``), and for tangent / normal the projector
P_T = P_U ⊗ I + I ⊗ P_V − P_U ⊗ P_V built from SVDs of B and A.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

from helpers import make_linear_lora, reference_hessian
from flatlora import lora_layers
from landscape import Loss, space, snapshot
from landscape.hessian.dense import dense_hessian
from landscape.hessian.operator import HessianOperator

BACKENDS = ["double-backward", "func", "finite-difference"]


def batches(n_in=12, sizes=(5, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, n_in, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def tangent_projector(model):
    """Block-diagonal P_T over the adapted layers, row-major vec of each m×n merged weight."""
    blocks = []
    for v in lora_layers(model):
        b, a = v.lora_B.detach(), v.lora_A.detach()
        u = torch.linalg.svd(b, full_matrices=False)[0][:, : torch.linalg.matrix_rank(b)]
        w = torch.linalg.svd(a.t(), full_matrices=False)[0][:, : torch.linalg.matrix_rank(a)]
        pu, pv = u @ u.t(), w @ w.t()
        iu, iv = torch.eye(pu.shape[0], dtype=pu.dtype), torch.eye(pv.shape[0], dtype=pv.dtype)
        blocks.append(torch.kron(pu, iv) + torch.kron(iu, pv) - torch.kron(pu, pv))
    return torch.block_diag(*blocks)


@pytest.fixture(scope="module")
def lora64():
    return make_linear_lora().double()


@pytest.fixture(scope="module")
def references(lora64):
    data = batches()
    sp = {kind: space(lora64, kind) for kind in ("lora", "merged", "all")}
    weight_of = {v.name: v.weight_name for v in lora_layers(lora64)}
    ref = {
        "lora": reference_hessian(lora64, data, sp["lora"].names),
        "all": reference_hessian(lora64, data, sp["all"].names),
        "merged": reference_hessian(lora64, data, [weight_of[n] for n in sp["merged"].names]),
    }
    p = tangent_projector(lora64)
    ref["tangent"] = p @ ref["merged"] @ p
    q = torch.eye(p.shape[0], dtype=p.dtype) - p
    ref["normal"] = q @ ref["merged"] @ q
    return data, ref


@pytest.mark.parametrize("kind", ["lora", "merged", "all", "tangent", "normal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_matches_dense_reference(lora64, references, kind, backend):
    data, ref = references
    op = HessianOperator(lora64, Loss(data), kind, backend=backend)
    assert op.shape == ref[kind].shape
    probes = np.random.default_rng(0).standard_normal((op.shape[0], 3))
    with op.session():
        got = op.matmat(probes)
    want = ref[kind].numpy() @ probes
    rtol = 1e-6 if backend == "finite-difference" else 1e-10
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())
    assert op.products == 3


@pytest.mark.parametrize("kind", ["lora", "merged", "all", "tangent"])
def test_top3_and_trace_on_the_small_lora_model(lora64, references, kind):
    from landscape import hessian_eigenvalues, hessian_trace

    data, ref = references
    exact = torch.linalg.eigvalsh(ref[kind])
    result = hessian_eigenvalues(lora64, Loss(data), kind, k=3, tol=1e-10, progress=False)
    np.testing.assert_allclose(result.eigenvalues, exact[-3:].flip(0).numpy(), rtol=1e-5)
    est = hessian_trace(lora64, Loss(data), kind, num_samples=60, seed=1, progress=False)
    assert abs(est.estimate - torch.trace(ref[kind]).item()) < 3 * est.stderr


def test_dense_hessian_is_the_reference(lora64, references):
    data, ref = references
    for kind in ("lora", "tangent"):
        H = dense_hessian(lora64, Loss(data), kind, progress=False)
        assert H.dtype == torch.float64
        torch.testing.assert_close(H, ref[kind], rtol=0, atol=1e-12)


def test_fp32_model_gives_fp32_products(references):
    data, ref = references
    model = make_linear_lora()  # float32
    op = HessianOperator(model, Loss([(x.float(), y) for x, y in data]), "merged")
    assert op.dtype_torch == torch.float32 and op.dtype == np.float64
    v = np.random.default_rng(1).standard_normal(op.shape[0])
    want = ref["merged"].numpy() @ v
    np.testing.assert_allclose(op.matvec(v), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("keep_graphs", [0, 1])
def test_batches_are_weighted_by_sample_count_with_or_without_kept_graphs(lora64, references, keep_graphs):
    data, ref = references
    op = HessianOperator(lora64, Loss(data), "lora", keep_graphs=keep_graphs)
    v = np.random.default_rng(2).standard_normal(op.shape[0])
    np.testing.assert_allclose(op.matvec(v), ref["lora"].numpy() @ v, rtol=1e-10, atol=1e-12)


def test_train_mode_fixes_dropout_masks_and_leaves_the_global_rng_alone():
    from peft import LoraConfig, get_peft_model
    from helpers import TwoLayer

    torch.manual_seed(0)
    model = get_peft_model(TwoLayer(), LoraConfig(r=3, target_modules=["fc1", "fc2"], lora_dropout=0.5,
                                                  init_lora_weights=False)).double()
    rng = torch.get_rng_state()
    u, v = np.random.default_rng(3).standard_normal((2, space(model, "lora").dim))
    for keep in (None, 0):
        op = HessianOperator(model, Loss(batches(), train_mode=True), "lora", keep_graphs=keep)
        with op.session():
            hv, hv_again, hu = op.matvec(v), op.matvec(v), op.matvec(u)
        np.testing.assert_array_equal(hv, hv_again)  # one fixed matrix: the same masks every product
        assert u @ hv == pytest.approx(v @ hu, rel=1e-10)  # symmetric
    eval_op = HessianOperator(model, Loss(batches()), "lora")
    assert not np.allclose(eval_op.matvec(v), hv)  # the masks did change the loss
    assert torch.equal(torch.get_rng_state(), rng)


def test_operator_leaves_the_model_unchanged(lora64, references):
    data, _ = references
    model = copy.deepcopy(lora64).train()
    before = snapshot(model, copy_parameters=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for backend in BACKENDS:
        op = HessianOperator(model, Loss(data), "tangent", backend=backend)
        with op.session():
            assert not model.training  # eval mode inside
            op.matvec(np.ones(op.shape[0]))
    assert before.changes(model) == []
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bad_operator_arguments(lora64, references):
    data, _ = references
    with pytest.raises(ValueError, match="unknown Hessian backend 'jax'"):
        HessianOperator(lora64, Loss(data), backend="jax")
    with pytest.raises(TypeError, match="landscape.Loss"):
        HessianOperator(lora64, data)
    with pytest.raises(ValueError, match="keep_graphs"):
        HessianOperator(lora64, Loss(data), keep_graphs=-1)
    with pytest.raises(ValueError, match="fd_step"):
        HessianOperator(lora64, Loss(data), backend="finite-difference", fd_step=0.0)
    with pytest.raises(ValueError, match="another model"):
        HessianOperator(copy.deepcopy(lora64), Loss(data), space(lora64, "lora"))
    with pytest.raises(ValueError, match="include_trainable"):
        HessianOperator(lora64, Loss(data), space(lora64, "lora"), include_trainable=True)
    with pytest.raises(ValueError, match="unknown space"):
        HessianOperator(lora64, Loss(data), "full")
