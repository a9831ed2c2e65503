"""Experiment: what each API-hardening setting costs the logit-leak and clone attacks, and the API's users.

For every defense setting in configs/experiments/api_hardening.yaml (an `ApiDefenseConfig`):

- logit leak (`attacks.get_attack("logit_leak")`, registry only): the attacker queries random
  prompts until the spectrum shows a clear drop (n_queries: auto); full logits when the hardened
  API gives them, else top-k logprobs with a logit bias when it accepts one. Reported: the
  queries spent, the estimated hidden size and whether it is right, or "not recovered" and why
  (no clear drop, view refused, budget or detector refusal).
- clone (`get_attack("clone")`): same victim and budget; the student starts from the recovered
  unembedding when recovery works through this API, else from a random init of the true width
  (giving the attacker the width). Reported: top-1 agreement and KL to the victim on held-out text.
- utility (`defenses.get_defense("api_hardening")`): top-1 agreement and mean KL of the hardened
  API's answers against the undefended full-logit API on ordinary prompts, and the detector's
  false-positive rate when the setting has a detector.

Run: `python benchmarks/experiments/api_hardening.py [--config PATH]`; writes the JSON named by
`out` with the wall time, and prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from pydantic import Field

from apparatus.hardened_api import ApiDefenseConfig
from apparatus.victims import load_victim
from attacks import get_attack
from attacks.logit_leak import random_prompts
from defenses import get_defense
from secure_kd.config import ModelConfig, Strict, load_config
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "api_hardening.yaml"


class Setting(Strict):
    name: str
    defense: ApiDefenseConfig | None = None


class ExperimentConfig(Strict):
    seed: int = 0
    out: str = "benchmarks/results/api_hardening.json"
    runs: str = "runs/experiments/api_hardening"
    victim: ModelConfig
    victim_logit_scale: float = Field(30.0, gt=0)
    top_k: int = Field(5, ge=2, description="the undefended API's top-k (bias view)")
    max_prompts: int = Field(512, gt=1)
    clone_budget: int = Field(10000, gt=0)
    clone_steps: int = Field(80, gt=0)
    traffic: dict = Field(default_factory=dict, description="overrides of the defense plugin's traffic")
    settings: list[Setting] = Field(..., min_length=1)


def attack_view(defense: ApiDefenseConfig | None) -> str:
    if defense is None or defense.top_k is None:
        return "full_logits"
    return "topk_logprobs_bias" if defense.allow_logit_bias else "topk_logprobs"


def run_leak(cfg: ExperimentConfig, setting: Setting) -> dict:
    """The attack as configured (auto stop at a 2-decade drop); when it fails, also the estimate an
    attacker would read from the largest drop after all `max_prompts` prompts (no stopping rule)."""
    leak = get_attack("logit_leak")
    view = "full_logits" if attack_view(setting.defense) == "full_logits" else "topk_logprobs_bias"
    common = {
        "seed": cfg.seed,
        "device": "cpu",
        "victim": cfg.victim,
        "victim_logit_scale": cfg.victim_logit_scale,
        "view": view,
        "top_k": cfg.top_k,
        "max_prompts": cfg.max_prompts,
        "api_defense": setting.defense,
    }
    try:
        result = leak.run(leak.Config(**common, out=f"{cfg.runs}/{setting.name}/leak", n_queries="auto"))
    except Exception as exc:  # every refusal or failure is a result here: "not recovered"
        row = {"recovered": False, "why": f"{type(exc).__name__}: {str(exc)[:160]}"}
    else:
        return {
            "recovered": bool(result.correct),
            "queries": result.queries_used,
            "prompts": result.prompts_used,
            "estimated_h": result.estimated_hidden_size,
            "true_h": result.true_hidden_size,
            "gap_decades": round(result.gap_decades, 2),
        }
    try:
        fixed = leak.run(
            leak.Config(**common, out=f"{cfg.runs}/{setting.name}/leak_fixed", n_queries=cfg.max_prompts)
        )
    except Exception as exc:
        row["at_max_prompts"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    else:
        row["at_max_prompts"] = {
            "estimated_h": fixed.estimated_hidden_size,
            "correct": fixed.correct,
            "queries": fixed.queries_used,
            "gap_decades": round(fixed.gap_decades, 2),
        }
    return row


def run_clone(cfg: ExperimentConfig, setting: Setting, recovered: bool, true_h: int) -> dict:
    clone = get_attack("clone")
    view = attack_view(setting.defense)
    init = "recovered" if recovered and view != "topk_logprobs" else "random"
    config = clone.Config(
        seed=cfg.seed,
        device="cpu",
        out=f"{cfg.runs}/{setting.name}/clone",
        victim=cfg.victim,
        victim_logit_scale=cfg.victim_logit_scale,
        access=view,
        top_k=max(cfg.top_k, 2),
        query_budget=cfg.clone_budget,
        train={"steps": cfg.clone_steps, "batch_size": 8, "lr": 3e-3},
        student={"init": init, "hidden_size": None if init == "recovered" else true_h},
        api_defense=setting.defense,
    )
    try:
        variant = clone.run(config).variants[0]
    except Exception as exc:
        return {"init": init, "why": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return {
        "init": init,
        "access": view,
        "queries": variant.queries_used,
        "top1_agreement": round(variant.top1_agreement, 4),
        "mean_forward_kl": round(variant.mean_forward_kl, 4),
    }


def run_utility(cfg: ExperimentConfig, setting: Setting) -> dict:
    plugin = get_defense("api_hardening")
    defense = setting.defense or ApiDefenseConfig()
    config = plugin.Config(
        seed=cfg.seed,
        device="cpu",
        out=f"{cfg.runs}/{setting.name}/utility",
        victim=cfg.victim,
        victim_logit_scale=cfg.victim_logit_scale,
        view="full_logits",
        top_k=cfg.top_k,
        defense=defense,
        traffic=cfg.traffic,
    )
    result = plugin.run(config)
    row = {
        "top1_agreement": round(result.utility_top1_agreement, 4),
        "mean_kl": round(result.utility_mean_kl, 5),
    }
    if result.detector is not None:
        row["detector_false_positive_rate"] = result.detector.false_positive_rate
        row["detector_flags_extraction_at_query"] = result.detector.extraction_flagged_at_query
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [], ExperimentConfig)
    started = time.perf_counter()
    true_h = cfg.victim.tiny.hidden_size
    victim, _ = load_victim(
        cfg.victim, seed=cfg.seed, device=torch.device("cpu"), logit_scale=cfg.victim_logit_scale
    )
    prompts = random_prompts(256, 8, cfg.victim.tiny.vocab_size or 256, cfg.seed + 1)
    with torch.no_grad():
        logit_std = float(victim(input_ids=torch.tensor(prompts)).logits[:, -1].std())
    rows = []
    for setting in cfg.settings:
        t0 = time.perf_counter()
        leak = run_leak(cfg, setting)
        row = {
            "setting": setting.name,
            "defense": None if setting.defense is None else setting.defense.model_dump(exclude_defaults=True),
            "logit_leak": leak,
            "clone": run_clone(cfg, setting, leak["recovered"], true_h),
            "utility": run_utility(cfg, setting),
        }
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        fixed = leak.get("at_max_prompts")
        late = f" (h at {cfg.max_prompts}: {fixed['estimated_h']})" if isinstance(fixed, dict) else ""
        print(
            f"{setting.name:22s} leak={leak.get('queries', 'not recovered')!s:>13}{late} "
            f"h={leak.get('estimated_h', '-')!s:>3} clone={row['clone'].get('top1_agreement', '-')!s:>7} "
            f"utility_top1={row['utility']['top1_agreement']:.3f} kl={row['utility']['mean_kl']:.4f}",
            flush=True,
        )
    payload = {
        "config": cfg.model_dump(mode="json"),
        "victim_next_token_logit_std": round(logit_std, 3),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": 1,
    }
    atomic_write_json(REPO_ROOT / cfg.out, payload)
    print(f"wrote {cfg.out} in {payload['wall_seconds']} s")


if __name__ == "__main__":
    main()
