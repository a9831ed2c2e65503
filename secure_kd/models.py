"""Load teachers and students: a local HF directory, the SmolLM2 asset, a tiny random Llama, a
student made by dropping layers from the teacher (DistilBERT-style initialization), or a served
teacher (`source: served`: an OpenAI-compatible server, through the query API; secure_kd/served/).

Weights load from safetensors only and `trust_remote_code` stays off unless the config asks for
it by name.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from secure_kd.config import LoraConfig, ModelConfig, TinyModelConfig
from secure_kd.model_files import (
    DTYPES,
    ModelLoadError,
    load_pretrained,
    load_tokenizer,
)
from secure_kd.seeding import seeded


def _machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def tiny_parameter_count(cfg: TinyModelConfig, vocab_size: int) -> int:
    """Parameters of the Llama `build_tiny` makes (untied input and output embeddings)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    inner = cfg.intermediate_size or 4 * h
    kv = (cfg.num_kv_heads or cfg.num_heads) * (h // cfg.num_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inner + 2 * h
    return layers * per_layer + 2 * vocab_size * h + h


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device: cuda was asked for but no CUDA device is visible; use device: auto or cpu"
        )
    return torch.device(device)


def build_tiny(
    cfg: TinyModelConfig, vocab_size: int, *, seed: int, pad_token_id: int | None = None
) -> nn.Module:
    """A random Llama (RMSNorm, untied output layer) of the given width and depth.

    Refuses, before allocating anything, a model whose float32 weights would take more than half of
    the machine's memory (an absurd width or depth would otherwise exhaust it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = cfg.vocab_size or vocab_size
    n_params = tiny_parameter_count(cfg, vocab)
    memory = _machine_memory_bytes()
    if memory is not None and 4 * n_params > memory // 2:
        raise ModelLoadError(
            f"a tiny model with hidden_size {cfg.hidden_size}, {cfg.num_layers} layers, intermediate size "
            f"{cfg.intermediate_size or 4 * cfg.hidden_size} and vocabulary {vocab} has {n_params:.3g} "
            f"parameters ({4 * n_params / 1e9:.3g} GB in float32), more than half of this machine's "
            f"{memory / 1e9:.3g} GB; lower its `tiny.hidden_size` / `tiny.num_layers` (tiny models are for "
            "tests and small experiments; load a real model from a directory instead)"
        )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    with seeded(seed):
        return LlamaForCausalLM(config)


def drop_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of `teacher` keeping only `layers` (embeddings, final norm and output layer copied).

    Works for decoder-only HF models whose blocks live in `model.model.layers` (Llama, Mistral,
    Qwen2, SmolLM2, ...). Tied input/output embeddings stay tied in the copy.
    """
    blocks = getattr(getattr(teacher, "model", None), "layers", None)
    if blocks is None:
        raise ModelLoadError(
            f"{type(teacher).__name__} has no `model.layers`; layer dropping supports decoder-only "
            "Llama-style models. Use student.source: tiny or a local directory instead."
        )
    n = len(blocks)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ModelLoadError(f"student.layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    keep = [i % n for i in layers]
    if len(set(keep)) != len(keep):
        raise ModelLoadError(f"student.layers {layers} repeats a layer; list each teacher layer once")
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList(student.model.layers[i] for i in keep)
    for new_idx, block in enumerate(student.model.layers):
        if hasattr(block, "self_attn") and hasattr(block.self_attn, "layer_idx"):
            block.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None) is not None:
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def apply_lora(model: nn.Module, cfg: LoraConfig, *, seed: int | None = None) -> nn.Module:
    """Wrap `model` with peft LoRA adapters. With `seed`, the adapters' random initialization is drawn
    from that seed (peft draws from the global RNG): federated clients must start from the same one."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ModelLoadError(
            f"student.lora.target_modules {missing} are not module names of this model; "
            f"candidates: {sorted(n for n in present if n.endswith('_proj'))}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    if seed is None:
        return get_peft_model(model, peft_cfg)
    with seeded(seed):
        return get_peft_model(model, peft_cfg)


def load_served_teacher(cfg: ModelConfig, *, vocab_size: int | None = None):
    """teacher.source: served: a `ServedTeacher` (secure_kd.served) talking to `cfg.served`'s server
    through a counted `ServedModelAPI`; no weights are loaded (the tokenizer is `served.tokenizer`)."""
    from secure_kd.served.api import ServedModelAPI
    from secure_kd.served.teacher import ServedTeacher

    if cfg.served is None:
        raise ModelLoadError("source: served needs a `served` block (base_url, model, ...)")
    tokenizer = load_tokenizer(cfg.served.tokenizer)
    if vocab_size is not None and vocab_size != len(tokenizer):
        raise ModelLoadError(
            f"the data was tokenized with a vocabulary of {vocab_size} tokens but served.tokenizer "
            f"({cfg.served.tokenizer}) has {len(tokenizer)}; tokenize with the served model's tokenizer"
        )
    return ServedTeacher(ServedModelAPI(cfg.served, tokenizer, view="topk_logprobs", top_k=1))


def load_teacher(
    cfg: ModelConfig, *, vocab_size: int, seed: int, pad_token_id: int | None = None
) -> nn.Module:
    if cfg.source == "served":
        return load_served_teacher(cfg, vocab_size=vocab_size)
    if cfg.source == "tiny":
        model = build_tiny(cfg.tiny, vocab_size, seed=seed + 1, pad_token_id=pad_token_id)
    else:
        model = load_pretrained(cfg.source, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_student(
    cfg: ModelConfig,
    *,
    teacher: nn.Module | None,
    vocab_size: int,
    seed: int,
    pad_token_id: int | None = None,
) -> nn.Module:
    if cfg.source == "served":
        raise ModelLoadError(
            "student.source cannot be 'served': a student is trained here; use tiny or a directory"
        )
    if cfg.source == "tiny":
        model = build_tiny(cfg.tiny, vocab_size, seed=seed + 2, pad_token_id=pad_token_id)
    elif cfg.source == "teacher_layers":
        if teacher is None:
            raise ModelLoadError("student.source: teacher_layers needs a teacher model")
        model = drop_layers(teacher, cfg.layers or [])
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = load_pretrained(cfg.source, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    model.to(DTYPES[cfg.dtype])
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, seed=seed + 3)
    model.train()
    return model


def vocab_size_of(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_shared_vocab(teacher: nn.Module, student: nn.Module) -> None:
    t, s = vocab_size_of(teacher), vocab_size_of(student)
    if t != s:
        raise ModelLoadError(
            f"teacher vocabulary ({t}) and student vocabulary ({s}) differ: token-level distillation "
            "needs one shared tokenizer. Build the student with the teacher's tokenizer "
            "(student.source: tiny or teacher_layers with tokenizer: teacher)."
        )


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
