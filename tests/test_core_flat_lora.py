"""Flat-LoRA: noise statistics, schedules, seeding, exact vs inplace training, one ε per optimizer step."""
import copy
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy import stats
from torch import nn

from helpers import TwoLayer, make_gpt2_lora, make_linear_lora
from flatlora import FlatLoRA, UnsupportedAdapterError, filter_noise_std, lora_layers, sigma_schedule


def _wide_linear_lora():
    """A Linear layer wide enough (64 × 96) for sharp statistical tests."""
    torch.manual_seed(0)
    return get_peft_model(TwoLayer(n_in=96, hidden=64), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]))


@pytest.mark.parametrize("make", [_wide_linear_lora, make_gpt2_lora])
def test_noise_statistics(make):
    model = make()
    flat = FlatLoRA(model, sigma=0.1, total_steps=10, schedule="constant", seed=5)
    entries, row_u, row_u_wrong = [], [], []
    for view in flat.layers:
        eps = flat.noise(3)[view.name].materialize(view).double()
        m, n = view.shape
        std = filter_noise_std(view.merged_weight(), 0.1).double()
        torch.testing.assert_close(std, 0.1 * view.merged_weight().detach().double().norm(dim=1) / math.sqrt(n))
        z = (eps / std[:, None]).numpy()
        entries.append(z.ravel())
        # each row's sum of squares is chi-square with n degrees of freedom iff its std is σ‖W'ᵢ‖/√n;
        # the chi-square cdf maps it to U(0, 1), which pools rows of layers of different widths
        row_u.append(stats.chi2(df=n).cdf((z**2).sum(1)))
        row_u_wrong.append(stats.chi2(df=n).cdf((z**2).sum(1) / 1.1**2))  # as if the std were 10 % larger
    z = np.concatenate(entries)
    assert stats.kstest(z, "norm").pvalue > 1e-3  # every entry N(0, 1) after dividing by its row's std
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert stats.kstest(np.concatenate(row_u), "uniform").pvalue > 1e-3
    assert stats.kstest(np.concatenate(row_u_wrong), "uniform").pvalue < 1e-3  # the test has power


def test_noise_differs_across_steps_and_layers_and_repeats_per_seed(linear_lora):
    flat = FlatLoRA(linear_lora, sigma=0.05, total_steps=10, schedule="constant", seed=1)
    v0, v1 = flat.layers
    e = lambda f, step, v: f.noise(step)[v.name].materialize(v)
    assert not torch.equal(e(flat, 1, v0), e(flat, 2, v0))
    z0 = e(flat, 1, v0) / filter_noise_std(v0.merged_weight(), 0.05)[:, None]
    z1 = e(flat, 1, v1) / filter_noise_std(v1.merged_weight(), 0.05)[:, None]
    assert not torch.allclose(z0[:, : z1.shape[1]].flatten()[:20], z1.flatten()[:20])
    again = FlatLoRA(linear_lora, sigma=0.05, total_steps=10, schedule="constant", seed=1)
    assert torch.equal(e(flat, 4, v0), e(again, 4, v0))
    other = FlatLoRA(linear_lora, sigma=0.05, total_steps=10, schedule="constant", seed=2)
    assert not torch.equal(e(flat, 4, v0), e(other, 4, v0))
    rank1 = FlatLoRA(linear_lora, sigma=0.05, total_steps=10, schedule="constant", seed=1, rank=1)
    assert not torch.equal(e(flat, 4, v0), e(rank1, 4, v0))
    shared = FlatLoRA(linear_lora, sigma=0.05, total_steps=10, schedule="constant", seed=1, rank=1, shared_noise=True)
    assert torch.equal(e(flat, 4, v0), e(shared, 4, v0))


@pytest.mark.parametrize(
    "schedule,expected", [("cosine", (0.0, 0.5, 1.0)), ("linear", (0.0, 0.5, 1.0)), ("constant", (1.0, 1.0, 1.0))]
)
def test_schedule(schedule, expected):
    T, sigma = 100, 0.05
    got = [sigma_schedule(sigma, t, T, schedule) for t in (0, T // 2, T)]
    assert got == pytest.approx([sigma * e for e in expected], abs=1e-12)
    assert sigma_schedule(sigma, 25, T, "cosine") == pytest.approx(sigma * (1 - math.cos(math.pi / 4)) / 2)
    assert sigma_schedule(sigma, 2 * T, T, schedule) == pytest.approx(sigma * expected[2])  # clipped at T


def _train(model, mode, steps=20, seed=0):
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)
    flat = FlatLoRA(model, sigma=0.2, total_steps=steps, seed=seed, mode=mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for t in range(steps):
        opt.zero_grad()
        with flat.perturb(t):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        opt.step()
    return losses, grads


def test_exact_mode_keeps_base_weights_and_matches_inplace():
    exact_model = make_linear_lora()
    inplace_model = copy.deepcopy(exact_model)
    w0 = [v.weight_param.clone() for v in lora_layers(exact_model)]
    loss_e, grad_e = _train(exact_model, "exact", steps=25)
    loss_i, grad_i = _train(inplace_model, "inplace", steps=25)
    assert all(torch.equal(v.weight_param, w) for v, w in zip(lora_layers(exact_model), w0))
    np.testing.assert_allclose(loss_e, loss_i, rtol=1e-5)
    for ge, gi in zip(grad_e, grad_i):
        for a, b in zip(ge, gi):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    drift = max((v.weight_param - w).abs().max().item() for v, w in zip(lora_layers(inplace_model), w0))
    assert drift < 1e-5  # inplace only round-trips approximately (the benchmark measures it)


def test_perturb_leaves_global_rng_unchanged(linear_lora):
    flat = FlatLoRA(linear_lora, sigma=0.1, total_steps=10, schedule="constant")
    state = torch.get_rng_state()
    x = torch.ones(4, 12)
    with flat.perturb(3):
        linear_lora(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_adapter_bitwise(digits_task, digits_flat_lora_run):
    """conftest's shared run (Flat-LoRA, 30 steps, seed 0, written to a folder) against the same
    settings again (no folder) and seed 1."""
    from flatlora import TrainConfig, run

    def trainable(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def adapter(seed):
        model, _ = run(TrainConfig(task="digits-mlp", method="flat-lora", steps=30, seed=seed), progress=False,
                       task=digits_task)
        return trainable(model)

    a, b, c = trainable(digits_flat_lora_run[0]), adapter(0), adapter(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_trainer_uses_one_noise_per_optimizer_step(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from flatlora import FlatLoRATrainer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 40, (8,), generator=g), "labels": int(i % 2)} for i in range(24)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             seed=0, learning_rate=1e-3)
    trainer = FlatLoRATrainer(model=model, args=args, train_dataset=data, flat_lora_sigma=0.1, flat_lora_schedule="linear")
    seen = []
    noise = trainer.flat_lora.noise
    trainer.flat_lora.noise = lambda step: (seen.append((step, trainer.state.global_step)), noise(step))[1]
    w0 = [v.weight_param.clone() for v in trainer.flat_lora.layers]
    trainer.train()
    # linear schedule: σ_0 = 0 (no noise drawn), then one ε for both micro-batches of steps 1 and 2
    assert [s for s, _ in seen] == [1, 1, 2, 2]
    assert trainer.flat_lora.total_steps == 3
    assert all(torch.equal(v.weight_param, w) for v, w in zip(trainer.flat_lora.layers, w0))


def test_bad_input_is_rejected(linear_lora):
    with pytest.raises(ValueError, match="sigma"):
        FlatLoRA(linear_lora, sigma=-0.1, total_steps=10)
    with pytest.raises(ValueError, match="schedule"):
        FlatLoRA(linear_lora, sigma=0.1, total_steps=10, schedule="exp")
    with pytest.raises(ValueError, match="mode"):
        FlatLoRA(linear_lora, sigma=0.1, total_steps=10, mode="approx")
    with pytest.raises(UnsupportedAdapterError, match="no active LoRA layer"):
        FlatLoRA(TwoLayer(), sigma=0.1, total_steps=10)
    from peft import AdaLoraConfig

    ada = get_peft_model(TwoLayer(), AdaLoraConfig(target_modules=["fc1"], total_step=10, init_r=4, target_r=2))
    with pytest.raises(UnsupportedAdapterError, match="AdaLoRA"):
        FlatLoRA(ada, sigma=0.1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        FlatLoRA(linear_lora, sigma=0.1, total_steps=None).sigma_at(3)
