"""The victim of the query-API attacks and the API-hardening defense: loading it, and the API it answers.

- `load_victim(cfg, seed=, device=, logit_scale=)`: a tiny random Llama (its output layer optionally
  scaled up, so that its next-token distributions are peaked like a trained LM's), a local Hugging Face
  directory, 'smollm2' (Q4_1), or a served model (`source: served`: its `served.reference`, loaded here
  for the evaluation, and its tokenizer).
- `victim_api(cfg, victim, tokenizer, defense=, ...)`: the query API an attack sees: the engine's
  `ModelAPI` over the local victim, hardened by `apparatus.hardened_api` when a defense is given, or
  the engine's `ServedModelAPI` over a served one, hardened by `apparatus.hardened_served`.
"""

from __future__ import annotations

import torch
from torch import nn

from apparatus.hardened_api import ApiDefenseConfig, build_api
from secure_kd.api import ModelAPI
from secure_kd.config import ModelConfig
from secure_kd.models import load_teacher, load_tokenizer


def load_victim(cfg: ModelConfig, *, seed: int, device: torch.device, logit_scale: float = 1.0):
    """(model, tokenizer or None): a tiny random Llama, a local HF directory, or 'smollm2' (Q4_1).

    `logit_scale` multiplies a tiny victim's output layer: at Hugging Face's init scale a random
    model's next-token distribution is nearly uniform, unlike a trained LM's. A served victim gives
    (its `served.reference` loaded here, or None; its `served.tokenizer`): the model is the
    evaluator's copy, never queried by the attack.
    """
    if cfg.source == "served":
        if logit_scale != 1.0:
            raise ValueError("victim_logit_scale applies to tiny random victims only; leave it at 1.0")
        tokenizer = load_tokenizer(cfg.served.tokenizer)
        if cfg.served.reference is None:
            return None, tokenizer
        return load_teacher(
            ModelConfig(source=cfg.served.reference), vocab_size=len(tokenizer), seed=seed
        ).to(device), tokenizer
    if cfg.source == "teacher_layers":
        raise ValueError(
            "victim.source cannot be 'teacher_layers'; use 'tiny', 'smollm2' or a model directory"
        )
    tokenizer = None
    if cfg.source == "tiny":
        if cfg.tiny.vocab_size is None:
            raise ValueError("a tiny victim has no tokenizer: set victim.tiny.vocab_size (e.g. 256)")
        vocab = cfg.tiny.vocab_size
    else:
        tokenizer = load_tokenizer(cfg.source, trust_remote_code=cfg.trust_remote_code)
        vocab = len(tokenizer)
    model = load_teacher(cfg, vocab_size=vocab, seed=seed).to(device)
    if logit_scale != 1.0:
        if cfg.source != "tiny":
            raise ValueError("victim_logit_scale applies to tiny random victims only; leave it at 1.0")
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    return model, tokenizer


def victim_api(
    cfg: ModelConfig, victim: nn.Module | None, tokenizer, *, defense: ApiDefenseConfig | None, **api_kwargs
) -> ModelAPI:
    """The query API the attack sees: over the local victim, or over a served one (`source: served`)."""
    if cfg.source != "served":
        return build_api(victim, tokenizer, defense=defense, **api_kwargs)
    from secure_kd.served.api import ServedModelAPI

    api_kwargs.pop("batch_size", None)
    if defense is not None:  # the transforms on the server's answers (apparatus.hardened_served)
        from apparatus.hardened_served import HardenedServedAPI

        return HardenedServedAPI(cfg.served, tokenizer, defense=defense, **api_kwargs)
    return ServedModelAPI(cfg.served, tokenizer, **api_kwargs)
