"""``tiny-t5-repeat``: a tiny T5 from a config on "repeat: w" → "w w" — the seq2seq sanity task."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..rng import seeded
from .base import SPLIT_SEED, Task, register_task

__all__ = ["WordTokenizer"]

_WORDS = (
    "apple river stone cloud green quiet music paper light storm tiger piano garden winter silver "
    "rocket candle forest ocean yellow violet marble thunder window bridge castle meadow falcon "
    "lantern harbor crystal shadow breeze copper velvet pepper orange island desert planet"
).split()


class WordTokenizer:
    """A word-level tokenizer for the sanity task: pad 0, eos 1, unk 2, then the words."""

    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

    def __init__(self, words: Sequence[str]):
        self.vocab = ["<pad>", "</s>", "<unk>", "repeat:"] + list(words)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in text.split()] + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i != self.pad_token_id:
                out.append(self.vocab[i])
        return " ".join(out)


def _tiny_t5_repeat() -> Task:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = WordTokenizer(_WORDS)
    rng = np.random.default_rng(SPLIT_SEED)
    words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=1200)]
    ex = [{"source": f"repeat: {w}", "target": f"{w} {w}"} for w in words]
    splits = {"train": ex[:1000], "validation": ex[1000:1100], "test": ex[1100:]}

    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    def collate(examples: list) -> dict:
        src = [tok.encode(e["source"]) for e in examples]
        ids = pad(src, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(),
                "labels": pad([tok.encode(e["target"]) for e in examples], -100)}

    def build_model() -> nn.Module:
        cfg = T5Config(vocab_size=len(tok.vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                       num_heads=4, dropout_rate=0.0, decoder_start_token_id=tok.pad_token_id,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
        with seeded(SPLIT_SEED):  # transformers initialises from the global RNG: a seeded fork of it
            return T5ForConditionalGeneration(cfg)

    @torch.no_grad()
    def generate(model: nn.Module, prompts: list[str]) -> list[str]:
        device = next(model.parameters()).device
        batch = collate([{"source": p, "target": ""} for p in prompts])
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=5, do_sample=False)
        return [tok.decode(o) for o in out.tolist()]

    return Task(
        name="tiny-t5-repeat", kind="seq2seq", splits=splits, collate=collate, build_model=build_model,
        lora_targets=["q", "k", "v", "o", "wi", "wo"], modules_to_save=["shared", "lm_head"],
        peft_task_type="SEQ_2_SEQ_LM", label_names=[],
        defaults={"lr": 3e-3, "batch_size": 32, "sigma": 0.05, "steps": 300, "rank": 8, "alpha": 16},
        generate=generate,
    )


register_task("tiny-t5-repeat", _tiny_t5_repeat)
