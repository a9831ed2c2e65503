"""Model directories load correctly from several threads at once (the in-process simulation's clients)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from secure_kd.models import load_pretrained


def test_concurrent_loads_of_a_tied_model_all_get_its_weights(tmp_path):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    reference = load_pretrained(tmp_path / "model").state_dict()
    with ThreadPoolExecutor(max_workers=4) as pool:
        models = list(pool.map(lambda _: load_pretrained(tmp_path / "model"), range(16)))
    for model in models:
        for name, value in model.state_dict().items():
            assert not value.is_meta, name
            torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
