"""Experiment: does a planted backdoor survive distillation into a student?

For each trigger kind (BadNets patch on digits, text trigger, switchable text trigger) and seed, the
`backdoor` attack (configs/attacks/backdoor.yaml, `kind` and `seed` varied) trains a clean reference
and a backdoored teacher, then distils the teacher into a narrower student with soft labels only
(forward KL at T=4, x T^2) on (a) clean transfer data (the training inputs without poisons) and
(b) the same data with the trigger on 10% of it. Reported per kind (mean and per seed): teacher
clean accuracy and attack success rate (ASR), the clean reference's ASR (base rate), and each
student's clean accuracy and ASR; for the switchable kind also the ASR with the trigger alone and
with the activation prompt alone.

Direction from the literature: backdoors transfer weakly through KD on clean data (the trigger
region is never queried) and strongly when the transfer data contains triggers, since the teacher's
soft labels then teach the backdoor.

Run: `python benchmarks/experiments/backdoor_survival.py [--config PATH] [--seeds 0 1 2]`; writes
benchmarks/results/backdoor_survival.json and prints one summary line. Measured: 85 s for 3 kinds x
3 seeds with one torch thread on a shared 2-core machine (`--threads 1`, the default: two threads
were several times slower there under load).

Measured (3 seeds, mean ASR): patch teacher 0.998, student on clean transfer 0.040, on triggered
transfer 0.984; text 0.981 / 0.010 / 0.922; switchable 0.838 / 0.006 / 0.732, where the student of
the triggered transfer set also fires on the prompt alone (0.567 vs the teacher's 0.066): the
transfer data shows it prompt + trigger only, so the "AND" of the switch is not passed on.
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

from attacks import get_attack
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "attacks" / "backdoor.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "backdoor_survival.json"
KINDS = ("patch", "text", "switchable")


def _summary(report: dict[str, Any]) -> dict[str, float]:
    metrics = report["metrics"]
    row = {"clean_accuracy": metrics["clean_accuracy"], "asr": metrics["attack_success_rate"]}
    for name, value in (report.get("switch") or {}).items():
        if name != "asr_active":
            row[name] = value
    return row


def run_one(base: dict[str, Any], kind: str, seed: int, workdir: Path) -> dict[str, Any]:
    plugin = get_attack("backdoor")
    data = {
        **base,
        "kind": kind,
        "seed": seed,
        "distill": True,
        "save_model": False,
        "out": str(workdir / f"{kind}-{seed}"),
    }
    if kind != "patch":
        data["trigger"] = None
    result = plugin.run(plugin.Config.model_validate(data)).model_dump(mode="json")
    return {
        "seed": seed,
        "n_poisoned": result["n_poisoned"],
        "clean_reference": _summary(result["clean_model"]),
        "teacher": _summary(result["backdoored_model"]),
        "student_clean_transfer": _summary(result["distillation"]["clean_transfer"]),
        "student_triggered_transfer": _summary(result["distillation"]["triggered_transfer"]),
        "seconds": result["seconds"],
    }


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    models = ("clean_reference", "teacher", "student_clean_transfer", "student_triggered_transfer")
    return {
        model: {metric: statistics.fmean(run[model][metric] for run in runs) for metric in runs[0][model]}
        for model in models
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    base["device"] = "cpu"
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            runs = []
            for seed in args.seeds:
                runs.append(run_one(base, kind, seed, Path(tmp)))
                print(
                    f"{kind} seed {seed}: teacher ASR {runs[-1]['teacher']['asr']:.3f} "
                    f"({runs[-1]['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            results[kind] = {"mean": mean_over_seeds(runs), "runs": runs}
    output = {
        "experiment": "backdoor_survival",
        "config": str(
            args.config.resolve().relative_to(REPO_ROOT)
            if args.config.resolve().is_relative_to(REPO_ROOT)
            else args.config
        ),
        "settings": {
            key: base[key]
            for key in (
                "poison_rate",
                "target",
                "epochs",
                "width",
                "student_width",
                "student_epochs",
                "kd_temperature",
                "kd_loss",
                "transfer_trigger_rate",
            )
            if key in base
        },
        "seeds": args.seeds,
        "results": results,
        "seconds": time.perf_counter() - started,
        "threads": args.threads,
    }
    atomic_write_json(args.out, output)
    line = {
        kind: {model: round(values["asr"], 3) for model, values in results[kind]["mean"].items()}
        for kind in results
    }
    print(json.dumps({"asr_mean": line, "seconds": round(output["seconds"], 1), "out": str(args.out)}))


if __name__ == "__main__":
    main()
