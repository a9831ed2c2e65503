"""Experiment: how much of SmolLM2-135M-Instruct (Q4_1) leaks through its API, and how well it clones.

Three measurements, configured in configs/experiments/clone_smollm2.yaml:

1. Hidden size from full logits: h estimated from the first n queries for every n in a sweep
   (theory: h + 1 queries suffice), the queries an attacker who does not know h spends before the
   spectrum shows a clear drop, and the error of the recovered output projection against the true
   (tied) embedding matrix.
2. The logit-bias route: full logit differences recovered from top-k logprobs with a logit bias on
   a few prompts, their largest error, and the cost, ceil((V-1)/(k-1)) queries per prompt.
3. Cloning at several query budgets (`attacks.clone`): the logit-initialized clone against a
   random-init student with the same access and against distillation from sampled text only.

Run: `python benchmarks/experiments/clone_smollm2.py [--config PATH]`. It writes the JSON named by
`out` (students and their checkpoints go to runs/experiments/) and prints one summary line. It
refuses to start when the victim is 'smollm2' and the asset has not been fetched (`secure-kd assets
fetch-smollm2`): no download happens here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from apparatus.victims import load_victim
from attacks import clone
from attacks.logit_leak import (
    bias_queries_per_prompt,
    hidden_size_report,
    projection_error,
    query_until_rank_found,
    random_prompts,
    recover_logits_with_bias,
    recover_output_projection,
    subspace_geometry,
    true_hidden_size,
)
from secure_kd.api import ModelAPI, View
from secure_kd.assets import asset_dir
from secure_kd.config import ModelConfig, Strict, load_config
from secure_kd.models import resolve_device
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "clone_smollm2.yaml"


class HiddenSizeSweep(Strict):
    sweep: list[int] = Field(..., min_length=1)
    prompt_length: int = Field(8, gt=0)
    step: int = Field(16, gt=0)
    margin: int = Field(8, gt=0)
    min_gap_decades: float = Field(2.0, gt=0)


class LogitBiasCheck(Strict):
    prompts: int = Field(2, gt=0)
    top_k: int = Field(20, ge=2)
    ref_token: int = Field(0, ge=0)


class CloneSweep(Strict):
    budgets: list[int] = Field(..., min_length=1)
    access: View = "full_logits"
    top_k: int = Field(20, ge=2)
    tail: Literal["uniform", "zero"] = "uniform"
    loss: str = "forward_kl"
    victim_logit_scale: float = Field(1.0, gt=0)
    prompts: clone.PromptSetConfig = clone.PromptSetConfig()
    recovery: clone.RecoveryConfig = clone.RecoveryConfig()
    text: clone.TextSamplingConfig = clone.TextSamplingConfig()
    student: clone.StudentConfig = clone.StudentConfig()
    train: clone.CloneTrainConfig = clone.CloneTrainConfig()
    compare_random_init: bool = True
    compare_text_only: bool = True


class ExperimentConfig(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str = "benchmarks/results/clone_smollm2.json"
    victim: ModelConfig = ModelConfig(source="smollm2")
    hidden_size: HiddenSizeSweep
    logit_bias: LogitBiasCheck = LogitBiasCheck()
    clone: CloneSweep | None = None


def hidden_size_part(cfg: ExperimentConfig, victim, tokenizer) -> dict:
    h = cfg.hidden_size
    api = ModelAPI(victim, tokenizer, view="full_logits")
    prompts = random_prompts(max(h.sweep), h.prompt_length, api.vocab_size, cfg.seed)
    started = time.perf_counter()
    logits = api.full_logits_batch(prompts)
    query_seconds = time.perf_counter() - started
    sweep = []
    for n in sorted(h.sweep):
        report = hidden_size_report(logits[:n])
        sweep.append({"queries": n, "estimated_hidden_size": report["h"], "gap_decades": report["gap_size"]})
    full = hidden_size_report(logits)
    true_weight = victim.get_output_embeddings().weight.detach().cpu()
    recovered = recover_output_projection(logits, full["h"])
    attacker = ModelAPI(victim, tokenizer, view="full_logits")
    attacker_prompts = random_prompts(4 * max(h.sweep), h.prompt_length, api.vocab_size, cfg.seed)
    _, stop = query_until_rank_found(
        attacker, attacker_prompts, step=h.step, margin=h.margin, min_gap_decades=h.min_gap_decades
    )
    h_true = true_hidden_size(victim)
    exact = [row["queries"] for row in sweep if row["estimated_hidden_size"] == h_true]
    return {
        "true_hidden_size": h_true,
        "sweep": sweep,
        "fewest_queries_in_sweep_giving_exact_h": min(exact) if exact else None,
        "attacker_stopping_queries": attacker.queries,
        "attacker_estimate": stop["h"],
        "singular_values": full["singular_values"],
        "projection_error": projection_error(recovered, true_weight),
        "geometry": {
            k: v for k, v in subspace_geometry(recovered, true_weight).items() if k != "principal_angles_deg"
        },
        "seconds_for_queries": query_seconds,
    }


def logit_bias_part(cfg: ExperimentConfig, victim, tokenizer, hidden_size: int) -> dict:
    b = cfg.logit_bias
    api = ModelAPI(victim, tokenizer, view="topk_logprobs_bias", top_k=b.top_k)
    full = ModelAPI(victim, tokenizer, view="full_logits")
    errors, started = [], time.perf_counter()
    for prompt in random_prompts(b.prompts, cfg.hidden_size.prompt_length, api.vocab_size, cfg.seed + 1):
        recovered = recover_logits_with_bias(api, prompt, api.vocab_size, ref_token=b.ref_token)
        logits = full.full_logits(prompt)
        errors.append(float((recovered - (logits - logits[b.ref_token])).abs().max()))
    per_prompt = bias_queries_per_prompt(api.vocab_size, b.top_k)
    return {
        "top_k": b.top_k,
        "queries_per_prompt": per_prompt,
        "queries_measured": api.queries,
        "max_abs_error": max(errors),
        "queries_for_h_plus_1_prompts": (hidden_size + 1) * per_prompt,
        "seconds_per_prompt": (time.perf_counter() - started) / b.prompts,
    }


def clone_part(cfg: ExperimentConfig, out_dir: Path) -> list[dict]:
    c = cfg.clone
    assert c is not None, "main() calls this only when the config has a clone section"
    rows = []
    for budget in c.budgets:
        config = clone.CloneConfig(
            seed=cfg.seed,
            device=cfg.device,
            out=str(out_dir / f"budget_{budget}"),
            victim=cfg.victim,
            victim_logit_scale=c.victim_logit_scale,
            access=c.access,
            top_k=c.top_k,
            tail=c.tail,
            loss=c.loss,
            query_budget=budget,
            prompts=c.prompts,
            recovery=c.recovery,
            text=c.text,
            student=c.student,
            train=c.train,
            compare_random_init=c.compare_random_init,
            compare_text_only=c.compare_text_only,
        )
        result = clone.run(config)
        for variant in result.variants:
            rows.append(
                {
                    "budget": budget,
                    "victim_perplexity": result.victim_perplexity,
                    **variant.model_dump(exclude={"unembedding_geometry", "recovered"}),
                    "recovered_projection_error": (variant.recovered or {}).get("projection_error"),
                    "unembedding_max_angle_deg": variant.unembedding_geometry["max_principal_angle_deg"],
                }
            )
    return rows


def summary(results: dict) -> dict:
    hidden = results["hidden_size"]
    line = {
        "h_true": hidden["true_hidden_size"],
        "h_estimated": hidden["attacker_estimate"],
        "queries_to_h": hidden["attacker_stopping_queries"],
        "fewest_sweep_queries_exact": hidden["fewest_queries_in_sweep_giving_exact_h"],
        "projection_error": hidden["projection_error"],
    }
    for row in results.get("clone", []):
        if row["name"] == "text_only":
            clone = next(r for r in results["clone"] if r["budget"] == row["budget"] and r["name"] == "clone")
            ratio = clone["top1_agreement"] / row["top1_agreement"] if row["top1_agreement"] else math.inf
            line[f"agreement_clone_over_text_at_{row['budget']}"] = ratio
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, model=ExperimentConfig)
    if cfg.victim.source == "smollm2" and not (asset_dir() / "asset.json").is_file():
        print(
            f"SmolLM2 (Q4_1) is not in {asset_dir()}; run `secure-kd assets fetch-smollm2` first. "
            "Nothing was run.",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    victim, tokenizer = load_victim(cfg.victim, seed=cfg.seed, device=device)
    out = REPO_ROOT / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out)
    results: dict = {
        "experiment": "clone_smollm2",
        "victim": "SmolLM2-135M-Instruct (Q4_1)" if cfg.victim.source == "smollm2" else cfg.victim.source,
        "device": str(device),
        "config": cfg.model_dump(mode="json"),
    }
    results["hidden_size"] = hidden_size_part(cfg, victim, tokenizer)
    h = results["hidden_size"]["attacker_estimate"]
    results["logit_bias"] = logit_bias_part(cfg, victim, tokenizer, h)
    if cfg.clone is not None:
        results["clone"] = clone_part(cfg, REPO_ROOT / "runs" / "experiments" / out.stem)
    results["seconds"] = time.perf_counter() - started
    atomic_write_json(out, results)
    print(json.dumps(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
