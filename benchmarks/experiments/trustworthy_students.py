"""Experiment: FIRST-style calibrated top-5 distillation and teacher-hacking detection over seeds.

Runs `defenses.get_defense("trustworthy_students")` (defenses/trustworthy_students.py) for each
seed and oracle sharpness in configs/experiments/trustworthy_students.yaml and tabulates: the
fitted teacher temperature, the teacher's ECE before/after temperature scaling, the ECE of students
distilled from the raw and from the calibrated top-5 (and after their own temperature scaling),
and the step at which the teacher-hacking monitor fired together with the step where the golden
metric was best.

Run: `python benchmarks/experiments/trustworthy_students.py [--config PATH]`; writes the JSON named
by `out` with the wall time and prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from pydantic import Field

from defenses import get_defense
from secure_kd.config import Strict, load_config
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "trustworthy_students.yaml"


class ExperimentConfig(Strict):
    out: str = "benchmarks/results/trustworthy_students.json"
    runs: str = "runs/experiments/trustworthy_students"
    seeds: list[int] = Field(..., min_length=1)
    oracle_logit_scales: list[float] = Field(..., min_length=1)
    base: dict = Field(default_factory=dict, description="other fields of the defense's config")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [], ExperimentConfig)
    plugin = get_defense("trustworthy_students")
    started = time.perf_counter()
    rows = []
    for scale in cfg.oracle_logit_scales:
        for seed in cfg.seeds:
            out = f"{cfg.runs}/scale{scale:g}_seed{seed}"
            config = plugin.Config(**{**cfg.base, "seed": seed, "oracle_logit_scale": scale, "out": out})
            r = plugin.run(config)
            best = min(r.monitor_history, key=lambda p: p.golden)
            row = {
                "oracle_logit_scale": scale,
                "seed": seed,
                "teacher_temperature": round(r.teacher_temperature, 3),
                "teacher_ece_before": round(r.teacher_before["ece"], 4),
                "teacher_ece_after": round(r.teacher_after["ece"], 4),
                "teacher_nll_before": round(r.teacher_before["nll"], 4),
                "teacher_nll_after": round(r.teacher_after["nll"], 4),
                "oracle_nll": round(r.oracle_test_nll, 4),
                "student_raw_ece": round(r.student_raw_top5.ece, 4),
                "student_first_ece": round(r.student_first.ece, 4),
                "student_raw_ece_after_ts": round(r.student_raw_top5.ece_after_temperature_scaling, 4),
                "student_first_ece_after_ts": round(r.student_first.ece_after_temperature_scaling, 4),
                "student_raw_nll": round(r.student_raw_top5.nll, 4),
                "student_first_nll": round(r.student_first.nll, 4),
                "hacking_flagged_at_step": r.hacking_flagged_at_step,
                "golden_best_step": best.step,
                "golden_best": round(best.golden, 4),
                "golden_final": round(r.monitor_history[-1].golden, 4),
                "seconds": round(r.seconds, 1),
            }
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    payload = {
        "config": cfg.model_dump(mode="json"),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": 1,
    }
    atomic_write_json(REPO_ROOT / cfg.out, payload)
    print(f"wrote {cfg.out} in {payload['wall_seconds']} s")


if __name__ == "__main__":
    main()
