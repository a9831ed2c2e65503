"""Model cloning through a query API ("Clone What You Can't Steal"; Carlini et al. 2024).

The attacker recovers the victim's output subspace from full logits (or from top-k logprobs with a
logit bias), builds a student of width h whose unembedding is the recovered projection, and
distils it on the API's answers to a prompt set, all within one query budget:

- full_logits / topk_logprobs(_bias): one query per prefix of a training sequence, so a sequence
  of L tokens costs L - 1 queries; the student is trained with a registered KD objective on dense
  logits or on `TopKLogits` with an explicit tail policy;
- text: one query per sampled continuation; the student is trained with cross-entropy on the
  samples (sequence-level KD).

Training uses the engine's `Distiller`. Evaluation uses direct access to the victim (it is not
part of the attack): top-1 agreement and forward KL on held-out sequences, the perplexity gap on
them, and the geometry of the student's unembedding against the victim's.

A served victim (`victim.source: served`) is queried through the engine's `ServedModelAPI` (top-k
logprobs or text; see secure_kd/served/api.py for which views a server allows); the evaluation then
uses `served.reference`, the same weights loaded here, which a served clone therefore requires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from apparatus.hardened_api import ApiDefenseConfig
from apparatus.victims import load_victim, victim_api
from attacks import ATTACKS
from attacks.logit_leak import (
    projection_error,
    query_until_rank_found,
    random_prompts,
    recover_output_projection,
    recovery_target,
    subspace_geometry,
    tiny_victim_default,
    true_hidden_size,
)
from secure_kd.api import ModelAPI, Prompt, View
from secure_kd.config import KDConfig, ModelConfig, Strict, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample, collate, generate_corpus, load_records
from secure_kd.evaluate import perplexity, teacher_agreement
from secure_kd.losses import available_losses, loss_info
from secure_kd.models import build_tiny, resolve_device, vocab_size_of
from secure_kd.plugins import Input, Metric, Plugin, PluginConfig, write_result
from secure_kd.readings import Reading, proportion
from secure_kd.topk import TopKLogits
from secure_kd.trainer import Distiller

Init = Literal["recovered", "random"]


class PromptSetConfig(Strict):
    """The attacker's training sequences and the evaluator's held-out sequences (L tokens each).

    source: 'victim_samples' (sequences sampled from the victim by the evaluator, outside the
    budget: a stand-in for in-domain public text), 'random' (uniform token ids), 'synthetic' (the
    project's synthetic corpus, tokenized with the victim's tokenizer) or a local data file.
    """

    source: str = "victim_samples"
    n_train: int = Field(256, gt=0)
    n_heldout: int = Field(64, gt=0)
    length: int = Field(16, ge=2)
    text_field: str = "text"

    @model_validator(mode="after")
    def _known_source(self) -> PromptSetConfig:
        if self.source not in ("victim_samples", "random", "synthetic") and not Path(self.source).is_file():
            raise ValueError(
                f"prompts.source {self.source!r} is not 'victim_samples', 'random', "
                "'synthetic' or an existing data file"
            )
        return self


class RecoveryConfig(Strict):
    """Recovering the output subspace: random prompts, `step` at a time until the rank shows."""

    max_prompts: int = Field(1024, gt=1)
    step: int = Field(8, gt=0)
    margin: int = Field(4, gt=0)
    min_gap_decades: float = Field(2.0, gt=0)
    prompt_length: int = Field(8, gt=0)


class TextSamplingConfig(Strict):
    prompt_tokens: int = Field(4, gt=0, description="tokens of each training sequence used as the prompt")
    new_tokens: int = Field(12, gt=0)
    temperature: float = Field(1.0, gt=0)


class StudentConfig(Strict):
    hidden_size: int | None = Field(None, gt=0, description="default: the recovered hidden size")
    num_layers: int = Field(1, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    init: Init = "recovered"
    freeze_output_layer: bool = False


class CloneTrainConfig(Strict):
    steps: int = Field(80, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-3, gt=0)


class CloneConfig(PluginConfig):
    """`secure-kd attack clone`: clone a victim through its API within a query budget."""

    out: str = "runs/attacks/clone"
    victim: ModelConfig = Field(default_factory=tiny_victim_default)
    victim_logit_scale: float = Field(1.0, gt=0, description="tiny victims: sharpen a random model's outputs")
    access: View = "full_logits"
    top_k: int = Field(8, ge=2)
    tail: Literal["uniform", "zero"] = "uniform"
    loss: str = "forward_kl"
    query_budget: int = Field(..., gt=0)
    cost_per_query: float = Field(1.0, ge=0)
    prompts: PromptSetConfig = PromptSetConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    text: TextSamplingConfig = TextSamplingConfig()
    student: StudentConfig = StudentConfig()
    train: CloneTrainConfig = CloneTrainConfig()
    compare_random_init: bool = Field(False, description="also train a random-init student, same access")
    compare_text_only: bool = Field(False, description="also distil from sampled text only, same budget")
    progress: bool = False
    api_defense: ApiDefenseConfig | None = Field(
        None, description="clone through a hardened API (apparatus.hardened_api); every variant gets it"
    )

    @model_validator(mode="after")
    def _consistent(self) -> CloneConfig:
        if self.student.init == "recovered" and self.access not in ("full_logits", "topk_logprobs_bias"):
            raise ValueError(
                f"student.init 'recovered' needs access full_logits or topk_logprobs_bias; "
                f"access {self.access!r} does not reveal the output layer (use init: random)"
            )
        if self.student.init == "random" and self.student.hidden_size is None:
            raise ValueError("student.hidden_size is required with init: random (nothing sizes it otherwise)")
        if self.text.prompt_tokens >= self.prompts.length:
            raise ValueError(
                f"text.prompt_tokens ({self.text.prompt_tokens}) must be below prompts.length "
                f"({self.prompts.length})"
            )
        names = available_losses()
        if self.loss not in names:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of: {', '.join(names)}")
        info = loss_info(self.loss)
        if info.inputs != "logits" or not info.needs_teacher:
            raise ValueError(
                f"loss {self.loss!r} does not compare the student with teacher logits; pick "
                "a KD objective such as forward_kl, reverse_kl or jsd"
            )
        return self


class CloneVariant(BaseModel):
    name: str
    access: str
    init: str
    student_hidden_size: int
    queries_used: int
    queries_for_recovery: int
    queries_for_distillation: int
    cost: float
    train_sequences: int
    top1_agreement: float
    mean_forward_kl: float
    student_perplexity: float
    perplexity_gap: float
    unembedding_geometry: dict
    unembedding_projection_error: float
    recovered: dict | None
    final_loss: float
    served: dict | None = None
    seconds: float


class CloneResult(BaseModel):
    kind: str = "clone"
    victim_source: str
    victim_hidden_size: int | None
    vocab_size: int
    victim_perplexity: float
    query_budget: int
    heldout_positions: int
    variants: list[CloneVariant]


# --------------------------------------------------------------------------- prompt sets


@torch.no_grad()
def sample_sequences(
    model: nn.Module, n: int, length: int, vocab: int, seed: int, batch: int = 64
) -> list[Prompt]:
    """`n` sequences of `length` tokens sampled at T=1 from `model` after a random first token."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    sequences: list[Prompt] = []
    for start in range(0, n, batch):
        ids = torch.randint(0, vocab, (min(batch, n - start), 1), generator=generator)
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids.to(device)).logits[:, -1].float().cpu(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        sequences.extend(tuple(row) for row in ids.tolist())
    return sequences


def text_chunks(texts: list[str], tokenizer, length: int, counts: tuple[int, int], seed: int):
    """(train, heldout) chunks of `length` tokens; held-out chunks come from records train did not use."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    parts: tuple[list[Prompt], list[Prompt]] = ([], [])
    part = 0
    for i in order:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        parts[part].extend(tuple(ids[j : j + length]) for j in range(0, len(ids) - length + 1, length))
        if len(parts[part]) >= counts[part]:
            del parts[part][counts[part] :]
            part += 1
            if part == 2:
                return parts
    raise ValueError(
        f"the prompt texts give too few chunks of {length} tokens for {counts[0]} train and "
        f"{counts[1]} held-out sequences; use more records or a shorter prompts.length"
    )


def build_prompt_sets(cfg: CloneConfig, victim: nn.Module, tokenizer, vocab: int) -> tuple[list[Prompt], ...]:
    """(train, heldout) sequences of exactly `prompts.length` tokens, from separate draws or records."""
    p = cfg.prompts
    needed = p.n_train + p.n_heldout
    if p.source == "random":
        sequences = random_prompts(needed, p.length, vocab, cfg.seed + 11)
    elif p.source == "victim_samples":
        sequences = sample_sequences(victim, needed, p.length, vocab, cfg.seed + 11)
    else:
        if tokenizer is None:
            raise ValueError(
                f"prompts.source {p.source!r} is text and needs a tokenizer; a tiny victim has "
                "none (use 'victim_samples' or 'random')"
            )
        if p.source == "synthetic":
            texts = generate_corpus(needed, seed=cfg.seed, n_canaries=0).texts()
        else:
            texts = [str(t) for t in load_records(p.source)[p.text_field]]
        return text_chunks(texts, tokenizer, p.length, (p.n_train, p.n_heldout), cfg.seed)
    return sequences[: p.n_train], sequences[p.n_train :]


# --------------------------------------------------------------------------- answers as training targets


class APIAnswers:
    """Teacher targets for the Distiller: the API's answers for each example, found by index."""

    def __init__(self, answers: list[Tensor] | list[TopKLogits], device: torch.device) -> None:
        self.answers, self.device = answers, device

    def __call__(self, batch: dict[str, Tensor]) -> Tensor | TopKLogits:
        rows = [self.answers[i] for i in batch["example_index"].tolist()]
        if isinstance(rows[0], TopKLogits):
            values, indices = torch.stack([r.values for r in rows]), torch.stack([r.indices for r in rows])
            return TopKLogits(values, indices).to(self.device)
        return torch.stack(rows).to(self.device)


def _pad_last_row(answer: Tensor | TopKLogits) -> Tensor | TopKLogits:
    """Answers cover positions 0..L-2; position L-1 has no next token (its label is -100): repeat a row."""
    if isinstance(answer, TopKLogits):
        values, indices = answer.values, answer.indices
        return TopKLogits(torch.cat([values, values[-1:]]), torch.cat([indices, indices[-1:]]))
    return torch.cat([answer, answer[-1:]])


def distillation_set(cfg: CloneConfig, api: ModelAPI, train: list[Prompt], device: torch.device):
    """(examples, targets on `device` or None for text) bought with the API's remaining budget."""
    limit = cfg.train.steps * cfg.train.batch_size  # answers beyond what training reads are not bought
    remaining = api.remaining
    assert remaining is not None, "clone APIs always carry the query budget"
    if api.view == "text":
        t = cfg.text
        n = min(remaining, limit)
        if n < 1:
            raise ValueError("no query budget is left for sampling text; raise query_budget")
        prompts = [train[i % len(train)][: t.prompt_tokens] for i in range(n)]
        samples = api.sample_text_batch(prompts, t.new_tokens, t.temperature, seed=cfg.seed)
        pairs = enumerate(zip(prompts, samples, strict=True))
        examples = [TokenizedExample(list(p) + s, [-100] * len(p) + s, i) for i, (p, s) in pairs]
        return examples, None
    per_sequence = cfg.prompts.length - 1
    n = min(len(train), remaining // per_sequence)
    if n < 1:
        raise ValueError(
            f"the budget left ({remaining} queries) cannot buy one sequence's answers "
            f"({per_sequence} queries); raise query_budget or shorten prompts.length"
        )
    ask = api.full_logits_positions_batch if api.view == "full_logits" else api.topk_logprobs_positions_batch
    answers = [_pad_last_row(answer) for answer in ask([seq[:-1] for seq in train[:n]])]
    examples = [TokenizedExample(list(seq), list(seq), i) for i, seq in enumerate(train[:n])]
    return examples, APIAnswers(answers, device)


# --------------------------------------------------------------------------- one clone


@dataclass(frozen=True)
class Setting:
    """What every variant shares: the victim, the attacker's prompts, the evaluator's held-out set."""

    victim: nn.Module
    tokenizer: object
    train: list[Prompt]
    heldout: list[dict[str, Tensor]]
    victim_perplexity: float
    device: torch.device


def make_student(cfg: CloneConfig, width: int, vocab: int, recovered: Tensor | None) -> nn.Module:
    """A tiny Llama of `width`; its unembedding starts as the recovered projection when there is one."""
    s = cfg.student
    if width % s.num_heads:
        raise ValueError(
            f"the student width {width} is not divisible by student.num_heads={s.num_heads}; "
            "pick a head count that divides the (recovered) hidden size"
        )
    tiny = TinyModelConfig(
        hidden_size=width,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        intermediate_size=s.intermediate_size,
        vocab_size=vocab,
    )
    student = build_tiny(tiny, vocab, seed=cfg.seed + 2)
    if recovered is not None:
        columns = min(width, recovered.shape[1])  # recovered columns come in order of importance
        with torch.no_grad():
            student.get_output_embeddings().weight[:, :columns] = recovered[:, :columns]
        if s.freeze_output_layer:
            student.get_output_embeddings().weight.requires_grad_(False)
    return student


def heldout_batches(heldout: list[Prompt], batch_size: int = 32) -> list[dict[str, Tensor]]:
    examples = [TokenizedExample(list(s), list(s), i) for i, s in enumerate(heldout)]
    return [collate(examples[i : i + batch_size], pad_id=0) for i in range(0, len(examples), batch_size)]


def recover_unembedding(cfg: CloneConfig, api: ModelAPI, true_weight: Tensor) -> tuple[Tensor, dict]:
    r = cfg.recovery
    prompts = random_prompts(r.max_prompts, r.prompt_length, api.vocab_size, cfg.seed + 7)
    logits, report = query_until_rank_found(
        api, prompts, step=r.step, margin=r.margin, min_gap_decades=r.min_gap_decades
    )
    recovered = recover_output_projection(logits, report["h"])
    # the answers span W (full logits) or W - 1 w_ref^T (logit differences, ref_token 0): score against that
    target = recovery_target(true_weight, api.view, ref_token=0)
    return recovered, {
        "estimated_hidden_size": report["h"],
        "prompts": report["n_queries"],
        "queries": api.queries,
        "gap_decades": report["gap_size"],
        "projection_error": projection_error(recovered, target),
        "geometry": subspace_geometry(recovered, target),
        "scored_against": "W" if api.view == "full_logits" else "W - 1 w_ref^T (ref_token 0)",
    }


def clone_variant(
    cfg: CloneConfig, setting: Setting, name: str, access: View, init: Init, width: int | None
) -> CloneVariant:
    started = time.perf_counter()
    victim, device = setting.victim, setting.device
    api = victim_api(
        cfg.victim,
        victim,
        setting.tokenizer,
        defense=cfg.api_defense,
        view=access,
        top_k=cfg.top_k,
        cost_per_query=cfg.cost_per_query,
        max_queries=cfg.query_budget,
        batch_size=64,
    )
    true_weight = victim.get_output_embeddings().weight.detach().cpu()
    recovered, recovered_info = None, None
    if init == "recovered":
        recovered, recovered_info = recover_unembedding(cfg, api, true_weight)
        width = width or recovered_info["estimated_hidden_size"]
    assert width is not None, "the config validator requires student.hidden_size without recovery"
    recovery_queries = api.queries
    student = make_student(cfg, width, api.vocab_size, recovered).to(device)
    examples, targets = distillation_set(cfg, api, setting.train, device)
    if access == "text":
        kd = KDConfig(loss=cfg.loss, kd_weight=0.0, ce_weight=1.0)
    else:
        kd = KDConfig(loss=cfg.loss, tail=cfg.tail, top_k=None if access == "full_logits" else cfg.top_k)
    train = TrainConfig(
        max_steps=cfg.train.steps,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        checkpoint_every=cfg.train.steps,
        precision="fp32",
    )
    fit = Distiller(
        student=student,
        examples=examples,
        kd=kd,
        train=train,
        out=Path(cfg.out) / name,
        pad_id=0,
        eos_id=None,
        targets=targets,
        seed=cfg.seed,
        device=device,
        progress=cfg.progress,
    ).fit()
    agreement = teacher_agreement(student, victim, setting.heldout, device=device)
    student_ppl = perplexity(student, setting.heldout, device=device)["perplexity"]
    final_weight = student.get_output_embeddings().weight.detach().cpu()
    return CloneVariant(
        name=name,
        access=access,
        init=init,
        student_hidden_size=width,
        queries_used=api.queries,
        queries_for_recovery=recovery_queries,
        queries_for_distillation=api.queries - recovery_queries,
        cost=api.cost,
        train_sequences=len(examples),
        top1_agreement=agreement["top1_agreement"],
        mean_forward_kl=agreement["mean_forward_kl"],
        student_perplexity=student_ppl,
        perplexity_gap=student_ppl - setting.victim_perplexity,
        unembedding_geometry=subspace_geometry(final_weight, true_weight),
        unembedding_projection_error=projection_error(final_weight, true_weight),
        recovered=recovered_info,
        final_loss=fit.losses[-1],
        served=api.provenance() if hasattr(api, "provenance") else None,
        seconds=time.perf_counter() - started,
    )


def run(config: CloneConfig) -> CloneResult:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    victim, tokenizer = load_victim(
        config.victim, seed=config.seed, device=device, logit_scale=config.victim_logit_scale
    )
    if victim is None:
        raise ValueError(
            "cloning a served victim needs victim.served.reference (the same weights, loaded here): the "
            "evaluation compares the clone with it; the attack itself only queries the server"
        )
    vocab = vocab_size_of(victim)
    train, heldout_sequences = build_prompt_sets(config, victim, tokenizer, vocab)
    heldout = heldout_batches(heldout_sequences)
    victim_eval = perplexity(victim, heldout, device=device)
    setting = Setting(victim, tokenizer, train, heldout, victim_eval["perplexity"], device)
    student = config.student
    main = clone_variant(config, setting, "clone", config.access, student.init, student.hidden_size)
    width = main.student_hidden_size
    variants = [main]
    if config.compare_random_init and student.init == "recovered":
        variants.append(clone_variant(config, setting, "random_init", config.access, "random", width))
    if config.compare_text_only and config.access != "text":
        variants.append(clone_variant(config, setting, "text_only", "text", "random", width))
    result = CloneResult(
        victim_source=config.victim.source if config.victim.source != "smollm2" else "smollm2 (Q4_1)",
        victim_hidden_size=true_hidden_size(victim),
        vocab_size=vocab,
        victim_perplexity=victim_eval["perplexity"],
        query_budget=config.query_budget,
        heldout_positions=victim_eval["tokens"],
        variants=variants,
    )
    write_result(config.out, result)
    return result


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The best variant's top-1 agreement with the victim on held-out positions, Wilson interval."""
    variants = result.get("variants") or []
    if not variants:
        return {}
    best = max(variants, key=lambda v: v["top1_agreement"])
    n = int(result.get("heldout_positions", 0))
    return {"clone_agreement": proportion(float(best["top1_agreement"]), n, confidence)}


PLUGIN = ATTACKS.register(
    "clone",
    Plugin(
        name="clone",
        Config=CloneConfig,
        Result=CloneResult,
        run=run,
        summary="clone a model through its API: recovered output layer + KD within a query budget",
        target="victim.source",
        kinds=("causal_lm",),
        own_target="a tiny random Llama",
        inputs={"budget": Input("query_budget")},
        with_model={"victim_logit_scale": 1.0},  # the sharpening is for a random tiny victim only
        metrics=(
            Metric(
                "clone_agreement", risk="model_extraction", medium=0.5, high=0.8,
                why="top-1 agreement of the best clone with the victim on held-out positions",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
