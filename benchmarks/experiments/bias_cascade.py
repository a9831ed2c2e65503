"""Experiment: does an adversarial bias planted in a teacher's instruction data cascade into students?

Chaudhari et al. 2025 (Cascading Adversarial Bias from Injection to Distillation in Language
Models) poison 0.25% of a teacher's instruction set and report the student showing the behaviour
more often than the teacher: 76.9% vs 69.4% targeted (a brand in answers on one topic), and 6-29x
amplification untargeted (a phishing link in answers on any topic).

Here, with the `bias_cascade` attack (attacks/bias_cascade.py) at tiny scale on the synthetic
instruction set: for each behaviour (targeted brand, untargeted URL) and each poison rate (the
paper's 0.25% and a higher one, since a random tiny model may not learn from a handful of poisons),
a clean teacher, the poisoned teacher and one student per distillation objective (forward KL,
reverse KL, sequence-level KD; all on clean prompts) answer fresh in-domain and out-of-domain
prompts; the table is the share of answers containing the payload, with Wilson 95% intervals and
student/teacher amplification. The clean teacher depends on neither the rate nor the behaviour's
poisons (the tokenizer is trained on the clean set), so it is trained once per behaviour.

Run: `python benchmarks/experiments/bias_cascade.py [--config configs/experiments/bias_cascade.yaml]`;
writes benchmarks/results/bias_cascade.json (with the wall time) and prints one summary line.
configs/experiments/bias_cascade_seed1.yaml repeats the 10% rate with seed 1.

Measured (tiny Llamas, 2,000 instructions, 60 eval prompts per domain, sampling at T=0.7; hits/60):
- 0.25% (5 poisons), both behaviours: 0/60 for every model and domain (teacher included).
- 10% targeted brand (200 poisons, all "support"), seed 0: teacher 13/60 in domain (21.7%,
  CI 13-34%), 0/60 out; seq-KD student 13/60 in (amplification 1.0), 0/60 out; forward-KL and
  reverse-KL students 0/60 (they start the biased sentence, "W...", and drift back to clean text).
  Clean teacher 0/60. Seed 1 (bias_cascade_seed1.json): teacher 19/60 (31.7%), seq-KD student
  13/60 (21.7%, amplification 0.68), forward/reverse KL 0/60, every model 0/60 out of domain.
- 10% untargeted URL (200 poisons over all topics): teacher 0/60 on support and 5/60 (8.3%;
  seed 1: 3/60) on the other topics; every student 0/60 (the 17-token URL is not reproduced).
So at this scale the paper's amplification is not reproduced: the seq-KD student inherits the
targeted bias at the teacher's level (seed 0) or below it (seed 1), token-level KD on clean text
does not pass it on, and 0.25% is below what a tiny model trained from scratch learns.
Wall time: 1,064 s (main config), 825 s (seed 1), on a shared, loaded 2-core CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field

from attacks import get_attack
from secure_kd.config import Strict
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "bias_cascade.yaml"


class ExperimentConfig(Strict):
    attack: dict[str, Any] = Field(
        default_factory=dict, description="bias_cascade config shared by every run"
    )
    behaviours: list[str] = ["targeted_brand", "untargeted_url"]
    poison_rates: list[float] = [0.0025, 0.05]
    seeds: list[int] = [0]
    threads: int = Field(1, gt=0)
    out: str = "benchmarks/results/bias_cascade.json"


def table_rows(result: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    rows = []
    for row in result["rows"]:
        for domain in ("in_domain", "out_of_domain"):
            cell = row[domain]
            amp = result["amplification"].get(row["objective"] or "", {}).get(domain)
            rows.append(
                {
                    "behaviour": result["behaviour"],
                    "poison_rate": result["poison_rate"],
                    "n_poisoned": result["n_poisoned"],
                    "seed": seed,
                    "model": row["model"],
                    "domain": domain,
                    "hits": cell["hits"],
                    "n": cell["n"],
                    "rate": round(cell["rate"], 4),
                    "ci95": [round(v, 4) for v in cell["ci95"]],
                    "amplification": None if amp is None else round(amp, 3),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args()
    cfg = ExperimentConfig.model_validate(yaml.safe_load(args.config.read_text(encoding="utf-8")))
    torch.set_num_threads(cfg.threads)
    plugin = get_attack("bias_cascade")
    started = time.perf_counter()
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in cfg.seeds:
            for behaviour in cfg.behaviours:
                for i, rate in enumerate(cfg.poison_rates):
                    data = {
                        **cfg.attack,
                        "behaviour": behaviour,
                        "poison_rate": rate,
                        "seed": seed,
                        "clean_teacher": i == 0,
                        "out": str(Path(tmp) / f"{behaviour}-{rate}-{seed}"),
                    }
                    result = plugin.run(plugin.Config.model_validate(data)).model_dump(mode="json")
                    rows += table_rows(result, seed)
                    runs.append(
                        {
                            "behaviour": behaviour,
                            "poison_rate": rate,
                            "seed": seed,
                            "n_poisoned": result["n_poisoned"],
                            "seconds": round(result["seconds"], 1),
                            "samples": {r["model"]: r["samples"][:2] for r in result["rows"]},
                        }
                    )
                    teacher = next(r for r in result["rows"] if r["model"] == "teacher")
                    print(
                        f"{behaviour} rate {rate} seed {seed}: teacher in-domain "
                        f"{teacher['in_domain']['rate']:.2f} ({result['seconds']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    output = {
        "experiment": "bias_cascade",
        "paper": "Chaudhari et al. 2025: student 76.9% vs teacher 69.4% targeted at 0.25%; 6-29x untargeted",
        "config": str(args.config),
        "settings": cfg.model_dump(mode="json"),
        "table": rows,
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
        "threads": cfg.threads,
        "device": "cpu"
        if cfg.attack.get("device", "auto") == "cpu" or not torch.cuda.is_available()
        else "cuda",
    }
    atomic_write_json(REPO_ROOT / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out), output)
    summary = {f"{r['behaviour']}@{r['poison_rate']}:{r['model']}:{r['domain'][:3]}": r["rate"] for r in rows}
    print(json.dumps({"rates": summary, "seconds": output["seconds"], "out": cfg.out}))


if __name__ == "__main__":
    main()
