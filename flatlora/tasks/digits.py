"""``digits-mlp``: an MLP pretrained inside the task on digits 0–4, LoRA-tuned on digits 5–9 (exact
dense Hessians are affordable)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import SPLIT_SEED, Task, register_task

__all__ = ["MLP"]

class MLP(nn.Module):
    """64 → 32 → 32 → 10 with tanh (smooth, so its Hessian is well defined everywhere)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _digits_mlp() -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    pre, new = (y < 5).nonzero().squeeze(1), (y >= 5).nonzero().squeeze(1)
    perm = new[torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(new)))]
    te, va, tr = perm[:200], perm[200:300], perm[300:]
    splits = {s: [{"x": x[i], "label": int(y[i])} for i in idx.tolist()]
              for s, idx in (("train", tr), ("validation", va), ("test", te))}

    def build_model() -> nn.Module:
        """Pretrain on digits 0–4 (deterministic: own generator, full batch, 300 Adam steps)."""
        gen = torch.Generator().manual_seed(SPLIT_SEED)
        model = MLP()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p.shape[-1], 1)) ** 0.5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            F.cross_entropy(model(x[pre]), y[pre]).backward()
            opt.step()
        return model

    def collate(examples: list) -> tuple:
        return torch.stack([e["x"] for e in examples]), torch.tensor([e["label"] for e in examples])

    return Task(
        name="digits-mlp", kind="classification", splits=splits, collate=collate, build_model=build_model,
        lora_targets=["fc1", "fc2", "head"], modules_to_save=None, peft_task_type=None,
        label_names=[str(i) for i in range(10)],
        defaults={"lr": 1e-2, "batch_size": 64, "sigma": 0.05, "steps": 150, "rank": 4, "alpha": 8},
    )


register_task("digits-mlp", _digits_mlp)
