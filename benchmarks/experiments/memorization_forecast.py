"""Experiment: does the pre-distillation forecast (secure_kd.memorization_forecast) predict what a distilled
student memorizes? AUC of each feature and of the combined score, with bootstrap intervals.

Setup (tiny Llamas, the data and models of the memorization_kd experiment,
configs/experiments/memorization_kd.yaml):
a teacher (hidden 128) and a student base (hidden 64) pretrained on public synthetic text; the teacher
fine-tuned with CE on the private members (`--epochs`, default 20: the regime where it memorizes);
then, BEFORE distilling, each distinct training record is scored from the teacher and the student base
(zlib entropy, teacher NLL, teacher-student KL, combined); then the student is distilled with forward KL
at T=2 on the same records, and its discoverable memorization measured (greedy 16-token suffix from the
32-token prefix, exact match). AUC: the forecast against that label (higher score = predicted
memorized); 95% percentile-bootstrap interval over records (resamples with one class only are skipped).
The same for the teacher's own memorization label, and the teacher label as a predictor of the student's
(what is knowable only after the teacher was measured).

Run: `python benchmarks/experiments/memorization_forecast.py [--epochs 20] [--out PATH]`; writes
benchmarks/results/memorization_forecast.json and prints one summary line. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from memorization_kd import DEFAULT_CONFIG, _recipe, prepare_data, pretrain_bases, soft_distil
from memorization_kd_config import ExperimentConfig

from apparatus.tiny_lm import train_causal_lm
from attacks.memorization.discoverable import discoverable_memorization
from secure_kd.config import load_config
from secure_kd.memorization_forecast import FEATURES, forecast
from secure_kd.metrics import roc_metrics
from secure_kd.models import resolve_device
from secure_kd.paths import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
SIGNS = {"zlib_entropy": -1.0, "teacher_nll": -1.0, "teacher_student_kl": -1.0, "combined": 1.0}


def auc_with_interval(score: np.ndarray, label: np.ndarray, samples: int = 1000, seed: int = 0) -> dict:
    if label.min() == label.max():
        return {"auc": None, "ci": None, "note": "one class only"}
    auc = roc_metrics(score, label)["auc"]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        rows = rng.integers(0, len(score), len(score))
        if label[rows].min() != label[rows].max():
            values.append(roc_metrics(score[rows], label[rows])["auc"])
    low, high = np.quantile(values, [0.025, 0.975])
    return {"auc": float(auc), "ci": [float(low), float(high)], "resamples": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "benchmarks" / "results" / "memorization_forecast.json")
    )
    args = parser.parse_args(argv)
    cfg: ExperimentConfig = load_config(args.config, model=ExperimentConfig)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer, data, public = prepare_data(cfg)
    teacher_base, student_base = pretrain_bases(cfg, len(tokenizer), public, device)
    schedule = cfg.finetune.at(args.epochs)
    members = data["train_examples"]
    teacher = copy.deepcopy(teacher_base)
    train_causal_lm(teacher, members, _recipe(cfg.teacher, schedule), pad_id=0, seed=cfg.seed, device=device)
    teacher.eval()

    # distinct training records (a canary inserted k times is one record here)
    texts = data["corpus"].texts()
    first: dict[str, int] = {}
    for index, text in enumerate(texts):
        first.setdefault(text, index)
    keep = sorted(first.values())
    if len(members) != len(texts):
        raise RuntimeError(f"{len(members)} tokenized members for {len(texts)} texts: a record was dropped")
    examples = [members[i] for i in keep]
    repeats = np.array([texts.count(texts[i]) for i in keep])
    forecast_started = time.perf_counter()
    predicted = forecast(
        [texts[i] for i in keep], [ex.input_ids for ex in examples], teacher, student_base, pad_id=0
    )
    forecast_seconds = time.perf_counter() - forecast_started

    student = copy.deepcopy(student_base)
    soft_distil(student, teacher, members, cfg, schedule, device)
    probe = dict(prefix_tokens=cfg.probes.prefix_tokens, suffix_tokens=cfg.probes.suffix_tokens, pad_id=0,
                 device=device)  # fmt: skip
    student_label = discoverable_memorization(student, examples, **probe)
    teacher_label = discoverable_memorization(teacher, examples, **probe)
    heldout_rate = float(np.nanmean(discoverable_memorization(student, data["heldout_examples"], **probe)))
    eligible = ~np.isnan(student_label)
    y = student_label[eligible].astype(int)
    scores = {
        name: np.array([r[name] for r in predicted["records"]])[eligible] for name in (*FEATURES, "combined")
    }
    aucs = {name: auc_with_interval(SIGNS[name] * values, y) for name, values in scores.items()}
    aucs["repeats"] = auc_with_interval(repeats[eligible].astype(float), y)
    aucs["teacher_memorized (after the fact)"] = auc_with_interval(teacher_label[eligible], y)
    results = {
        "experiment": "memorization_forecast",
        "config": cfg.model_dump(mode="json"),
        "finetune_epochs": args.epochs,
        "n_records": int(len(keep)),
        "n_eligible": int(eligible.sum()),
        "student_memorized": int(y.sum()),
        "teacher_memorized": int(np.nansum(teacher_label[eligible])),
        "student_heldout_memorization_rate": heldout_rate,
        "auc": aucs,
        "directions": {
            k: ("lower = predicted memorized" if v < 0 else "higher = predicted memorized")
            for k, v in SIGNS.items()
        },  # fmt: skip
        "forecast_seconds": forecast_seconds,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(Path(args.out), results)
    print(json.dumps({
        "student_memorized": results["student_memorized"], "n_eligible": results["n_eligible"],
        **{k: (None if v["auc"] is None else [round(v["auc"], 3), [round(c, 3) for c in v["ci"]]])
           for k, v in aucs.items()},
        "seconds": round(results["seconds"], 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
