"""Experiment: defensive distillation vs FGSM / CW-L2, and MTARD / progressive distillation vs PGD-AT.

Part 1 (Papernot et al. 2016; Carlini & Wagner 2017): for T in {1, 20, 50, 100} a digits CNN teacher
trained at T is distilled into a same-size student at T and evaluated at T = 1; FGSM (eps 0.1, 0.2)
and CW-L2 success rates among correctly classified test images, next to an undefended CE model.
Part 2 (Zhao et al. 2022, MTARD; progressive ProARD-style chain): clean and PGD-20 robust accuracy of
MTARD students (widths 8 then 4), PGD adversarial training and plain training of the same students.
Part 3 (`adversarial_direct`): the width-4 MTARD student distilled directly from the width-16 robust
teacher, to compare with the progressive chain.
Means over seeds and per-seed values are written.

Run: `python benchmarks/experiments/defensive_distillation.py [--config PATH] [--seeds 0]`; writes
benchmarks/results/defensive_distillation.json (with the wall time) and prints one summary line.

Measured (seeds 0 and 1, 200 test images for part 1, the whole test set for parts 2-3; 602 s with one
torch thread on a shared 2-core machine):
  FGSM eps 0.2 success: undefended 0.941, T=1 0.946, T=20 0.268, T=50 0.109, T=100 0.046 (eps 0.1:
  0.393 / 0.395 / 0.196 / 0.104 / 0.043); CW-L2 success 1.000 / 1.000 / 0.989 / 0.989 / 0.992 with mean
  L2 0.73 -> 0.89; clean accuracy 0.972 -> 0.923 at T=100; mean |logit| 7.5 -> 567.
  PGD-20 (eps 0.1) robust / clean accuracy, width 8: MTARD 0.791 / 0.974, PGD-AT 0.792 / 0.978,
  plain 0.539 / 0.977; width 4: progressive MTARD 0.701 / 0.964, direct MTARD 0.729 / 0.958,
  PGD-AT 0.758 / 0.956, plain 0.410 / 0.960 (PGD-AT teacher 0.859, clean teacher 0.536).
Both directions of Papernot / Carlini-Wagner reproduce. MTARD matches PGD-AT at width 8 and trails it
at width 4; the progressive chain does not beat direct distillation here.
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

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "defensive_distillation.yaml"
PARTS = ("defensive", "adversarial", "adversarial_direct")


def _config(part: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / part["base"]).read_text(encoding="utf-8"))
    data.update(part.get("overrides", {}), seed=seed, device="cpu", out=str(out))
    return data


def defensive_part(part: dict[str, Any], seeds: list[int], tmp: Path) -> dict[str, Any]:
    plugin = get_defense("defensive_distillation")
    runs = []
    for seed in seeds:
        result = plugin.run(plugin.Config.model_validate(_config(part, seed, tmp / f"dd-{seed}")))
        runs.append(
            {
                "seed": seed,
                "seconds": result.seconds,
                "models": {
                    m.name: {
                        "clean_accuracy": m.clean_accuracy,
                        **{f"fgsm_{eps}": v for eps, v in m.fgsm_success.items()},
                        "cw": m.cw_success,
                        "cw_mean_l2": m.cw_mean_l2,
                        "mean_abs_logit": m.mean_abs_logit,
                    }
                    for m in result.models
                },
            }
        )
        print(f"defensive seed {seed}: {result.seconds:.0f} s", file=sys.stderr, flush=True)
    mean = {
        name: {
            metric: statistics.fmean(run["models"][name][metric] for run in runs)
            for metric in runs[0]["models"][name]
            if runs[0]["models"][name][metric] is not None
        }
        for name in runs[0]["models"]
    }
    return {"mean": mean, "runs": runs}


def adversarial_part(part: dict[str, Any], seeds: list[int], tmp: Path) -> dict[str, Any]:
    plugin = get_defense("adversarial_distillation")
    runs = []
    for seed in seeds:
        result = plugin.run(plugin.Config.model_validate(_config(part, seed, tmp / f"ad-{seed}")))
        row: dict[str, Any] = {
            "teacher_clean": result.nat_teacher.model_dump(),
            "teacher_pgd_at": result.adv_teacher.model_dump(),
        }
        for student in result.students:
            for name in ("mtard", "pgd_at", "plain"):
                row[f"w{student.width}_{name}"] = getattr(student, name).model_dump()
            row[f"w{student.width}_final_w_adv"] = {"value": student.final_weights[0]}
        runs.append({"seed": seed, "seconds": result.seconds, "rows": row})
        print(f"adversarial seed {seed}: {result.seconds:.0f} s", file=sys.stderr, flush=True)
    mean = {
        name: {
            metric: statistics.fmean(run["rows"][name][metric] for run in runs)
            for metric in runs[0]["rows"][name]
        }
        for name in runs[0]["rows"]
    }
    return {"mean": mean, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="parts missing from the config are skipped",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experiment = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seeds = args.seeds or experiment["seeds"]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "defensive" in args.parts:
            results["defensive_distillation"] = defensive_part(experiment["defensive"], seeds, Path(tmp))
        for part in ("adversarial", "adversarial_direct"):
            if part in args.parts and part in experiment:
                name = part.replace("adversarial", "adversarial_distillation")
                results[name] = adversarial_part(experiment[part], seeds, Path(tmp) / part)
    output = {
        "experiment": "defensive_distillation",
        "config": str(
            args.config.resolve().relative_to(REPO_ROOT)
            if args.config.resolve().is_relative_to(REPO_ROOT)
            else args.config
        ),
        "settings": {part: experiment[part] for part in PARTS if part in experiment},
        "seeds": seeds,
        "results": results,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
    }
    out = REPO_ROOT / experiment["out"]
    atomic_write_json(out, output)
    summary = {
        part: {name: {k: round(v, 3) for k, v in values.items()} for name, values in data["mean"].items()}
        for part, data in results.items()
    }
    print(json.dumps({"summary": summary, "seconds": round(output["seconds"], 1), "out": str(out)}))


if __name__ == "__main__":
    main()
