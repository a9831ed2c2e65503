"""Shared fixtures: tiny random Llamas and token-level examples (no tokenizer, no hub)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests/attacks/test_attack_federated.py reuses the federation test helpers
sys.path.insert(0, str(Path(__file__).parent / "federation"))
torch.set_num_threads(1)  # tiny models: one thread beats two (less sync), and CI has 2 cores


@pytest.fixture
def tiny_llama():
    """Factory: a random Llama of the given width/depth and vocabulary, seeded."""
    from secure_kd.config import TinyModelConfig
    from secure_kd.models import build_tiny

    def make(vocab: int = 64, hidden: int = 32, layers: int = 1, heads: int = 2, seed: int = 0):
        return build_tiny(
            TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads), vocab, seed=seed
        )

    return make


@pytest.fixture
def token_examples():
    """Factory: random token sequences of varying length as TokenizedExamples."""
    from secure_kd.data import TokenizedExample

    def make(
        n: int = 16, vocab: int = 64, min_len: int = 6, max_len: int = 12, seed: int = 0, start: int = 2
    ):
        g = torch.Generator().manual_seed(seed)
        out = []
        for i in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(start, vocab, (length,), generator=g).tolist()
            out.append(TokenizedExample(input_ids=ids, labels=list(ids), record_index=i))
        return out

    return make
