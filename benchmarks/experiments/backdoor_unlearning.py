"""Experiment: removing planted backdoors by distillation (NAD, clean-anchor self-distillation).

For each variant in configs/experiments/backdoor_unlearning.yaml, each trigger kind it lists (BadNets
patch on digits, text trigger, switchable text trigger) and each seed, the `backdoor_unlearning`
defense plants the backdoor, takes a clean 10% of the training set, and runs the variant's method.
Reported per variant and kind, mean over seeds (and per seed): clean accuracy (CA), attack success rate
(ASR) and robust accuracy (RA) before and after, and DER = (max(0, dASR) - max(0, dCA) + 1) / 2.

Run: `python benchmarks/experiments/backdoor_unlearning.py [--config PATH] [--seeds 0 1]`; writes
benchmarks/results/backdoor_unlearning.json (with the wall time) and prints one summary line.

Measured (3 seeds, one torch thread on a shared 2-core machine, 418 s): mean ASR before -> after (DER)
  nad (beta 0.5): patch 0.998 -> 0.107 (0.936), text 0.985 -> 0.576 (0.705), switchable 0.865 -> 0.361 (0.752)
  nad, beta 0 (fine-tune only): patch -> 0.094 (0.943), text -> 0.318 (0.834), switchable -> 0.248 (0.808)
  self_kd, known trigger: patch -> 0.007 (0.990), text -> 0.053 (0.965), switchable -> 0.002 (0.932)
  self_kd, reversed trigger: patch -> 0.002 (0.988; NC-lite picked class 0 in 3/3 seeds, anomaly index
  1.65-2.22), text -> 0.053 (0.965; the one-word search found the target in 3/3 seeds)
Clean accuracy moved by at most 2 points. On these small models the attention term of NAD adds nothing
over its fine-tuning step (beta 0 does as well or better); the clean-anchor self-distillation removes
all three backdoors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from defenses import get_defense
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "backdoor_unlearning.yaml"


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def _row(report: dict[str, Any]) -> dict[str, float]:
    metrics = report["metrics"]
    row = {
        "ca": metrics["clean_accuracy"],
        "asr": metrics["attack_success_rate"],
        "ra": metrics["robust_accuracy"],
    }
    for name, value in (report.get("switch") or {}).items():
        if name != "asr_active":
            row[name] = value
    return row


def run_one(plugin: Any, data: dict[str, Any]) -> dict[str, Any]:
    result = plugin.run(plugin.Config.model_validate(data)).model_dump(mode="json")
    (method,) = result["methods"]
    details = {
        k: v
        for k, v in method["details"].items()
        if k in ("candidate_target", "anomaly_index", "found_true_target", "candidate")
    }
    return {
        "seed": data["seed"],
        "before": _row(result["before"]),
        "after": _row(method["after"]),
        "der": method["der"],
        "details": details,
        "seconds": result["seconds"],
    }


def _mean(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {metric: statistics.fmean(run[key][metric] for run in runs) for metric in runs[0][key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiment = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    base = yaml.safe_load((REPO_ROOT / experiment["base"]).read_text(encoding="utf-8"))
    base["device"] = "cpu"
    seeds = args.seeds or experiment["seeds"]
    plugin = get_defense("backdoor_unlearning")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in experiment["variants"]:
            results[variant["name"]] = {}
            for kind in variant["kinds"]:
                runs = []
                for seed in seeds:
                    data = _merge(base, {"kind": kind, **experiment.get("kind_overrides", {}).get(kind, {})})
                    data = _merge(data, variant["overrides"])
                    data.update(seed=seed, out=str(Path(tmp) / f"{variant['name']}-{kind}-{seed}"))
                    runs.append(run_one(plugin, data))
                    print(
                        f"{variant['name']} {kind} seed {seed}: ASR {runs[-1]['before']['asr']:.3f} -> "
                        f"{runs[-1]['after']['asr']:.3f} ({runs[-1]['seconds']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                results[variant["name"]][kind] = {
                    "mean": {
                        "before": _mean(runs, "before"),
                        "after": _mean(runs, "after"),
                        "der": statistics.fmean(run["der"] for run in runs),
                    },
                    "runs": runs,
                }
    output = {
        "experiment": "backdoor_unlearning",
        "config": str(
            args.config.resolve().relative_to(REPO_ROOT)
            if args.config.resolve().is_relative_to(REPO_ROOT)
            else args.config
        ),
        "base": base,
        "seeds": seeds,
        "results": results,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
    }
    out = REPO_ROOT / experiment["out"]
    atomic_write_json(out, output)
    line = {
        name: {
            kind: {
                "asr": [round(v["mean"]["before"]["asr"], 3), round(v["mean"]["after"]["asr"], 3)],
                "der": round(v["mean"]["der"], 3),
            }
            for kind, v in kinds.items()
        }
        for name, kinds in results.items()
    }
    print(json.dumps({"summary": line, "seconds": round(output["seconds"], 1), "out": str(out)}))


if __name__ == "__main__":
    main()
