"""The training core after the review (issue 11): typed method options, one check per setting,
one "parameters an optimizer updates", SAM's non-finite decision shared by the ranks (fix 6) and
ASAM's scope (fix 10).

Run as a script under torchrun, this file is the worker of
``test_a_nan_gradient_on_one_of_two_ranks_raises_on_both``."""
import datetime
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from flatlora import (SAM, FlatLoRA, FlatLoRAOptions, MergedSAM, MethodError, PlainOptions, SAMOptions, StepRunner,
                      TrainConfig, batch_loss, distributed, filter_noise_std, get_method, sigma_schedule)
from flatlora.flat_lora import check_sigma
from flatlora.sam import SAMVariant, build_sam, check_rho
from helpers import TwoLayer, make_linear_lora

ROOT = Path(__file__).resolve().parents[1]
INF, NAN = float("inf"), float("nan")
BAD_NUMBERS = [-0.1, NAN, INF, True, "0.05"]


def fake_task(n: int = 64):
    """What ``TrainConfig.resolved`` reads of a task: its defaults (none) and the train split's size."""
    return types.SimpleNamespace(defaults={}, splits={"train": range(n)})


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def linear(weight, bias) -> nn.Linear:
    """An ``nn.Linear`` with the given weight (out × in) and bias."""
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


# ----------------------------------------------------------------------------- typed method options
def test_a_mapping_becomes_the_methods_typed_options():
    assert get_method("flat-lora").options({"sigma": 0.1, "total_steps": 9}) == FlatLoRAOptions(sigma=0.1,
                                                                                                total_steps=9)


def test_no_options_are_the_defaults():
    assert get_method("asam-full").options() == SAMOptions()


def test_an_unknown_option_is_an_error_that_names_it_and_the_known_ones():
    with pytest.raises(MethodError) as e:
        get_method("sam-lora").options({"rho": 0.1, "sigma": 0.05})
    assert str(e.value) == ("method 'sam-lora' has no option(s) ['sigma']: its options are ['rho', 'gradient', 'eta', "
                            "'adaptive_scope'] (SAMOptions); remove or rename them")


def test_a_plain_method_takes_no_option():
    model = make_linear_lora()
    with pytest.raises(MethodError, match=r"method 'lora' has no option\(s\) \['rho'\]: it takes none"):
        get_method("lora").build(model, sgd(model), {"rho": 0.1})


def test_options_of_another_family_are_an_error():
    with pytest.raises(MethodError, match="method 'flat-lora' takes FlatLoRAOptions or a mapping"):
        get_method("flat-lora").options(SAMOptions())


def test_build_gives_the_runner_the_typed_options():
    model = make_linear_lora()
    options = FlatLoRAOptions(sigma=0.2, schedule="constant", seed=4, mode="inplace", shared_noise=True)
    flat = get_method("flat-lora").build(model, sgd(model), options).flat_lora
    assert (flat.sigma, flat.schedule, flat.total_steps, flat.seed, flat.mode, flat.shared_noise) == (
        0.2, "constant", None, 4, "inplace", True)


def test_flat_lora_with_a_schedule_and_no_total_steps_is_an_error_at_build():
    model = make_linear_lora()
    with pytest.raises(MethodError, match="give total_steps, or schedule='constant'"):
        get_method("flat-lora").build(model, sgd(model), {"sigma": 0.1})


@pytest.mark.parametrize("method, expected", [
    ("flat-lora", FlatLoRAOptions(sigma=0.1, schedule="linear", total_steps=7, seed=3, mode="inplace",
                                  shared_noise=True)),
    ("sam-full", SAMOptions(rho=0.2, gradient="global", adaptive_scope="weights")),
    ("lora", PlainOptions()),
])
def test_a_config_gives_its_method_only_the_options_it_reads(method, expected):
    cfg = TrainConfig(task="digits-mlp", method=method, sigma=0.1, schedule="linear", steps=7, seed=3, mode="inplace",
                      shared_noise=True, rho=0.2, sam_gradient="global", adaptive_scope="weights")
    assert cfg.resolved(fake_task()).method_options() == expected


def test_method_options_of_an_unresolved_config_is_an_error():
    with pytest.raises(ValueError, match=r"call cfg.resolved\(task\) first"):
        TrainConfig(method="flat-lora").method_options()


def test_sam_variant_takes_keywords_only():
    with pytest.raises(TypeError):
        SAMVariant(False, False, 0.05, False, "SAM")


# ------------------------------------------------------------------------- one check per setting
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_check_sigma_wants_a_finite_number_at_least_0(value):
    with pytest.raises(ValueError, match=r"sigma \(Flat-LoRA's noise scale σ\) must be a finite number >= 0"):
        check_sigma(value)


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_check_rho_wants_a_finite_number_at_least_0(value):
    with pytest.raises(ValueError, match=r"rho \(the SAM radius ρ\) must be a finite number >= 0"):
        check_rho(value)


def test_every_way_in_rejects_an_infinite_sigma():
    message = r"sigma \(Flat-LoRA's noise scale σ\) must be a finite number >= 0, got inf"
    with pytest.raises(ValueError, match=message):
        filter_noise_std(torch.ones(2, 3), INF)
    with pytest.raises(ValueError, match=message):
        FlatLoRA(make_linear_lora(), sigma=INF)
    with pytest.raises(ValueError, match=message):
        FlatLoRAOptions(sigma=INF)
    with pytest.raises(ValueError, match=message):
        TrainConfig(method="flat-lora", sigma=INF).resolved(fake_task())


def test_every_way_in_rejects_an_infinite_rho():
    model = make_linear_lora()
    message = r"rho \(the SAM radius ρ\) must be a finite number >= 0, got inf"
    with pytest.raises(ValueError, match=message):
        SAM(model.parameters(), torch.optim.SGD, rho=INF, lr=0.1)
    with pytest.raises(ValueError, match=message):
        MergedSAM(model, torch.optim.SGD, rho=INF, lr=0.1)
    with pytest.raises(ValueError, match=message):
        get_method("asam-full").build(model, sgd(model), {"rho": INF})
    with pytest.raises(ValueError, match=message):
        TrainConfig(method="sam-lora", rho=INF).resolved(fake_task())


def test_every_way_in_rejects_an_unknown_schedule():
    message = r"unknown σ schedule 'exp'; choose one of \('cosine', 'linear', 'constant'\)"
    with pytest.raises(ValueError, match=message):
        sigma_schedule(0.1, 1, 10, "exp")
    with pytest.raises(ValueError, match=message):
        FlatLoRA(make_linear_lora(), schedule="exp")
    with pytest.raises(ValueError, match=message):
        TrainConfig(method="flat-lora", schedule="exp").resolved(fake_task())


def test_every_way_in_rejects_an_unknown_sam_gradient_mode():
    model = make_linear_lora()
    message = r"gradient must be one of \('local', 'global'\)"
    with pytest.raises(ValueError, match="^" + message):
        SAM(model.parameters(), torch.optim.SGD, gradient="mean", lr=0.1)
    with pytest.raises(ValueError, match="^" + message):
        SAMOptions(gradient="mean")
    with pytest.raises(ValueError, match="^sam_" + message):  # the config's own name for it
        TrainConfig(method="sam-lora", sam_gradient="mean").resolved(fake_task())


def test_every_way_in_rejects_an_unknown_perturbation_mode():
    message = r"unknown perturbation mode 'approx'; choose one of \('exact', 'inplace'\)"
    with pytest.raises(ValueError, match=message):
        FlatLoRA(make_linear_lora(), mode="approx")
    with pytest.raises(ValueError, match=message):
        TrainConfig(method="flat-lora", mode="approx").resolved(fake_task())


def test_every_way_in_rejects_an_unknown_adaptive_scope():
    message = r"adaptive_scope must be one of \('all', 'weights'\)"
    with pytest.raises(ValueError, match=message):
        SAM(nn.Linear(2, 1).named_parameters(), torch.optim.SGD, adaptive=True, adaptive_scope="bias", lr=0.1)
    with pytest.raises(ValueError, match=message):
        TrainConfig(method="asam-lora", adaptive_scope="bias").resolved(fake_task())


# ----------------------------------------------------------- the parameters an optimizer updates
def test_the_runner_clips_exactly_the_parameters_its_optimizer_updates():
    inside, outside = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    inside.grad, outside.grad = torch.tensor([3.0, 4.0]), torch.tensor([30.0, 40.0])
    StepRunner(nn.Module(), torch.optim.SGD([inside], lr=0.0), max_grad_norm=1.0).update()
    torch.testing.assert_close(inside.grad, torch.tensor([0.6, 0.8]))  # ‖g‖ = 5 → 1
    assert torch.equal(outside.grad, torch.tensor([30.0, 40.0]))


# ------------------------------------------------- fix 6: a non-finite gradient, decided by all ranks
def first_step_with(grad: float, monkeypatch, others_finite: bool = True, scaler=None):
    """SAM on a 1×1 linear layer whose weight's gradient is ``grad`` (bias 1), ``all_ranks`` replaced
    by one where the other ranks' flag is ``others_finite``; returns (first_step's result, the flags sent)."""
    sent = []
    monkeypatch.setattr(distributed, "all_ranks", lambda flag: sent.append(flag) or (flag and others_finite))
    layer = linear([[1.0]], [0.0])
    layer.weight.grad, layer.bias.grad = torch.tensor([[grad]]), torch.tensor([1.0])
    return SAM(layer.parameters(), torch.optim.SGD, rho=0.1, lr=0.1).first_step(scaler=scaler), sent


def test_first_step_sends_this_ranks_finiteness(monkeypatch):
    assert first_step_with(2.0, monkeypatch) == (True, [True])


def test_a_non_finite_gradient_here_raises(monkeypatch):
    with pytest.raises(FloatingPointError, match=r"not finite \(inf/NaN\) on this rank"):
        first_step_with(NAN, monkeypatch)


def test_a_non_finite_gradient_on_another_rank_raises_here_too(monkeypatch):
    with pytest.raises(FloatingPointError, match=r"not finite \(inf/NaN\) on another rank \(this rank's is finite\)"):
        first_step_with(2.0, monkeypatch, others_finite=False)


def test_with_a_scaler_another_ranks_non_finite_gradient_skips_the_step_here(monkeypatch):
    moved, _ = first_step_with(2.0, monkeypatch, others_finite=False, scaler=torch.amp.GradScaler("cpu"))
    assert moved is False


def nan_on_rank_1_worker(out: Path) -> None:
    """Under torchrun, 2 ranks: one ``sam`` step under DDP in which rank 1's gradient is NaN. Each
    rank writes what it raised to OUT/rank{r}.txt; a rank left waiting in a collective fails after 60 s.
    The group is destroyed before exit: left to the interpreter's shutdown, gloo's threads
    occasionally aborted a rank ("terminate called without an active exception")."""
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    model = linear([[1.0, 2.0]], [0.0])
    runner = get_method("sam").build(model, sgd(model), {"rho": 0.05}, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                                     ddp=nn.parallel.DistributedDataParallel(model))
    x = torch.full((2, 2), NAN if rank == 1 else 1.0)
    try:
        runner.step([(x, torch.zeros(2, 1))], 0)
    except FloatingPointError as e:
        (out / f"rank{rank}.txt").write_text(str(e))
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_a_nan_gradient_on_one_of_two_ranks_raises_on_both(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    raised = [(tmp_path / f"rank{rank}.txt").read_text().split(" and no GradScaler")[0] for rank in (0, 1)]
    assert raised == ["the gradient at θ is not finite (inf/NaN) on another rank (this rank's is finite)",
                      "the gradient at θ is not finite (inf/NaN) on this rank"]


# ------------------------------------------------------------------------ fix 10: ASAM's scope
# T = |θ| + η with η = 0.5 on weight (1.5, −0.5) and bias 3.5: T = (2, 1) and 4, or 1 for the bias in
# scope "weights"; ε = ρ T²g/‖Tg‖ with ρ = 3. Every number is exact in float32.
def asam_step(scope: str, bias_grad: float) -> nn.Linear:
    layer = linear([[1.5, -0.5]], [3.5])
    layer.weight.grad, layer.bias.grad = torch.tensor([[1.0, 4.0]]), torch.tensor([bias_grad])
    SAM(layer.named_parameters(), torch.optim.SGD, rho=3.0, adaptive=True, eta=0.5, adaptive_scope=scope,
        lr=0.1).first_step()
    return layer


def test_asam_scales_every_tensor_by_default():
    # Tg = (2, 4, 4), ‖Tg‖ = 6, ε = 3 · (4, 4, 16) / 6 = (2, 2, 8)
    layer = asam_step("all", bias_grad=1.0)
    assert torch.equal(layer.weight, torch.tensor([[3.5, 1.5]])) and torch.equal(layer.bias, torch.tensor([11.5]))


def test_asam_weights_scope_leaves_the_bias_at_t_1():
    # Tg = (2, 4, 4), ‖Tg‖ = 6, ε = 3 · (4, 4, 4) / 6 = (2, 2, 2)
    layer = asam_step("weights", bias_grad=4.0)
    assert torch.equal(layer.weight, torch.tensor([[3.5, 1.5]])) and torch.equal(layer.bias, torch.tensor([5.5]))


def test_asam_weights_scope_needs_the_parameter_names():
    with pytest.raises(ValueError, match=r"pass params as model.named_parameters\(\)"):
        SAM(nn.Linear(2, 1).parameters(), torch.optim.SGD, adaptive=True, adaptive_scope="weights", lr=0.1)


def test_asam_lora_with_weights_scope_leaves_the_head_bias_at_t_1():
    """The method path (build_sam names the parameters): LoRA on fc1, fc2 trained whole (its bias too)."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["fc2"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum("weight" not in n for n, _ in named) == 1  # fc2's bias
    sam = build_sam("asam-lora", model, sgd(model), SAMOptions(rho=0.1, adaptive_scope="weights"))
    batch_loss(model, (torch.randn(8, 12), torch.randint(0, 4, (8,)))).backward()
    theta = {n: p.detach().clone().double() for n, p in named}
    g = {n: p.grad.double() for n, p in named}
    t = {n: theta[n].abs() + SAMOptions.eta if "weight" in n else torch.ones_like(theta[n]) for n in theta}
    norm = math.sqrt(sum(float(((t[n] * g[n]) ** 2).sum()) for n in theta))
    sam.first_step()
    for n, p in named:
        torch.testing.assert_close(p.detach().double() - theta[n], 0.1 * t[n] ** 2 * g[n] / norm, rtol=1e-4, atol=1e-7)


if __name__ == "__main__":
    nan_on_rank_1_worker(Path(sys.argv[1]))
