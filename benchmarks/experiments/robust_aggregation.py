"""Robust fedavg aggregation vs a malicious organization: rule x attack -> final test loss, backdoor ASR.

Configuration: configs/experiments/robust_aggregation.yaml. Calls the `robust_aggregation` defense
(every rule x attack, each a `secure-kd federate` job through Flower's simulation engine) and the
`federated` attack (honest vs attacked run of one setting, plus the single-step update inversion)
through their registries. Writes benchmarks/results/robust_aggregation.json with the wall time.

Run: `python benchmarks/experiments/robust_aggregation.py [--config ...]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from attacks import get_attack
from defenses import get_defense

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/experiments/robust_aggregation.yaml"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(args.config).read_text())
    started = time.perf_counter()
    defense = get_defense("robust_aggregation")
    table = defense.run(defense.Config.model_validate({**cfg["defense"], "federation": cfg["federation"]}))
    attack = get_attack("federated")
    attacked = attack.run(attack.Config.model_validate({**cfg["attack"], "federation": cfg["federation"]}))
    out = ROOT / cfg.get("results", "benchmarks/results/robust_aggregation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": cfg,
        "table": [c.model_dump() for c in table.cells],
        "honest_cost": table.honest_cost,
        "attack": attacked.model_dump(),
        "wall_seconds": time.perf_counter() - started,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{'rule':<16}{'attack':<12}{'test loss':>10}{'ASR':>8}{'s':>7}")
    for c in table.cells:
        asr = "-" if c.backdoor_asr is None else f"{c.backdoor_asr:.2f}"
        print(f"{c.rule:<16}{c.attack:<12}{c.test_loss:>10.3f}{asr:>8}{c.seconds:>7.0f}")
    print(f"wrote {out} in {payload['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
