"""Small real peft models of each supported layer type, shared by the tests (import from here; tests
never import each other)."""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TwoLayer(nn.Module):
    def __init__(self, n_in=12, hidden=10, n_out=4):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _nonzero_B(model, seed=1):
    """peft initialises B = 0; give B values so that s·B·A is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_linear_lora(seed=0, r=3):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TwoLayer(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2"]))
    return _nonzero_B(model, seed + 1)


def make_gpt2_lora(seed=0):
    """A tiny GPT-2 from a config (random init): its attention uses transformers' Conv1D (fan_in_fan_out)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2, attn_pdrop=0.0,
                     embd_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True, lora_dropout=0.0))
    return _nonzero_B(model, seed + 1)


def make_conv_lora(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(ConvNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "fc"]))
    return _nonzero_B(model, seed + 1)


class DictNet(nn.Module):
    """A model in the Trainer's convention: keyword inputs, a dict with the loss out."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def dict_lora_net():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(DictNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                                 modules_to_save=["head"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def examples(n=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def reference_hessian(model, data, names):
    """Dense Hessian of Σ_b n_b CE_b / N in the parameters ``names`` (flattened in that order)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    total = sum(len(y) for _, y in data)

    def f(flat):
        local = dict(params)
        local.update({n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)})
        return sum(F.cross_entropy(functional_call(model, local, (x,)), y) * len(y) / total for x, y in data)

    model.eval()
    return hessian(f)(torch.cat([params[n].reshape(-1) for n in names]))


# ------------------------------------------------------------------ training under torchrun (digits-mlp)
BATCH, STEPS = 16, 20  # per rank; the train split (≈600) holds 18 steps of 2 × 16: one epoch boundary
RUNS = {  # name: settings (lora_dropout 0: equal to one process with batch 2 × 16 up to rounding)
    "lora": dict(method="lora"),
    "flat-shared": dict(method="flat-lora", shared_noise=True),
    "flat-independent": dict(method="flat-lora"),
    "sam-global": dict(method="sam-lora", sam_gradient="global", rho=0.05),
    "sam-local": dict(method="sam-lora", rho=0.05),
}


def digits_task():
    """digits-mlp with its model pretrained once (``build_model`` is deterministic, and
    ``prepare_model`` reseeds after it): every run() then skips the pretraining."""
    from flatlora import get_task

    task = get_task("digits-mlp")
    pretrained = task.build_model()
    task.build_model = lambda: copy.deepcopy(pretrained)
    return task


def config(**kw):
    from flatlora import TrainConfig

    return TrainConfig(**{"task": "digits-mlp", "batch_size": BATCH, "steps": STEPS, "lora_dropout": 0.0, **kw})
