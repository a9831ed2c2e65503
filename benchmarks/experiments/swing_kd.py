"""Experiment: swing distillation vs plain KD vs DP-SGD KD on a canary corpus (privacy/utility curve).

Swing Distillation (Li et al. 2023) reports over 80% less canary exposure than plain KD. Here, at tiny
scale, with secure-kd's own formulation (`defenses.swing`, NO formal DP guarantee):

- data: the synthetic corpus (Faker records with PII spans) with canaries ("The access code for
  <name> is <3 digits>.") inserted several times; a quarter of the clean records are held out.
- teacher: a tiny Llama fine-tuned with cross-entropy on the training records (it memorizes the canaries).
- students (same tiny architecture, fresh init, forward KL on the teacher's full distributions):
  plain KD; swing KD over a small grid of (T_max, sigma); DP-SGD KD (the engine's DPDistiller,
  `train.privacy`, fixed noise multiplier, epsilon from the RDP accountant).
- measurements per student, the attacks through the registry (`attacks.get_attack`): canary exposure
  over the whole secret space and extraction (memorization attack: greedy and sampled canary
  extraction from the prefix, PII extraction from samples), loss-attack MIA AUC on clean members vs
  held-out records (membership attack), and held-out perplexity.
- headline: exposure reduction of each student vs plain KD, next to its perplexity.

Run: `python benchmarks/experiments/swing_kd.py [--config PATH]`; writes the JSON named by `out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a file: opacus ships a top-level package named `benchmarks`

import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from attacks import get_attack  # noqa: E402
from defenses._lm import PAD_ID, heldout_perplexity, mean, new_model  # noqa: E402
from defenses.swing import SwingConfig, SwingSettings, build_setting, distil_student  # noqa: E402
from secure_kd.config import KDConfig, Strict, TrainConfig, load_config  # noqa: E402
from secure_kd.dp.config import PrivacyConfig  # noqa: E402
from secure_kd.dp.trainer import DPDistiller  # noqa: E402
from secure_kd.paths import atomic_write_json, atomic_write_text  # noqa: E402
from secure_kd.teacher_targets import LiveTeacher  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiments" / "swing_kd.yaml"


class GridPoint(Strict):
    max_temperature: float = Field(..., gt=0)
    noise_std: float = Field(..., ge=0)


class DPSettings(Strict):
    noise_multiplier: float = Field(1.0, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(30.0, gt=0)
    lr: float = Field(3e-3, gt=0)


class ExperimentConfig(Strict):
    threads: int = Field(1, gt=0)
    out: str = "benchmarks/results/swing_kd.json"
    defense: SwingConfig = SwingConfig()
    grid: list[GridPoint] = Field(min_length=1)
    dp: list[DPSettings] = Field(default_factory=lambda: [DPSettings()], min_length=1)
    extraction_samples: int = Field(64, gt=0)


def dp_student(
    setting, cfg: ExperimentConfig, dp: DPSettings, workdir: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student distilled with DP-SGD (plain forward KL) through the engine's DPDistiller."""
    d = cfg.defense
    student = new_model(d.student, len(setting.tokenizer), seed=d.seed + 2).to(setting.device)
    privacy = PrivacyConfig(
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        ledger_dir=str(workdir / f"ledgers-{dp.noise_multiplier:g}"),
        ledger_key="swing-kd-experiment",
    )
    train = TrainConfig(
        epochs=dp.epochs,
        batch_size=d.student.batch_size,
        lr=dp.lr,
        precision="fp32",
        checkpoint_every=1 << 30,
        privacy=privacy,
    )
    kd = KDConfig(loss="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.0, top_k=None)
    distiller = DPDistiller(
        dataset_key="swing-kd-experiment",
        log=lambda _: None,
        student=student,
        examples=setting.train_examples,
        kd=kd,
        train=train,
        out=workdir / f"dp-{dp.noise_multiplier:g}",
        pad_id=PAD_ID,
        eos_id=None,
        targets=LiveTeacher(setting.teacher, None),
        seed=d.seed,
        device=setting.device,
        progress=False,
    )
    distiller.fit()
    student.eval()
    return student, distiller.report.model_dump(mode="json")


def attack(model, name: str, setting, cfg: ExperimentConfig, workdir: Path) -> dict[str, Any]:
    """Exposure, extraction and loss-attack MIA of one model, through the attacks registry."""
    d = cfg.defense
    model_dir = workdir / "models" / name
    model.save_pretrained(model_dir, safe_serialization=True)
    setting.tokenizer.save_pretrained(model_dir)
    memo = get_attack("memorization")
    memo_result = memo.run(
        memo.Config.model_validate(
            {
                "seed": d.seed,
                "device": "cpu",
                "out": str(workdir / "memo" / name),
                "model": {"source": str(model_dir)},
                "tokenizer": str(model_dir),
                "data": {"source": str(workdir / "train.jsonl"), "max_length": d.corpus.max_length},
                "exposure": {"estimate_samples": 0},
                "extraction": {
                    "n_samples": cfg.extraction_samples,
                    "max_new_tokens": 40,
                    "reference": None,
                    "canary_samples": 8,
                },
            }
        )
    )
    membership = get_attack("membership")
    mia = membership.run(
        membership.Config.model_validate(
            {
                "seed": d.seed,
                "device": "cpu",
                "out": str(workdir / "mia" / name),
                "target": {"source": str(model_dir)},
                "tokenizer": str(model_dir),
                "data": {
                    "source": "files",
                    "members": str(workdir / "members.jsonl"),
                    "nonmembers": str(workdir / "nonmembers.jsonl"),
                    "n_members": None,
                    "n_nonmembers": None,
                    "n_population": None,
                    "max_length": d.corpus.max_length,
                },
                "attacks": ["loss"],
                "n_shadows": 0,
            }
        )
    )
    extraction = memo_result.extraction
    return {
        "mean_exposure": mean([c.exposure for c in memo_result.exposure]),
        "exposures": [c.exposure for c in memo_result.exposure],
        "canary_greedy_extraction_rate": extraction.canary_greedy_extraction_rate,
        "canary_sampled_extraction_rate": extraction.canary_sampled_extraction_rate,
        "pii_extraction_rate": extraction.pii_extraction_rate,
        "mia_loss_auc": mia.attacks[0].auc,
        "heldout_perplexity": heldout_perplexity(model, setting.heldout_examples, setting.device),
    }


def write_data(setting, workdir: Path) -> None:
    setting.train.to_jsonl(workdir / "train.jsonl")
    members = [r["text"] for r in setting.train.records if r["topic"] != "canary"]
    for name, texts in (("members", members), ("nonmembers", setting.heldout.texts())):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        atomic_write_text(workdir / f"{name}.jsonl", lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    cfg = load_config(args.config, model=ExperimentConfig)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    setting = build_setting(cfg.defense)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="secure-kd-swing-kd-") as tmp:
        workdir = Path(tmp)
        write_data(setting, workdir)
        rows["teacher"] = attack(setting.teacher, "teacher", setting, cfg, workdir)
        rows["plain_kd"] = attack(
            distil_student(setting, cfg.defense, None), "plain_kd", setting, cfg, workdir
        )
        for point in cfg.grid:
            swing = SwingSettings(**{**cfg.defense.swing.model_dump(), **point.model_dump()})
            name = f"swing_T{point.max_temperature:g}_sigma{point.noise_std:g}"
            rows[name] = attack(distil_student(setting, cfg.defense, swing), name, setting, cfg, workdir)
            rows[name]["swing"] = point.model_dump()
        for dp in cfg.dp:
            name = f"dp_sgd_kd_noise{dp.noise_multiplier:g}"
            dp_model, privacy = dp_student(setting, cfg, dp, workdir)
            rows[name] = attack(dp_model, name, setting, cfg, workdir)
            keys = ("epsilon", "delta", "noise_multiplier", "steps", "sample_rate")
            rows[name]["privacy"] = {k: privacy.get(k) for k in keys}
    plain = rows["plain_kd"]["mean_exposure"]
    for row in rows.values():
        row["exposure_reduction_vs_plain"] = (plain - row["mean_exposure"]) / plain if plain > 0 else None
    results = {
        "experiment": "swing_kd",
        "paper": "Li et al. 2023, Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework",
        "note": "swing is secure-kd's own formulation and gives NO formal DP guarantee; dp_sgd_kd does",
        "config": cfg.model_dump(mode="json"),
        "n_train_records": len(setting.train),
        "n_heldout_records": len(setting.heldout),
        "max_exposure": float(torch.log2(torch.tensor(10.0**cfg.defense.corpus.secret_digits))),
        "models": rows,
        "seconds": time.perf_counter() - started,
    }
    out = REPO_ROOT / cfg.out if not Path(cfg.out).is_absolute() else Path(cfg.out)
    atomic_write_json(out, results)
    summary = {
        name: {
            k: round(row[k], 3)
            for k in (
                "mean_exposure",
                "exposure_reduction_vs_plain",
                "mia_loss_auc",
                "canary_greedy_extraction_rate",
                "heldout_perplexity",
            )
            if row.get(k) is not None
        }
        for name, row in rows.items()
    } | {"seconds": round(results["seconds"], 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
