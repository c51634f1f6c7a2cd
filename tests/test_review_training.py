"""The review's fixes to training (issue 11): the process group is joined only when asked
(fix 5), the library leaves the global RNG as it found it (fix 4), checkpoints keep the CUDA RNG
states (fix 7), and a task states its own peft task type and options."""
import pytest
import torch
import torch.distributed as dist
from peft import TaskType
from torch import nn

from flatlora import FlatLoRA, Task, TaskError, distributed, get_task, load_run, prepare_model, run
from flatlora.methods import StepRunner
from flatlora.tasks import TASKS
from helpers import config, digits_task, make_linear_lora

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}
DROPOUT = dict(method="lora", lora_dropout=0.1, steps=8, checkpoint_every=3, seed=2)  # dropout: the RNG matters


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives rank 1 of 2, with no process group started."""
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def task():
    return digits_task()


def trainable(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    ta, tb = trainable(a), trainable(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


def interrupted_run(cfg, out, task, monkeypatch, at: int, device: str = "cpu") -> None:
    """``run(cfg, out)`` stopped before step ``at`` (a simulated Ctrl-C), leaving its checkpoint."""
    original = StepRunner.step

    def step(self, micro_batches, t):
        if t == at:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, micro_batches, t)

    monkeypatch.setattr(StepRunner, "step", step)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, progress=False, task=task, device=device)
    monkeypatch.setattr(StepRunner, "step", original)


# fix 5: joining the process group is an explicit step


def test_rank_and_world_size_read_the_launchers_environment(torchrun_env):
    assert (distributed.rank(), distributed.world_size()) == (1, 2)


def test_reading_the_rank_starts_no_process_group(torchrun_env):
    for read in (distributed.rank, distributed.world_size, distributed.is_main, distributed.is_distributed):
        read()
    assert not dist.is_initialized()


def test_constructing_flat_lora_starts_no_process_group(torchrun_env):
    FlatLoRA(make_linear_lora(), 0.05, total_steps=10)
    assert not dist.is_initialized()


def test_a_collective_without_the_group_says_how_to_join_it(torchrun_env):
    with pytest.raises(RuntimeError, match=r"ensure_initialized\(\)"):
        distributed.all_gather_objects(1)


def test_ensure_initialized_in_one_process_starts_nothing(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert distributed.ensure_initialized() is False and not dist.is_initialized()


# fix 4: the global RNG is the caller's


def test_building_the_t5_model_leaves_the_global_rng():
    build = get_task("tiny-t5-repeat").build_model
    before = torch.get_rng_state()
    build()
    assert torch.equal(torch.get_rng_state(), before)


def test_prepare_model_leaves_the_global_rng(task):
    before = torch.get_rng_state()
    prepare_model(task, config(method="lora").resolved(task))
    assert torch.equal(torch.get_rng_state(), before)


def test_run_leaves_the_global_rng(task):
    before = torch.get_rng_state()
    run(config(**DROPOUT), progress=False, task=task)
    assert torch.equal(torch.get_rng_state(), before)


def test_load_run_leaves_the_global_rng(task, tmp_path):
    run(config(method="lora", steps=2), tmp_path / "run", progress=False, task=task)
    before = torch.get_rng_state()
    load_run(tmp_path / "run", task=task)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_same_seed_gives_the_same_weights_whatever_the_callers_rng(task):
    torch.manual_seed(1)
    first, _ = run(config(**DROPOUT), progress=False, task=task)
    torch.manual_seed(2)
    second, _ = run(config(**DROPOUT), progress=False, task=task)
    assert same_weights(first, second)


# fix 7: checkpoints keep the CUDA RNG states


def test_a_checkpoint_holds_the_cuda_rng_states(task, tmp_path, monkeypatch):
    interrupted_run(config(**DROPOUT), tmp_path / "r", task, monkeypatch, at=4)
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert ckpt["cuda_rng"] == [[]]  # one rank, trained on the CPU: no CUDA generator in use


def test_a_checkpoint_without_cuda_rng_states_resumes_bitwise(task, tmp_path, monkeypatch):
    """A checkpoint written before the CUDA states were kept (no ``cuda_rng`` key)."""
    reference, _ = run(config(**DROPOUT), progress=False, task=task, device="cpu")
    interrupted_run(config(**DROPOUT), tmp_path / "r", task, monkeypatch, at=4)
    path = tmp_path / "r" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["cuda_rng"]
    torch.save(ckpt, path)
    resumed, _ = run(config(**DROPOUT), tmp_path / "r", progress=False, task=task, device="cpu")
    assert same_weights(resumed, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_with_dropout_resumes_bitwise(task, tmp_path, monkeypatch):
    reference, _ = run(config(**DROPOUT), progress=False, task=task, device="cuda")
    interrupted_run(config(**DROPOUT), tmp_path / "r", task, monkeypatch, at=4, device="cuda")
    resumed, _ = run(config(**DROPOUT), tmp_path / "r", progress=False, task=task, device="cuda")
    assert same_weights(resumed, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_leaves_the_cuda_rng(task):
    before = torch.cuda.get_rng_state_all()
    run(config(**DROPOUT), progress=False, task=task, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), before))


# a task states its peft task type and its options


def plain_task(peft_task_type=None) -> Task:
    """A user's own task, as small as a Task can be."""
    return Task(name="mine", kind="classification", splits={}, collate=list, build_model=nn.Identity,
                lora_targets=None, modules_to_save=None, peft_task_type=peft_task_type, label_names=["a", "b"])


def test_a_registered_task_states_its_peft_task_type(monkeypatch):
    monkeypatch.setitem(TASKS, "mine", lambda: plain_task("SEQ_CLS"))
    assert get_task("mine").lora_config().task_type == TaskType.SEQ_CLS


def test_an_unknown_peft_task_type_names_the_choices():
    with pytest.raises(TaskError, match="SEQ_CLS"):
        plain_task("SEQUENCE_CLASSIFICATION").lora_config()


def test_get_task_passes_the_options_its_builder_takes(monkeypatch):
    monkeypatch.setitem(TASKS, "mine", lambda peft_task_type=None: plain_task(peft_task_type))
    assert get_task("mine", peft_task_type="SEQ_2_SEQ_LM").peft_task_type == "SEQ_2_SEQ_LM"


def test_get_task_refuses_options_its_builder_does_not_take(monkeypatch):
    monkeypatch.setitem(TASKS, "mine", plain_task)
    with pytest.raises(TaskError, match="'mine' takes .*'peft_task_type'.*got \\['size'\\]"):
        get_task("mine", size=3)
