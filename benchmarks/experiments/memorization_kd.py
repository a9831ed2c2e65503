"""Experiment: Memorization Dynamics in Knowledge Distillation (Borkar et al. 2026), at tiny scale.

The paper fine-tunes a teacher and a same-size-as-student baseline on private data with
cross-entropy, distils students from the teacher on the same data (soft: forward KL on the
teacher's token distributions; hard: the teacher's outputs as labels), and reports (1) over 50%
less memorization with KD than with fine-tuning and (2) hard KD inheriting 2.7x more
teacher-specific memorized examples than soft KD. Here:

- data: the project's synthetic corpus (Faker records with PII spans) with canaries inserted 1-8
  times; half of the non-canary records are held out (non-members). Fresh canary-free synthetic
  records stand in for public text: they train the tokenizer, pretrain the two base models, train
  two reference models (RMIA, extraction ranking) and give RMIA's population.
- models (tiny Llamas, pretrained on public text, then):
  teacher  = teacher base (wider) fine-tuned with CE on the members;
  baseline = student base fine-tuned with CE on the members (the paper's "fine-tuning");
  soft KD  = student base distilled with forward KL on the teacher's full distributions
             (temperature T, loss scaled by T^2 as in the paper), on the members' text;
  hard KD  = student base trained with CE on the teacher's greedy continuations of each member's
             prefix (sequence-level KD, Kim & Rush 2016: fixed hard targets).
- measurements per model:
  discoverable memorization (prefix/suffix greedy exact match) of members, with the same rate on
  held-out records as the control for template text; PII completion from the text before each
  span; canary exposure over the whole 10^d secret space and greedy extraction from the canary
  prefix; MIA AUC (loss attack; offline RMIA with the two references, fixed `a`); extraction
  from samples (Carlini et al. 2021).
- headline: reduction of member memorization vs the baseline (soft and hard), and teacher-specific
  memorization inherited by each student: members memorized by the teacher but not by the
  baseline, and also memorized by the student; the hard/soft ratio of those counts.

Run: `python benchmarks/experiments/memorization_kd.py [--config PATH]`; writes the JSON named by
`out` and prints one summary line. Tiny models, a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from memorization_kd_config import ExperimentConfig, Schedule
from memorization_kd_probes import MODELS, headline, measure
from torch import nn

from apparatus.tiny_lm import TrainRecipe, build_model, tokenize_texts, train_causal_lm
from attacks.memorization.extraction import (
    TrainingDataIndex,
    sample_generations,
)
from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig, load_config
from secure_kd.data import TokenizedExample, generate_corpus, train_tiny_tokenizer
from secure_kd.models import resolve_device
from secure_kd.paths import atomic_write_json
from secure_kd.teacher_targets import LiveTeacher
from secure_kd.trainer import Distiller

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "memorization_kd.yaml"


def _recipe(model: TinyModelConfig, schedule: Schedule) -> TrainRecipe:
    return TrainRecipe(model=model, epochs=schedule.epochs, batch_size=schedule.batch_size, lr=schedule.lr)


def soft_distil(
    student: nn.Module,
    teacher: nn.Module,
    examples: list[TokenizedExample],
    cfg: ExperimentConfig,
    schedule: Schedule,
    device: torch.device,
) -> float:
    kd = KDConfig(
        loss=cfg.soft_kd.loss,
        temperature=cfg.soft_kd.temperature,
        scale_by_t2=cfg.soft_kd.scale_by_t2,
        kd_weight=1.0,
        ce_weight=0.0,
        top_k=None,
    )
    train = TrainConfig(
        epochs=schedule.epochs,
        batch_size=schedule.batch_size,
        lr=schedule.lr,
        precision="fp32",
        checkpoint_every=1 << 30,
    )
    teacher.eval()
    with tempfile.TemporaryDirectory(prefix="secure-kd-softkd-") as workdir:
        fit = Distiller(
            student=student.to(device),
            examples=examples,
            kd=kd,
            train=train,
            out=Path(workdir),
            pad_id=0,
            eos_id=None,
            teacher=teacher,
            targets=LiveTeacher(teacher, None),
            seed=cfg.seed,
            device=device,
            progress=False,
        ).fit()
    student.eval()
    return fit.losses[-1]


def teacher_continuations(
    teacher: nn.Module,
    examples: list[TokenizedExample],
    cfg: ExperimentConfig,
    eos_id: int,
    device: torch.device,
) -> list[TokenizedExample]:
    """Sequence-level KD data: each member's prefix (its first `prefix_tokens` tokens, or half of a
    shorter record) + the teacher's greedy continuation up to max_length, eos included; only the
    continuation is trained."""
    prompts = [ex.input_ids[: min(cfg.probes.prefix_tokens, len(ex.input_ids) // 2) or 1] for ex in examples]
    generated = sample_generations(
        teacher,
        prompts,
        max_new_tokens=cfg.max_length - min(len(p) for p in prompts),
        top_k=0,
        temperature=1.0,
        seed=cfg.seed,
        eos_id=eos_id,
        pad_id=0,
        device=device,
        greedy=True,
    )
    hard = []
    for index, (prompt, sequence) in enumerate(zip(prompts, generated, strict=True)):
        new = (sequence[len(prompt) :] + [eos_id])[: cfg.max_length - len(prompt)]
        hard.append(TokenizedExample(list(prompt) + new, [-100] * len(prompt) + new, index))
    return hard


def pretrain_bases(
    cfg: ExperimentConfig, vocab: int, public: dict[str, list[TokenizedExample]], device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """(teacher base, student base), each trained with CE on the public pretraining records."""
    bases = []
    for offset, arch in ((1, cfg.teacher), (2, cfg.student)):
        base = build_model(_recipe(arch, cfg.pretrain), vocab, seed=cfg.seed + offset, pad_id=0)
        train_causal_lm(
            base, public["pretrain"], _recipe(arch, cfg.pretrain), pad_id=0, seed=cfg.seed, device=device
        )
        bases.append(base)
    return bases[0], bases[1]


def train_models(
    cfg: ExperimentConfig,
    schedule: Schedule,
    bases: tuple[nn.Module, nn.Module],
    eos_id: int,
    members: list[TokenizedExample],
    public: dict[str, list[TokenizedExample]],
    device: torch.device,
) -> dict[str, nn.Module]:
    """Teacher, baseline, soft-KD and hard-KD students and two references, all at `schedule`."""
    teacher_base, student_base = bases
    models: dict[str, nn.Module] = {}

    def fine_tune(name: str, base: nn.Module, arch: TinyModelConfig, data: list[TokenizedExample], seed: int):
        models[name] = copy.deepcopy(base)
        train_causal_lm(models[name], data, _recipe(arch, schedule), pad_id=0, seed=seed, device=device)

    fine_tune("teacher", teacher_base, cfg.teacher, members, cfg.seed)
    fine_tune("baseline", student_base, cfg.student, members, cfg.seed)
    models["soft_kd"] = copy.deepcopy(student_base)
    soft_distil(models["soft_kd"], models["teacher"], members, cfg, schedule, device)
    hard_examples = teacher_continuations(models["teacher"], members, cfg, eos_id, device)
    fine_tune("hard_kd", student_base, cfg.student, hard_examples, cfg.seed)
    for j in (0, 1):
        fine_tune(f"reference_{j}", student_base, cfg.student, public[f"reference_{j}"], cfg.seed + 10 + j)
    for model in models.values():
        model.eval()
    return models


def prepare_data(cfg: ExperimentConfig) -> tuple[Any, dict[str, Any], dict[str, list[TokenizedExample]]]:
    c = cfg.corpus
    corpus = generate_corpus(
        c.n_private,
        seed=cfg.seed,
        n_canaries=c.n_canaries,
        canary_repeats=c.canary_repeats,
        secret_digits=c.secret_digits,
    )
    train, heldout = corpus.split(c.heldout_fraction, seed=cfg.seed)
    member_records = [r for r in train.records if r["topic"] != "canary"]
    n_members = len(member_records)
    sizes = {
        "pretrain": c.n_public,
        "reference_0": n_members,
        "reference_1": n_members,
        "population": c.n_population,
        "prompts": cfg.probes.extraction_samples,
    }
    public_texts = iter(generate_corpus(sum(sizes.values()), seed=cfg.seed + 1, n_canaries=0).texts())
    chunks = {name: [next(public_texts) for _ in range(size)] for name, size in sizes.items()}
    tokenizer = train_tiny_tokenizer(chunks["pretrain"], cfg.tokenizer_vocab)
    public = {
        name: tokenize_texts(chunks[name], tokenizer, cfg.max_length)
        for name in ("pretrain", "reference_0", "reference_1", "population")
    }
    prompts = [tokenizer(text)["input_ids"][:2] for text in chunks["prompts"]]
    data = {
        "corpus": train,
        "train_examples": tokenize_texts(train.texts(), tokenizer, cfg.max_length),
        "member_records": member_records,
        "heldout_records": heldout.records,
        "member_examples": tokenize_texts([r["text"] for r in member_records], tokenizer, cfg.max_length),
        "heldout_examples": tokenize_texts(heldout.texts(), tokenizer, cfg.max_length),
        "population_examples": public["population"],
        "extraction_prompts": prompts,
        "index": TrainingDataIndex(train.records, train.canaries),
    }
    return tokenizer, data, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, model=ExperimentConfig)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer, data, public = prepare_data(cfg)
    bases = pretrain_bases(cfg, len(tokenizer), public, device)
    regimes = []
    for epochs in cfg.finetune.epochs:
        regime_started = time.perf_counter()
        schedule = cfg.finetune.at(epochs)
        models = train_models(
            cfg, schedule, bases, tokenizer.eos_token_id, data["train_examples"], public, device
        )
        trained = time.perf_counter()
        per_model = {name: measure(cfg, name, models, tokenizer, data, device) for name in MODELS}
        regimes.append(
            {
                "finetune_epochs": epochs,
                "models": per_model,
                "headline": headline(per_model),
                "seconds_training": trained - regime_started,
                "seconds_measuring": time.perf_counter() - trained,
            }
        )
    results = {
        "experiment": "memorization_kd",
        "paper": "Borkar et al. 2026, Memorization Dynamics in Knowledge Distillation for Language Models",
        "device": str(device),
        "threads": cfg.threads,
        "config": cfg.model_dump(mode="json"),
        "n_members": len(data["member_examples"]),
        "n_heldout": len(data["heldout_examples"]),
        "n_canary_insertions": sum(cfg.corpus.canary_repeats),
        "regimes": regimes,
        "seconds": time.perf_counter() - started,
    }
    out = REPO_ROOT / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out)
    atomic_write_json(out, results)
    summary = {
        f"epochs_{regime['finetune_epochs']:g}": {
            "reduction_vs_finetuning": regime["headline"]["reduction_vs_finetuning"],
            "teacher_specific_inherited": regime["headline"]["teacher_specific_inherited"],
            "hard_over_soft_inherited": regime["headline"]["hard_over_soft_inherited"],
            **{
                name: {
                    key: round(regime["models"][name][key], 3)
                    for key in ("member_memorization_rate", "mean_exposure", "mia_loss_auc", "mia_rmia_auc")
                }
                for name in MODELS
            },
        }
        for regime in regimes
    } | {"seconds": round(results["seconds"], 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
