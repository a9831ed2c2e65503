"""Per-model measurements and the headline comparison of the memorization_kd experiment.

Imported by `memorization_kd.py` from this directory (see that file for the setup); both run as files, so
this directory is on the path.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from memorization_kd_config import ExperimentConfig
from torch import nn

from apparatus.canaries import mean_exposure_by_repeats, measure_canary
from apparatus.tiny_lm import example_losses
from attacks.membership.scores import loss_attack_scores, rmia_scores
from attacks.memorization.discoverable import discoverable_memorization, pii_completion
from attacks.memorization.extraction import (
    sample_generations,
    score_generations,
    summarize_extraction,
    targeted_canary_extraction,
)
from secure_kd import metrics

MODELS = ("teacher", "baseline", "soft_kd", "hard_kd")


def measure(
    cfg: ExperimentConfig,
    name: str,
    models: dict[str, nn.Module],
    tokenizer: Any,
    data: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    model, p = models[name], cfg.probes
    corpus, members, heldout = data["corpus"], data["member_examples"], data["heldout_examples"]
    mem = discoverable_memorization(
        model, members, prefix_tokens=p.prefix_tokens, suffix_tokens=p.suffix_tokens, pad_id=0, device=device
    )
    control = discoverable_memorization(
        model, heldout, prefix_tokens=p.prefix_tokens, suffix_tokens=p.suffix_tokens, pad_id=0, device=device
    )
    pii_members = pii_completion(
        model,
        tokenizer,
        data["member_records"],
        min_chars=p.pii_min_chars,
        max_prompt_tokens=cfg.max_length - 8,
        device=device,
    )
    pii_heldout = pii_completion(
        model,
        tokenizer,
        data["heldout_records"],
        min_chars=p.pii_min_chars,
        max_prompt_tokens=cfg.max_length - 8,
        device=device,
    )
    exposures = [
        measure_canary(
            model, tokenizer, c, corpus.secret_space(), estimate_samples=0, batch_size=1024, device=device
        )
        for c in corpus.canaries
    ]
    greedy = targeted_canary_extraction(
        model, tokenizer, corpus.canaries, n_samples=0, top_k=0, temperature=1.0, seed=cfg.seed, device=device
    )

    pool = members + heldout
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(heldout), bool)]
    losses = example_losses(model, pool, pad_id=0, device=device)
    references = [models["reference_0"], models["reference_1"]]
    reference_losses = np.stack(
        [example_losses(r, pool, pad_id=0, device=device) for r in references], axis=1
    )
    z = data["population_examples"]
    z_losses = example_losses(model, z, pad_id=0, device=device)
    z_reference = np.stack([example_losses(r, z, pad_id=0, device=device) for r in references], axis=1)
    rmia = rmia_scores(
        losses,
        reference_losses,
        np.zeros_like(reference_losses, bool),
        z_losses,
        z_reference,
        n_references=2,
        offline_a=p.rmia_offline_a,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few hundred non-members: only the AUC is read here
        loss_roc, rmia_roc = (
            metrics.roc_metrics(loss_attack_scores(losses), is_member),
            metrics.roc_metrics(rmia, is_member),
        )

    sequences = sample_generations(
        model,
        data["extraction_prompts"],
        max_new_tokens=p.extraction_new_tokens,
        top_k=p.extraction_top_k,
        temperature=1.0,
        seed=cfg.seed,
        eos_id=tokenizer.eos_token_id,
        pad_id=0,
        device=device,
    )
    sequences = [s for s in sequences if len(s) >= 2]
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
    index = data["index"]
    scored = score_generations(
        sequences, texts, index, model=model, reference=references[0], pad_id=0, device=device
    )
    extraction = summarize_extraction(scored, index, greedy, top_n=[10, 50])
    return {
        "memorized_members": [int(i) for i in np.flatnonzero(mem == 1.0)],
        "member_memorization_rate": float(np.nanmean(mem)),
        "heldout_memorization_rate": float(np.nanmean(control)),
        "eligible_members": int(np.sum(~np.isnan(mem))),
        "pii_completed_members": sorted(
            {(s["record_id"], s["value"]) for s in pii_members if s["completed"]}
        ),
        "pii_member_completion_rate": float(np.mean([s["completed"] for s in pii_members])),
        "pii_heldout_completion_rate": float(np.mean([s["completed"] for s in pii_heldout])),
        "mean_exposure": float(np.mean([e.exposure for e in exposures])),
        "mean_exposure_by_repeats": mean_exposure_by_repeats(exposures),
        "canary_greedy_extraction_rate": float(np.mean([g.greedy_extracted for g in greedy])),
        "mia_loss_auc": loss_roc["auc"],
        "mia_rmia_auc": rmia_roc["auc"],
        "member_loss": float(losses[is_member].mean()),
        "heldout_loss": float(losses[~is_member].mean()),
        "sampling_extraction": {
            "n_generations": extraction.n_generations,
            "n_flagged": extraction.n_flagged,
            "pii_values_extracted": extraction.pii_values_extracted,
            "precision_at": extraction.precision_at,
        },
    }


def headline(per_model: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def rate(name: str) -> float:
        return per_model[name]["member_memorization_rate"] - per_model[name]["heldout_memorization_rate"]

    sets = {name: set(per_model[name]["memorized_members"]) for name in MODELS}
    teacher_specific = sets["teacher"] - sets["baseline"]
    pii = {name: {tuple(v) for v in per_model[name]["pii_completed_members"]} for name in MODELS}
    pii_teacher_specific = pii["teacher"] - pii["baseline"]
    inherited = {name: len(sets[name] & teacher_specific) for name in ("soft_kd", "hard_kd")}
    inherited_pii = {name: len(pii[name] & pii_teacher_specific) for name in ("soft_kd", "hard_kd")}

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    reduction = {
        name: (1 - rate(name) / rate("baseline")) if rate("baseline") > 0 else None
        for name in ("soft_kd", "hard_kd")
    }
    hard_over_soft = ratio(inherited["hard_kd"], inherited["soft_kd"])
    return {
        "memorization_rate_above_heldout": {name: rate(name) for name in MODELS},
        "reduction_vs_finetuning": reduction,
        "teacher_specific_members": len(teacher_specific),
        "teacher_specific_inherited": inherited,
        "hard_over_soft_inherited": hard_over_soft,
        "teacher_specific_pii": len(pii_teacher_specific),
        "teacher_specific_pii_inherited": inherited_pii,
        "hard_over_soft_inherited_pii": ratio(inherited_pii["hard_kd"], inherited_pii["soft_kd"]),
        "paper_direction_kd_halves_memorization": (
            None if None in reduction.values() else all(v > 0.5 for v in reduction.values())
        ),
        "paper_direction_hard_inherits_more": None if hard_over_soft is None else hard_over_soft > 1.0,
    }
