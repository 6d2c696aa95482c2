"""Tiny models shared by the pipeline tests: random transformers LMs built from configs, and a
non-transformers toy whose block calls one Linear twice (the batched path's rollback case)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_lm(arch: str) -> nn.Module:
    """A 2-block random ``llama``, ``opt`` or ``gpt2`` (Conv1D) causal LM, hidden 64, MLP 96."""
    import transformers as T

    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "max_position_embeddings": 128, **IDS}
    cfg = {
        "llama": lambda: T.LlamaConfig(hidden_size=64, intermediate_size=96,
                                       num_attention_heads=4, num_key_value_heads=2, **common),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4,
                                   word_embed_proj_dim=64, **common),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                     n_positions=128, bos_token_id=1, eos_token_id=2),
    }[arch]()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def random_ids(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


class TwiceBlock(nn.Module):
    """fc2 runs twice per forward: the one-pass hooks solve it at its first call, so its
    second input could not count; such a block goes the per-sample way."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d, bias=False)
        self.fc2 = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.fc2(torch.relu(self.fc2(self.fc1(x))))


class ToyLM(nn.Module):
    """Embedding, two ``TwiceBlock``s, a head: not a transformers model."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.stack = nn.ModuleList([TwiceBlock(d), TwiceBlock(d)])
        self.head = nn.Linear(d, VOCAB)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = self.emb(input_ids)
        for b in self.stack:
            x = b(x)
        return self.head(x)
