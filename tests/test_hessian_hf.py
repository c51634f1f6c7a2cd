"""Hugging Face models: attention without double backward (SDPA on CPU), and MiniLM on Rotten Tomatoes."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import _nonzero_B
from landscape import (AttentionError, HessianError, HessianOperator, Loss, hessian_eigenvalues, snapshot)


def tiny_bert(attn="sdpa"):
    """A 1-layer BERT from a config (random init) with LoRA on query / value, fp64."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation=attn)
    model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS",
                                                                          target_modules=["query", "value"]))
    return _nonzero_B(model).double()


def bert_loss():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 4:] = 0
    return Loss([{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}])


def attention_of(model):
    return model.base_model.model.config._attn_implementation


def test_sdpa_is_switched_to_eager_for_the_computation_and_restored():
    model, loss = tiny_bert("sdpa"), bert_loss()
    eager = copy.deepcopy(model)
    eager.base_model.model.set_attn_implementation("eager")
    with pytest.warns(UserWarning, match="using eager attention"):
        got = hessian_eigenvalues(model, loss, "merged", k=2, tol=1e-10, progress=False)
    assert attention_of(model) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eager model: no switch, no warning
        want = hessian_eigenvalues(eager, loss, "merged", k=2, tol=1e-10, progress=False)
    np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=1e-8)


def test_without_the_switch_the_error_says_how_to_load_eager_before_any_work():
    model, loss = tiny_bert("sdpa"), bert_loss()
    with pytest.raises(AttentionError, match='attn_implementation="eager"'):
        hessian_eigenvalues(model, loss, "lora", switch_attention=False)
    assert attention_of(model) == "sdpa"


def test_finite_differences_need_no_double_backward():
    model, loss = tiny_bert("sdpa"), bert_loss()
    eager = copy.deepcopy(model)
    eager.base_model.model.set_attn_implementation("eager")
    v = np.random.default_rng(0).standard_normal(HessianOperator(model, loss, "lora").shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd = HessianOperator(model, loss, "lora", backend="finite-difference", switch_attention=False).matvec(v)
    exact = HessianOperator(eager, loss, "lora").matvec(v)
    np.testing.assert_allclose(fd, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


class RawSDPA(nn.Module):
    """Attention through F.scaled_dot_product_attention with no config to switch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)  # batch, heads, tokens, 4
        a = F.scaled_dot_product_attention(h, h, h)  # the CPU flash kernel: no double backward
        return self.head(a.transpose(1, 2).reshape(x.shape).mean(1))


def test_a_kernel_without_double_backward_is_reported_with_the_fix():
    torch.manual_seed(0)
    model = RawSDPA()
    loss = Loss([(torch.randn(2, 5, 8), torch.tensor([0, 2]))])
    op = HessianOperator(model, loss, "all")
    with pytest.raises(HessianError, match="backend='finite-difference'"):
        op.matvec(np.ones(op.shape[0]))
    fd = HessianOperator(model, loss, "all", backend="finite-difference").matvec(np.ones(op.shape[0]))
    assert np.isfinite(fd).all() and np.abs(fd).max() > 0


@pytest.mark.slow
def test_rt_minilm_top_eigenvalue_in_lora_and_merged_space(rt_task):
    """MiniLM-L6 + LoRA (untrained: B = 0) on one batch of 4 Rotten Tomatoes snippets, fp32."""
    from flatlora import TrainConfig, prepare_model

    task = rt_task
    model = prepare_model(task, TrainConfig(task="rt-minilm").resolved(task))
    loss = Loss(task.batches("test", 4, limit=4))
    before = snapshot(model)
    for kind in ("lora", "merged"):
        result = hessian_eigenvalues(model, loss, kind, k=1, tol=1e-3, progress=False)
        value, direction = result.eigenvalues[0], result.eigenvectors[0]
        assert value > 0 and result.converged
        op = HessianOperator(model, loss, kind)
        v = op.space.to_vector(direction).double().numpy()
        residual = np.linalg.norm(op.matvec(v) - value * v)
        assert residual <= 2e-3 * value  # ARPACK's test, ‖Hv − λv‖ ≤ tol·|λ|, with room for fp32 products
    assert before.changes(model) == []
