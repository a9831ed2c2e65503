"""`secure-kd attack membership`: membership inference against a causal LM, with shadow models.

The audit pool is members + non-members of the target. Shadow (reference) models are tiny models
trained like the target on random halves of the pool, each example IN for exactly half of them
(`balanced_membership`); LiRA offline and RMIA offline only use, per example, models that did
not train on it. Population samples (RMIA's z) are records no model trained on.

Target: `train` trains a tiny target on the members here (a self-contained audit, and the shadow
recipe then matches the target's by construction); otherwise a local Hugging Face directory, with
the members/non-members/population files given, and shadows built from `shadow` with the
target's vocabulary (they should be trained as the target was for LiRA/RMIA to mean much).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn

from apparatus.tiny_lm import (
    TrainRecipe,
    build_model,
    example_losses,
    pad_token_id,
    public_texts,
    resolve_tokenizer,
    tokenize_texts,
    train_causal_lm,
)
from attacks.membership.config import HEADLINE_NONMEMBERS, AttackROC, MembershipConfig, MembershipResult
from attacks.membership.scores import lira_scores, loss_attack_scores, rmia_scores, tune_offline_a
from secure_kd import metrics
from secure_kd.data import TokenizedExample, generate_corpus, load_records
from secure_kd.models import load_pretrained, resolve_device, vocab_size_of
from secure_kd.plugins import write_result

# --------------------------------------------------------------------------- data and models


def load_texts(cfg: MembershipConfig) -> tuple[list[str], list[str], list[str]]:
    """(members, non-members, population) texts."""
    d = cfg.data
    if d.source == "synthetic":
        assert d.n_members and d.n_nonmembers and d.n_population, "validated by MembershipData"
        total = d.n_members + d.n_nonmembers + d.n_population
        seed = cfg.seed if d.synthetic_seed is None else d.synthetic_seed
        texts = generate_corpus(total, seed=seed, n_canaries=0).texts()
        order = np.random.default_rng([seed, 0xD47A]).permutation(total)
        texts = [texts[i] for i in order]
        return (
            texts[: d.n_members],
            texts[d.n_members : d.n_members + d.n_nonmembers],
            texts[d.n_members + d.n_nonmembers :],
        )

    def read(path: str | None, limit: int | None) -> list[str]:
        if path is None:
            return []
        column = load_records(path)
        if d.text_field not in column.column_names:
            raise ValueError(
                f"{path} has no field {d.text_field!r}; fields: {column.column_names}. Set data.text_field"
            )
        return [str(text) for text in column[d.text_field]][:limit]

    return (
        read(d.members, d.n_members),
        read(d.nonmembers, d.n_nonmembers),
        read(d.population, d.n_population),
    )


def balanced_membership(n_examples: int, n_models: int, seed: int) -> np.ndarray:
    """Bool [n_examples, n_models]: example i is in model j's training set.

    Every example is IN for exactly half the models (LiRA's design, Carlini et al. 2022), chosen at
    random per example, so each example has n_models/2 IN and n_models/2 OUT shadows.
    """
    if n_models < 2 or n_models % 2:
        raise ValueError(f"n_shadows must be an even number >= 2 (half IN, half OUT), got {n_models}")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    rng = np.random.default_rng([seed, 0x5AD0])
    order = rng.random((n_examples, n_models)).argsort(axis=1)
    return order < n_models // 2


def train_shadows(
    pool: list[TokenizedExample],
    population: list[TokenizedExample],
    keep: np.ndarray,
    recipe: TrainRecipe,
    *,
    vocab_size: int,
    pad_id: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Train one shadow per column of `keep` on the pool rows it marks; return their losses on the
    pool [n_pool, n_shadows] and on the population [n_population, n_shadows]."""
    pool_losses = np.empty(keep.shape)
    population_losses = np.empty((len(population), keep.shape[1]))
    for j in range(keep.shape[1]):
        shadow = build_model(recipe, vocab_size, seed=seed + 1000 + j, pad_id=pad_id)
        members = [pool[i] for i in np.flatnonzero(keep[:, j])]
        train_causal_lm(
            shadow, members, recipe, pad_id=pad_id, seed=seed + 1000 + j, device=device, progress=progress
        )
        pool_losses[:, j] = example_losses(shadow, pool, pad_id=pad_id, device=device)
        if population:
            population_losses[:, j] = example_losses(shadow, population, pad_id=pad_id, device=device)
    return pool_losses, population_losses


def roc_summary(
    attack: str, scores: np.ndarray, is_member: np.ndarray, notes: list[str], **params
) -> AttackROC:
    """`metrics.roc_metrics`, with the curve read at log-spaced FPRs (for plots) and its warnings kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roc = metrics.roc_metrics(scores, is_member)
    for warning in caught:
        if str(warning.message) not in notes:
            notes.append(str(warning.message))
    fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
    grid = np.unique(np.r_[0.0, np.logspace(-4, 0, 41)])
    grid_tpr = [float(tpr[fpr <= level].max()) for level in grid]
    return AttackROC(
        attack=attack,
        auc=roc["auc"],
        tpr_at_fpr=roc["tpr_at_fpr"],
        roc_fpr=grid.tolist(),
        roc_tpr=grid_tpr,
        n_members=roc["n_members"],
        n_nonmembers=roc["n_nonmembers"],
        params=params,
    )


def _target_model(
    cfg: MembershipConfig, members: list[TokenizedExample], vocab: int, pad_id: int, device: torch.device
) -> nn.Module:
    if cfg.target.source != "train":
        return load_pretrained(cfg.target.source).to(device).eval()
    model = build_model(cfg.target.recipe, vocab, seed=cfg.seed, pad_id=pad_id)
    train_causal_lm(
        model, members, cfg.target.recipe, pad_id=pad_id, seed=cfg.seed, device=device, progress=cfg.progress
    )
    return model


# --------------------------------------------------------------------------- the audit


def run(config: MembershipConfig) -> MembershipResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    member_texts, nonmember_texts, population_texts = load_texts(config)
    needs_population = any("rmia" in attack for attack in config.attacks)
    if len(member_texts) == 0 or len(nonmember_texts) == 0:
        raise ValueError("membership inference needs at least one member and one non-member text")
    if needs_population and len(population_texts) < 2:
        raise ValueError("RMIA needs population samples: give data.population (or use synthetic data)")
    tokenizer_spec = config.tokenizer or (
        "tiny:512" if config.target.source == "train" else config.target.source
    )
    # A `tiny:` tokenizer learns from public text only: merges learned from the pool would single out
    # strings of the members (or non-members) and bias every loss the attacks compare.
    public = population_texts or member_texts + nonmember_texts
    if config.data.source == "synthetic":
        public = public_texts(200, config.seed)
    tokenizer = resolve_tokenizer(tokenizer_spec, public)
    pad_id = pad_token_id(tokenizer)
    length = config.data.max_length
    members = tokenize_texts(member_texts, tokenizer, length)
    pool = members + tokenize_texts(nonmember_texts, tokenizer, length)
    population = tokenize_texts(population_texts, tokenizer, length) if needs_population else []
    is_member = np.r_[np.ones(len(member_texts), bool), np.zeros(len(nonmember_texts), bool)]

    vocab = len(tokenizer)
    target = _target_model(config, members, vocab, pad_id, device)
    vocab = vocab_size_of(target)
    target_losses = example_losses(target, pool, pad_id=pad_id, device=device)
    population_target = (
        example_losses(target, population, pad_id=pad_id, device=device) if population else None
    )

    notes: list[str] = []
    if len(nonmember_texts) < HEADLINE_NONMEMBERS:
        notes.append(
            f"{len(nonmember_texts)} non-members: headline TPR at 0.1% FPR wants about "
            f"{HEADLINE_NONMEMBERS:,}; treat low-FPR numbers here as indicative"
        )
    if needs_population and len(population) < 1000:
        notes.append(
            f"RMIA scores are fractions of {len(population)} population samples ({len(population) + 1} "
            "levels): ties blunt its TPR at 0.1% FPR unless the population has at least 1,000 samples"
        )
    reports = []
    if "loss" in config.attacks:
        reports.append(roc_summary("loss", loss_attack_scores(target_losses), is_member, notes))

    if any(attack != "loss" for attack in config.attacks):
        keep = balanced_membership(len(pool), config.n_shadows, config.seed)
        shadow_recipe = config.shadow or config.target.recipe
        shadow_losses, population_shadow = train_shadows(
            pool,
            population,
            keep,
            shadow_recipe,
            vocab_size=vocab,
            pad_id=pad_id,
            seed=config.seed,
            device=device,
            progress=config.progress,
        )
        fixed = config.lira.fixed_variance
        fixed_variance = config.n_shadows < 64 if fixed == "auto" else bool(fixed)
        for online in (False, True):
            name = "lira_online" if online else "lira_offline"
            if name in config.attacks:
                scores = lira_scores(
                    target_losses, shadow_losses, keep, online=online, fixed_variance=fixed_variance
                )
                reports.append(
                    roc_summary(
                        name,
                        scores,
                        is_member,
                        notes,
                        n_shadows=config.n_shadows,
                        fixed_variance=fixed_variance,
                    )
                )
        r = config.rmia
        if "rmia" in config.attacks:
            a = r.offline_a
            if a == "auto":
                a, _ = tune_offline_a(
                    shadow_losses, keep, population_shadow, n_references=r.n_references, gamma=r.gamma
                )
            scores = rmia_scores(
                target_losses,
                shadow_losses,
                keep,
                population_target,
                population_shadow,
                n_references=r.n_references,
                offline_a=float(a),
                gamma=r.gamma,
            )
            reports.append(
                roc_summary(
                    "rmia",
                    scores,
                    is_member,
                    notes,
                    offline_a=float(a),
                    gamma=r.gamma,
                    n_references=r.n_references,
                    n_population=len(population),
                )
            )
        if "rmia_online" in config.attacks:
            scores = rmia_scores(
                target_losses,
                shadow_losses,
                keep,
                population_target,
                population_shadow,
                n_references=r.n_references,
                gamma=r.gamma,
                online=True,
            )
            reports.append(
                roc_summary(
                    "rmia_online",
                    scores,
                    is_member,
                    notes,
                    gamma=r.gamma,
                    n_references=r.n_references,
                    n_population=len(population),
                )
            )

    for note in notes:
        warnings.warn(note, stacklevel=2)
    result = MembershipResult(
        target_source=config.target.source,
        n_members=len(member_texts),
        n_nonmembers=len(nonmember_texts),
        n_population=len(population),
        n_shadows=config.n_shadows if any(attack != "loss" for attack in config.attacks) else 0,
        mean_loss_members=float(target_losses[is_member].mean()),
        mean_loss_nonmembers=float(target_losses[~is_member].mean()),
        attacks=reports,
        notes=notes,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result
