"""Non-IID federated distillation: client-side filtering on/off, and LinUCB vs random vs central.

Configuration and arms: configs/experiments/fed_noniid.yaml. Every arm is a `secure-kd federate` job
run through Flower's simulation engine (`federation.run.run_federation`); only the named setting
changes between arms of one seed. Reported per arm: mean over organizations (and the worst one) of
the perplexity on the public test set (`test-loss`) and on the organization's own held-out records
(`heldout-loss`) after the final exchange, the share of transfer records kept (filtering), and the
wall time.

Run: `python benchmarks/experiments/fed_noniid.py [--config ...]`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from federation.config import FederatedJob
from federation.run import run_federation

ROOT = Path(__file__).resolve().parents[2]


def _arms(cfg: dict) -> list[tuple[str, dict]]:
    arms = []
    for alpha in cfg["filtering_alphas"]:
        for filtered in (False, True):
            transfer = dict(cfg["base"]["transfer"], filtering=cfg["filtering"] if filtered else None)
            arms.append(
                (
                    f"fed_distill alpha={alpha} filtering={'on' if filtered else 'off'}",
                    {"mode": "fed_distill", "partition_alpha": alpha, "transfer": transfer},
                )
            )
    alpha = cfg.get("pairing_alpha")
    if alpha is None:  # filtering arms only
        return arms
    if alpha not in cfg["filtering_alphas"]:  # the central baseline of the pairing comparison
        arms.append(
            (f"fed_distill alpha={alpha} filtering=off", {"mode": "fed_distill", "partition_alpha": alpha})
        )
    arms.append(
        (f"p2p linucb alpha={alpha}", {"mode": "p2p", "partition_alpha": alpha, "p2p": {"policy": "linucb"}})
    )
    arms.append(
        (f"p2p random alpha={alpha}", {"mode": "p2p", "partition_alpha": alpha, "p2p": {"policy": "random"}})
    )
    return arms


def _job(cfg: dict, arm: dict, seed: int, out: Path) -> FederatedJob:
    job = json.loads(json.dumps(cfg["base"]))
    job.update({k: v for k, v in arm.items() if k != "partition_alpha"})
    job["partition"] = dict(job["partition"], alpha=arm["partition_alpha"])
    job.update(seed=seed, out=str(out))
    if job["mode"] == "p2p":
        job["min_clients"] = 2
    return FederatedJob.model_validate(job)


def _perplexities(result, key: str) -> list[float]:
    record = result.final or result.rounds[-1]
    return [math.exp(c.metrics[key]) for c in record.clients if key in c.metrics]


def run_arm(name: str, arm: dict, cfg: dict, seed: int) -> dict:
    out = Path(cfg["out"]) / name.replace(" ", "_").replace("=", "") / f"seed{seed}"
    job = _job(cfg, arm, seed, out)
    started = time.perf_counter()
    result = run_federation(job, progress=False)
    if not result.completed:
        raise RuntimeError(f"{name} seed {seed} failed: {result.error}")
    test, own = _perplexities(result, "test-loss"), _perplexities(result, "heldout-loss")
    kept = [
        c.metrics["kept-fraction"] for r in result.rounds for c in r.clients if "kept-fraction" in c.metrics
    ]
    return {
        "arm": name,
        "seed": seed,
        "test_ppl_mean": statistics.mean(test),
        "test_ppl_worst": max(test),
        "own_heldout_ppl_mean": statistics.mean(own) if own else None,
        "kept_fraction": statistics.mean(kept) if kept else None,
        "seconds": time.perf_counter() - started,
    }


def comparisons(cfg: dict) -> list[tuple[str, str]]:
    """(arm, baseline) pairs: filtering on vs off at each alpha; LinUCB vs random vs central."""
    pairs = [
        (f"fed_distill alpha={a} filtering=on", f"fed_distill alpha={a} filtering=off")
        for a in cfg["filtering_alphas"]
    ]
    a = cfg.get("pairing_alpha")
    if a is None:
        return pairs
    central, linucb, random = (
        f"fed_distill alpha={a} filtering=off",
        f"p2p linucb alpha={a}",
        f"p2p random alpha={a}",
    )
    return pairs + [(linucb, random), (linucb, central), (random, central)]


def paired_differences(runs: list[dict], cfg: dict) -> list[dict]:
    """Per seed (same split, organizations and local work), an arm's test perplexity minus its baseline's.
    With several seeds the sign of each paired difference says more than the two means do."""
    by = {(r["arm"], r["seed"]): r["test_ppl_mean"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for arm, base in comparisons(cfg):
        diffs = [by[(arm, s)] - by[(base, s)] for s in seeds if (arm, s) in by and (base, s) in by]
        out.append(
            {
                "arm": arm,
                "minus": base,
                "test_ppl_diff_per_seed": diffs,
                "mean_diff": statistics.mean(diffs) if diffs else None,
                "seeds_lower": sum(d < 0 for d in diffs),
                "n_seeds": len(diffs),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/experiments/fed_noniid.yaml"))
    args = parser.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs = []
    for seed in cfg["seeds"]:
        for name, arm in _arms(cfg):
            runs.append(run_arm(name, arm, cfg, seed))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    table = []
    for name, _ in _arms(cfg):
        rows = [r for r in runs if r["arm"] == name]
        table.append(
            {
                "arm": name,
                "test_ppl_mean": statistics.mean(r["test_ppl_mean"] for r in rows),
                "test_ppl_worst": statistics.mean(r["test_ppl_worst"] for r in rows),
                "own_heldout_ppl_mean": statistics.mean(r["own_heldout_ppl_mean"] for r in rows),
                "kept_fraction": rows[0]["kept_fraction"]
                and statistics.mean(r["kept_fraction"] for r in rows),
                "n_seeds": len(rows),
                "test_ppl_per_seed": [r["test_ppl_mean"] for r in rows],
                "test_ppl_sd": statistics.stdev(r["test_ppl_mean"] for r in rows) if len(rows) > 1 else None,
            }
        )
    report_pairs = paired_differences(runs, cfg)
    report = {
        "experiment": "fed_noniid",
        "config": cfg,
        "table": table,
        "paired": report_pairs,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    Path(cfg["results"]).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg["results"]).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({row["arm"]: round(row["test_ppl_mean"], 2) for row in table}))


if __name__ == "__main__":
    main()
